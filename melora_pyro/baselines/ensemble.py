"""Deep ensemble of independently initialised and trained adapter sets (Lakshminarayanan et al., 2017)."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ..train import TrainConfig
from .method import Batch, PyroMethod


class EnsembleMethod:
    """K adapter sets on K copies of the base model, each trained by the shared loop with its own seed.

    Member k is trained with ``train_config.seed + k`` (its data order and any sampling noise) and,
    when ``run_dir`` is given, logs and checkpoints to ``run_dir/member-k``; its initialisation was
    drawn with its own seed when it was built (``melora_pyro.methods.build_method``).
    ``predict`` is the mean of the members' label probabilities ``(batch, K)``.
    """

    def __init__(self, members: Sequence[PyroMethod], name: str = "ensemble"):
        if len(members) < 1:
            raise ValueError("an ensemble needs at least one member")
        self.members, self.name = list(members), name

    def unit_dirs(self, run_dir) -> list[Path]:
        """Where each member keeps its log and checkpoints: ``run_dir/member-k``."""
        return [Path(run_dir) / f"member-{k}" for k in range(len(self.members))]

    def fit(self, examples: Sequence, collate: Callable[[list], Batch], train_config: TrainConfig,
            run_dir: str | Path | None = None, resume: bool = False, progress: bool = False) -> list[dict]:
        """Train every member in turn; returns the concatenated logs, each record tagged ``member``."""
        history = []
        for k, member in enumerate(self.members):
            config = dataclasses.replace(train_config, seed=train_config.seed + k)
            member_dir = self.unit_dirs(run_dir)[k] if run_dir is not None else None
            if member_dir is not None:
                member_dir.mkdir(parents=True, exist_ok=True)
            records = member.fit(examples, collate, config, run_dir=member_dir, resume=resume, progress=progress)
            history += [{**record, "member": k} for record in records]
        return history

    @torch.no_grad()
    def predict(self, batch: Batch, num_samples: int) -> torch.Tensor:
        """Mean over members of ``member.predict(batch, num_samples)``, ``(batch, K)``."""
        return torch.stack([member.predict(batch, num_samples) for member in self.members]).mean(0)

    def adapter_state(self) -> int:
        """The members' trainable numbers together (K times one member's)."""
        return sum(member.adapter_state() for member in self.members)

    @property
    def units(self) -> list[PyroMethod]:
        return list(self.members)

    def __repr__(self):
        return f"EnsembleMethod(size={len(self.members)}, adapter_state={self.adapter_state()})"
