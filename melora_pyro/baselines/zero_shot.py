"""``ZeroShotMethod``: the base model without adapters, scored by the same readout as every method."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..readouts import readout_inputs
from .method import Batch


class ZeroShotMethod:
    """The first row of every table: what the pretrained model knows before any fine-tuning.

    ``fit`` trains nothing; ``predict(batch, num_samples)`` is ``softmax`` of the readout's scores
    ``(batch, K)`` (choices a question lacks get probability 0; ``num_samples`` is ignored).
    """

    name = "zero-shot"
    deterministic = True

    def __init__(self, base_model: nn.Module, readout):
        self.base, self.readout = base_model.requires_grad_(False), readout

    def fit(self, examples: Sequence, collate: Callable[[list], Batch], train_config=None, run_dir=None,
            resume: bool = False, progress: bool = False) -> list[dict]:
        return []

    @torch.no_grad()
    def predict(self, batch: Batch, num_samples: int = 0) -> torch.Tensor:
        scores = self.readout(self.base, batch["input_ids"], batch.get("attention_mask"), **readout_inputs(batch))
        if batch.get("choice_mask") is not None:
            scores = scores.masked_fill(~batch["choice_mask"], float("-inf"))
        return scores.softmax(-1)

    def adapter_state(self) -> int:
        return 0

    @property
    def units(self) -> list:
        return []
