"""The lm-evaluation-harness model ``melora``, run by lm-eval itself offline on a local JSONL task."""
import json
import math

import pyro
import pytest
import torch

from guides import MeanFieldGuide
from melora_pyro import MeLoRAConfig, MeLoRAModel
from melora_pyro.data import _bos_prefix
from melora_pyro.export import export_merged
from melora_pyro.models import load_base_model

from .conftest import STORIES_DIR

lm_eval = pytest.importorskip("lm_eval")
from melora_pyro.lm_eval_model import MeLoRALM  # noqa: E402  (needs lm_eval)

QUESTIONS = [
    {"question": "Where did the little girl go?", "choices": ["to the park", "home", "to the big forest"], "label": 0},
    {"question": "What did Tom see?", "choices": ["a cat", "a red ball", "the sun"], "label": 1},
    {"question": "Who was happy?", "choices": ["Lily", "the dog", "everyone in the town"], "label": 2},
]
TASK = """task: melora_test_cloze
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: label
doc_to_choice: "{{{{choices}}}}"
metric_list:
  - metric: acc
"""


def fresh():
    if not STORIES_DIR.is_dir():
        pytest.skip(f"{STORIES_DIR} not found (set MELORA_SHARED_DIR)")
    return load_base_model(str(STORIES_DIR))


@pytest.fixture
def trained():
    """Me-LoRA on stories260K with non-trivial B, M and Omega, its guide and tokenizer."""
    pyro.set_rng_seed(0)
    base, tokenizer = fresh()
    model = MeLoRAModel(base, MeLoRAConfig(rank=4, target_modules=("q_proj", "v_proj")), [10, 11, 12])
    guide = MeanFieldGuide(model, init_scale=0.3)
    with torch.no_grad():
        for b in model.lora_B:
            b.normal_(0, 0.3)
        guide.loc.add_(0.5 * torch.randn_like(guide.loc))
    return model, guide, tokenizer


@pytest.fixture
def task_dir(tmp_path):
    data = tmp_path / "questions.jsonl"
    data.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    (tmp_path / "task.yaml").write_text(TASK.format(data=data))
    return tmp_path


def harness_loglikelihoods(lm, task_dir) -> torch.Tensor:
    """Per-choice log-likelihoods ``(questions, choices)`` as lm-eval computed them for ``lm``."""
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(model=lm, tasks=["melora_test_cloze"], log_samples=True,
                                  task_manager=TaskManager(include_path=str(task_dir), include_defaults=False))
    samples = sorted(out["samples"]["melora_test_cloze"], key=lambda s: s["doc_id"])
    return torch.tensor([[resp[0][0] for resp in s["resps"]] for s in samples], dtype=torch.float64)


def reference_loglikelihoods(lm_model, tokenizer) -> torch.Tensor:
    """log p(" choice" | "Question: q\\nAnswer:") by one unpadded forward of each whole sequence."""
    bos = _bos_prefix(tokenizer)
    rows = []
    for q in QUESTIONS:
        context = bos + tokenizer(f"Question: {q['question']}\nAnswer:", add_special_tokens=False)["input_ids"]
        row = []
        for choice in q["choices"]:
            whole = bos + tokenizer(f"Question: {q['question']}\nAnswer: {choice}", add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logp = lm_model(input_ids=torch.tensor([whole])).logits[0].double().log_softmax(-1)
            row.append(sum(logp[t - 1, whole[t]] for t in range(len(context), len(whole))).item())
        rows.append(row)
    return torch.tensor(rows, dtype=torch.float64)


def test_posterior_mean_scores_equal_the_merged_model_scored_directly(trained, task_dir, tmp_path):
    model, guide, tokenizer = trained
    got = harness_loglikelihoods(MeLoRALM(model=model, guide=guide, tokenizer=tokenizer, num_samples=0,
                                          batch_size=4), task_dir)
    merged = export_merged(model, guide, tmp_path / "merged")
    from transformers import AutoModelForCausalLM

    expected = reference_loglikelihoods(AutoModelForCausalLM.from_pretrained(merged).eval(), tokenizer)
    base_scores = reference_loglikelihoods(fresh()[0], tokenizer)
    assert (expected - base_scores).abs().max() > 0.05  # the adapter matters to these scores
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_posterior_predictive_averages_probabilities_over_draws(trained, task_dir):
    model, guide, tokenizer = trained
    lm = MeLoRALM(model=model, guide=guide, tokenizer=tokenizer, num_samples=3, seed=5)
    per_draw = []
    for draw in lm.draws:  # each draw alone, scored as a one-draw model
        single = MeLoRALM(model=model, guide=guide, tokenizer=tokenizer, num_samples=1)
        single.draws = [draw]
        per_draw.append(harness_loglikelihoods(single, task_dir))
    expected = torch.logsumexp(torch.stack(per_draw), 0) - math.log(3)
    got = harness_loglikelihoods(lm, task_dir)
    assert (per_draw[0] - per_draw[1]).abs().max() > 1e-3  # the draws differ
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_harness_scores_equal_our_cloze_scorer_at_the_posterior_mean(trained, task_dir):
    from melora_pyro.baselines import PyroMethod
    from melora_pyro.data import Example
    from melora_pyro.scoring import choice_loglikelihoods

    model, guide, tokenizer = trained
    examples = [Example(question=q["question"], choices=tuple(q["choices"]), label=q["label"]) for q in QUESTIONS]
    ours = choice_loglikelihoods(PyroMethod(model, guide), tokenizer, examples, normalization="sum")
    got = harness_loglikelihoods(MeLoRALM(model=model, guide=guide, tokenizer=tokenizer, num_samples=0), task_dir)
    torch.testing.assert_close(got, ours.double(), atol=1e-4, rtol=0)
