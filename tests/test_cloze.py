"""Cloze scoring: lm-eval-style prompts, packed rows equal to unpacked forwards, the prefix cache,
readouts through the Pyro model and the methods, and the bad inputs refused before training."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from pyro.infer import Predictive

from guides import IdentityGuide, MeanFieldGuide
from melora_pyro import MeLoRAConfig, MeLoRAModel, predict_proba
from melora_pyro.cloze import TEMPLATES, template_for
from melora_pyro.data import DatasetError, Example, _bos_prefix, load_examples
from melora_pyro.methods import build_method
from melora_pyro.models import load_base_model
from melora_pyro.packing import encode_pair, pack_batch, pack_example
from melora_pyro.prefix_cache import PrefixCachedLM, top_layer_targets
from melora_pyro.readouts import ClozeReadout, LetterReadout, readout_inputs
from melora_pyro.scoring import choice_loglikelihoods

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MELORA_DATA_DIR", REPO.parent / "shared" / "data"))
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"benchmark data not found at {DATA}")
DATASETS = ("arc-e", "arc-c", "obqa", "wg-s", "boolq", "mmlu-chem")


def unpacked_scores(lm, tokenizer, examples, dataset):
    """Reference: one plain HF forward per (question, choice), summing the continuation's log-probs."""
    bos = _bos_prefix(tokenizer)
    out = torch.full((len(examples), max(len(e.choices) for e in examples)), float("-inf"))
    for i, ex in enumerate(examples):
        for k, (context, continuation) in enumerate(template_for(dataset).pairs(ex)):
            ctx, cont = encode_pair(tokenizer, context, continuation, bos)
            with torch.no_grad():
                logp = lm(torch.tensor([ctx + cont])).logits[0].float().log_softmax(-1)
            out[i, k] = sum(logp[len(ctx) + j - 1, t] for j, t in enumerate(cont))
    return out


@needs_data
@pytest.mark.parametrize("dataset", DATASETS)
def test_packed_scores_equal_separate_forwards_stories(stories, dataset):
    lm, tokenizer = stories
    examples = load_examples(dataset, "test", DATA)[:5]
    packed = choice_loglikelihoods(lm, tokenizer, examples, "sum", batch_size=2, template=dataset, max_length=4096)
    reference = unpacked_scores(lm, tokenizer, examples, dataset)
    assert torch.equal(torch.isinf(packed), torch.isinf(reference))
    finite = torch.isfinite(reference)
    torch.testing.assert_close(packed[finite], reference[finite], atol=2e-4, rtol=1e-5)


@pytest.mark.slow
@needs_data
@pytest.mark.parametrize("dataset", ("arc-e", "wg-s", "boolq"))
def test_packed_scores_equal_separate_forwards_smollm2(smollm2, dataset):
    lm, tokenizer = smollm2
    examples = load_examples(dataset, "test", DATA)[:3]
    packed = choice_loglikelihoods(lm, tokenizer, examples, "sum", batch_size=3, template=dataset, max_length=4096)
    reference = unpacked_scores(lm, tokenizer, examples, dataset)
    finite = torch.isfinite(reference)
    torch.testing.assert_close(packed[finite], reference[finite], atol=5e-4, rtol=1e-5)


@needs_data
def test_lm_eval_prompts_rendered_exactly():
    """One example of each dataset, rendered as lm-evaluation-harness's task YAMLs define it."""
    arc = load_examples("arc-e", "test", DATA)[0]
    assert template_for("arc-e").pairs(arc)[0] == (f"Question: {arc.question}\nAnswer:", " " + arc.choices[0])
    arc_c = load_examples("arc-c", "test", DATA)[0]
    assert template_for("arc-c").pairs(arc_c)[1] == (f"Question: {arc_c.question}\nAnswer:", " " + arc_c.choices[1])
    obqa = load_examples("obqa", "test", DATA)[0]
    assert template_for("obqa").pairs(obqa)[2] == (obqa.question, " " + obqa.choices[2])
    wg = load_examples("wg-s", "test", DATA)[0]
    blank = wg.question.index("_")
    rest = " " + wg.question[blank + 1:].strip()
    assert template_for("wg-s").pairs(wg) == [(wg.question[:blank] + wg.choices[0], rest),
                                                (wg.question[:blank] + wg.choices[1], rest)]
    boolq = load_examples("boolq", "test", DATA)[0]
    context = f"{boolq.context}\nQuestion: {boolq.question}?\nAnswer:"
    assert template_for("boolq").pairs(boolq) == [(context, " yes"), (context, " no")]
    mmlu = load_examples("mmlu-phys", "test", DATA)[0]
    assert template_for("mmlu-phys").pairs(mmlu)[3] == (f"Question: {mmlu.question}\nAnswer:", " " + mmlu.choices[3])
    assert set(TEMPLATES) >= {"arc-e", "arc-c", "obqa", "wg-s", "wg-m", "boolq", "mmlu-chem", "mmlu-phys", "toy"}


