"""The experiments' shared pieces: the collate function, the tables."""
import torch

from experiments.common import make_collate, metric_table
from melora_pyro.data import Example


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
