"""The experiments' shared pieces: the prefix cache, the collate function, the tables."""
import torch

from experiments.common import PrefixCachedLM, make_collate, metric_table
from melora_pyro.data import Example
from melora_pyro.methods import build_method
from melora_pyro.models import tiny_llama
from melora_pyro.config import MeLoRAConfig


def test_prefix_cache_reproduces_the_full_model_whatever_the_padding():
    full, cached = tiny_llama(num_layers=4), PrefixCachedLM(tiny_llama(num_layers=4), split=2)
    ids = torch.randint(0, 128, (3, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[0, :3], mask[1, :1] = 0, 0
    with torch.no_grad():
        expected = full(input_ids=ids, attention_mask=mask, logits_to_keep=1).logits
        assert torch.allclose(cached(ids, mask, logits_to_keep=1).logits, expected, atol=1e-6)
        wider = torch.cat([torch.zeros(3, 2, dtype=torch.long), ids], 1)
        wider_mask = torch.cat([torch.zeros(3, 2, dtype=torch.long), mask], 1)
        assert torch.allclose(cached(wider, wider_mask, logits_to_keep=1).logits, expected, atol=1e-5)
    assert len(cached.cache) == 3


def test_prefix_cache_refuses_adapters_below_the_split():
    config = MeLoRAConfig(rank=2, target_modules=("q_proj",))
    method = build_method("mle", PrefixCachedLM(tiny_llama(num_layers=4), split=2), config, [1, 2])
    try:
        method.predict({"input_ids": torch.ones(1, 3, dtype=torch.long)}, 0)
    except RuntimeError as e:
        assert "cannot be cached" in str(e)
    else:
        raise AssertionError("adapters below the split were accepted")


class _Tokenizer:
    """Characters as tokens; enough for data.encode."""
    pad_token_id, eos_token_id, bos_token_id = 0, 0, None

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [1 + ord(c) % 100 for c in text]}


def test_collate_masks_the_choices_each_question_lacks():
    examples = [Example("q?", ("a", "b", "c"), 2), Example("longer question?", ("a", "b", "c", "d", "e"), 4)]
    batch = make_collate(_Tokenizer(), 5, 256)(examples)
    assert batch["choice_mask"].tolist() == [[True] * 3 + [False] * 2, [True] * 5]
    assert batch["labels"].tolist() == [2, 4]
    assert batch["attention_mask"][0, 0] == 0 and batch["attention_mask"][:, -1].all()  # left padding


def test_metric_table_marks_the_best_mean_per_column():
    rows = {"a": [{"acc": 0.5, "ece": 0.1, "nll": 0.7, "brier": 0.4}],
            "b": [{"acc": 0.6, "ece": 0.2, "nll": 0.6, "brier": 0.5}, {"acc": 0.8, "ece": 0.2, "nll": 0.6, "brier": 0.5}]}
    lines = metric_table(rows)
    assert lines[2].startswith("| a | 50.00 | **10.00** | 0.7000 | **0.4000** | 1")
    assert "**70.00 ± 14.14**" in lines[3] and "**0.6000 ± 0.0000**" in lines[3]