def test_encode_pair_moves_trailing_space_like_lm_eval(stories):
    _, tokenizer = stories
    ctx, cont = encode_pair(tokenizer, "Question: hi\nAnswer: ", "yes", [])
    whole = tokenizer("Question: hi\nAnswer: yes", add_special_tokens=False)["input_ids"]
    assert ctx == tokenizer("Question: hi\nAnswer:", add_special_tokens=False)["input_ids"]
    assert ctx + cont == whole


def test_normalizations(stories):
    lm, tokenizer = stories
    ex = Example("Which animal barks?", ("dog", "a small cat"), 0, uid="q")
    sums = choice_loglikelihoods(lm, tokenizer, [ex], "sum")
    chars = choice_loglikelihoods(lm, tokenizer, [ex], "char")
    tokens = choice_loglikelihoods(lm, tokenizer, [ex], "token")
    packed = pack_example(tokenizer, ex, template_for(None), 256)
    torch.testing.assert_close(chars[0], sums[0] / torch.tensor([3.0, 11.0]))
    torch.testing.assert_close(tokens[0], sums[0] / torch.tensor(packed.choice_tokens, dtype=torch.float))
    with pytest.raises(ValueError, match="normalization must be one of"):
        ClozeReadout("mean")


def test_fewer_choices_are_minus_inf_and_get_no_probability(stories):
    lm, tokenizer = stories
    examples = [Example("Pick one", ("red", "blue", "green"), 0, uid="a"), Example("Pick", ("up", "down"), 1, uid="b")]
    scores = choice_loglikelihoods(lm, tokenizer, examples)
    assert scores.shape == (2, 3) and scores[1, 2] == float("-inf") and torch.isfinite(scores[0]).all()
    method = build_method("zero-shot", lm, MeLoRAConfig(rank=2), ClozeReadout("sum"))
    batch = pack_batch([pack_example(tokenizer, ex, template_for(None), 256) for ex in examples], 3)
    probs = method.predict(batch)
    torch.testing.assert_close(probs, scores.softmax(-1))
    assert probs[1, 2] == 0


def test_only_continuation_positions_reach_lm_head(stories):
    lm, tokenizer = stories
    ex = load_like_arc()
    seen = []
    handle = lm.lm_head.register_forward_hook(lambda m, i, o: seen.append(i[0].shape))
    try:
        choice_loglikelihoods(lm, tokenizer, [ex])
    finally:
        handle.remove()
    packed = pack_example(tokenizer, ex, template_for(None), 256)
    assert seen == [torch.Size([1, len(packed.score_positions), lm.config.hidden_size])]
    assert len(packed.tokens) < sum(len(encode_pair(tokenizer, c, x, [])[0]) + len(encode_pair(tokenizer, c, x, [])[1])
                                    for c, x in template_for(None).pairs(ex))


def load_like_arc() -> Example:
    return Example("Which of these is a source of light for the Earth during the day?",
                   ("the Sun", "the Moon", "a lamp", "a mirror"), 0, uid="light")


def test_melora_model_with_cloze_readout(stories):
    """Through the Pyro model: posterior-mean probs equal the scorer's, Predictive records (S, b, K)."""
    base, tokenizer = load_base_model(str(Path(stories[0].name_or_path)))
    model = MeLoRAModel(base, MeLoRAConfig(rank=2, target_modules=("q_proj", "v_proj", "lm_head")), ClozeReadout("token"))
    guide = MeanFieldGuide(model)
    examples = [load_like_arc(), Example("Is ice cold?", ("yes", "no"), 0, uid="ice")]
    batch = pack_batch([pack_example(tokenizer, ex, template_for(None), 256) for ex in examples], 4)
    with torch.no_grad():  # move B off its tiny init so that the adapter matters
        for b in model.lora_B:
            b.normal_(0, 0.3)
    probs = predict_proba(model, guide, batch["input_ids"], batch["attention_mask"], num_samples=0,
                          choice_mask=batch["choice_mask"], **readout_inputs(batch))
    scores = choice_loglikelihoods(_WithGuide(model, guide), tokenizer, examples, "token")
    torch.testing.assert_close(probs, scores.softmax(-1))
    base_scores = choice_loglikelihoods(stories[0], tokenizer, examples, "token")
    assert not torch.allclose(scores[torch.isfinite(scores)], base_scores[torch.isfinite(base_scores)])
    samples = Predictive(model, guide=guide, num_samples=3, return_sites=["probs"])(
        batch["input_ids"], batch["attention_mask"], choice_mask=batch["choice_mask"], **readout_inputs(batch))["probs"]
    assert samples.shape == (3, 2, 4)
    torch.testing.assert_close(samples.sum(-1), torch.ones(3, 2))


class _WithGuide:
    """A method-like pair (what ``choice_loglikelihoods`` accepts besides plain models)."""

    def __init__(self, model, guide):
        self.model, self.guide = model, guide


def test_identity_adapter_scores_equal_base_model(stories):
    lm, tokenizer = stories
    base, _ = load_base_model(str(Path(lm.name_or_path)))
    model = MeLoRAModel(base, MeLoRAConfig(rank=2), ClozeReadout("sum"))
    with torch.no_grad():
        for b in model.lora_B:
            b.zero_()
    examples = [load_like_arc()]
    torch.testing.assert_close(choice_loglikelihoods(model, tokenizer, examples),
                               choice_loglikelihoods(lm, tokenizer, examples))


def test_prefix_cache_gives_same_scores_and_persists(stories, tmp_path):
    lm, tokenizer = stories
    layers = lm.config.num_hidden_layers
    examples = [load_like_arc(), Example("Is ice cold?", ("yes", "no"), 0, uid="ice"),
                Example("The cat sat on the _ all day.", ("mat", "moon"), 0, uid="wg")]
    templates = [template_for(None), template_for(None), template_for("wg-s")]
    rows = [pack_example(tokenizer, ex, t, 256) for ex, t in zip(examples, templates)]
    batch = pack_batch(rows, 4)
    readout = ClozeReadout("sum")
    with torch.no_grad():
        plain = readout(lm, batch["input_ids"], **readout_inputs(batch))
        cached_lm = PrefixCachedLM(lm, layers - 2)
        first = readout(cached_lm, batch["input_ids"], **readout_inputs(batch))
        assert len(cached_lm.cache) == 3
        again = readout(cached_lm, batch["input_ids"], **readout_inputs(batch))      # from the cache
        alone = readout(cached_lm, *[pack_batch(rows[1:2], 4)[k] for k in ("input_ids",)],
                        **readout_inputs(pack_batch(rows[1:2], 4)))                   # other padding
    torch.testing.assert_close(first, plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(again, plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(alone[0, :2], plain[1, :2], atol=1e-5, rtol=1e-5)
    path = tmp_path / "cache.safetensors"
    cached_lm.save(path)
    reloaded = PrefixCachedLM(lm, layers - 2)
    assert reloaded.load(path) == 3
    assert reloaded.warm([batch]) == 0  # nothing left to compute
    letter = LetterReadout([tokenizer(" A", add_special_tokens=False)["input_ids"][-1],
                            tokenizer(" B", add_special_tokens=False)["input_ids"][-1]])
    ids = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        torch.testing.assert_close(letter(reloaded, ids, mask), letter(lm, ids, mask), atol=1e-5, rtol=1e-5)


def test_top_layer_targets():
    assert top_layer_targets(("q_proj", "lm_head"), 30, 2) == (
        "model.layers.28.self_attn.q_proj", "model.layers.29.self_attn.q_proj", "lm_head")
    with pytest.raises(ValueError, match="adapt_top_layers must lie in 1..29"):
        top_layer_targets(("q_proj",), 30, 30)
    with pytest.raises(ValueError, match="lies below the top 2 layers"):
        top_layer_targets(("model.layers.3.self_attn.q_proj",), 30, 2)


@pytest.mark.parametrize("example, template, max_length, message", [
    (Example("Q?", ("a", "b"), 0, uid="e1"), None, 256, None),
    (Example("The _ sat.", ("cat", "dog"), 0, uid="e2"), "wg-s", 256, None),
    (Example("No blank here.", ("cat", "dog"), 0, uid="wg-bad"), "wg-s", 256,
     r"example 'wg-bad': WinoGrande sentence has no blank '_'"),
    (Example("Q?", ("b", "a", "a"), 0, uid="twins"), None, 256,
     r"example 'twins': choices 1 and 2 have the same context and continuation"),
    (Example("A long question " * 30, ("a", "b"), 0, uid="long"), None, 16,
     r"example 'long': its context and 2 continuations take \d+ tokens packed, more than max_length=16"),
    (Example("Is it?", ("yes", "no"), 0, context="word " * 400, uid="bq"), "boolq", 8,
     r"example 'bq': .* without the passage, more than max_length=8"),
])
def test_bad_cloze_input_names_the_example(stories, example, template, max_length, message):
    _, tokenizer = stories
    if message is None:
        pack_example(tokenizer, example, template_for(template), max_length)
        return
    with pytest.raises(DatasetError, match=message):
        pack_example(tokenizer, example, template_for(template), max_length)


def test_empty_continuation_is_refused():
    class NoTokens:  # a tokenizer under which a choice's text adds no token
        bos_token_id = None

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) for c in text.replace(" ~", "")]}
    with pytest.raises(DatasetError, match=r"example 'e': choice 1 \('~'\) tokenises to no continuation tokens"):
        pack_example(NoTokens(), Example("Q?", ("x", "~"), 0, uid="e"), template_for(None), 64)


def test_passage_is_cut_from_its_start_never_the_continuation(stories):
    _, tokenizer = stories
    passage = " ".join(f"w{i}" for i in range(200))
    ex = Example("Is it?", ("yes", "no"), 0, context=passage, uid="bq")
    packed = pack_example(tokenizer, ex, template_for("boolq"), 120)
    assert len(packed.tokens) <= 120
    text = tokenizer.decode(packed.tokens)
    assert "w199" in text and "w0 " not in text and text.rstrip().endswith("no")
    assert "Question: Is it?" in text
