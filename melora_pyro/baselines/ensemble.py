"""Deep ensemble of independently initialised adapter sets (Lakshminarayanan et al., 2017), as
``modelwrappers/deepensemble.py`` of Wang-ML-Lab/bayesian-peft runs it."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ..config import AGGREGATIONS
from ..train import TrainConfig
from .method import Batch, PyroMethod



class EnsembleMethod:
    """K adapter sets on K copies of the base model, each trained by the shared loop.

    As the reference: the members differ only by their initialisation (drawn with its own seed when
    it was built, ``melora_pyro.methods.build_method``) and are trained on the *same* batches in the
    same order (the reference steps every member on each batch in turn; the members share no
    parameter and no random draw, so training them one after the other with the same ``train_config``
    gives the same adapters). Member k logs and checkpoints to ``run_dir/member-k`` when ``run_dir`` is
    given.

    ``aggregate``: ``"logits"`` (the reference): ``softmax(mean over members of the label logits)``;
    ``"probs"``: the mean of the members' probabilities. Both ``(batch, K)``.
    """

    def __init__(self, members: Sequence[PyroMethod], aggregate: str = "logits", name: str = "ensemble"):
        if len(members) < 1:
            raise ValueError("an ensemble needs at least one member")
        if aggregate not in AGGREGATIONS:
            raise ValueError(f"aggregate must be one of {AGGREGATIONS}, got {aggregate!r}")
        self.members, self.aggregate, self.name = list(members), aggregate, name

    def unit_dirs(self, run_dir) -> list[Path]:
        """Where each member keeps its log and checkpoints: ``run_dir/member-k``."""
        return [Path(run_dir) / f"member-{k}" for k in range(len(self.members))]

    def fit(self, examples: Sequence, collate: Callable[[list], Batch], train_config: TrainConfig,
            run_dir: str | Path | None = None, resume: bool = False, progress: bool = False) -> list[dict]:
        """Train every member on the same batch sequence; returns the concatenated logs, each record
        tagged ``member``."""
        history = []
        for k, member in enumerate(self.members):
            member_dir = self.unit_dirs(run_dir)[k] if run_dir is not None else None
            if member_dir is not None:
                member_dir.mkdir(parents=True, exist_ok=True)
            records = member.fit(examples, collate, train_config, run_dir=member_dir, resume=resume, progress=progress)
            history += [{**record, "member": k} for record in records]
        return history

    @torch.no_grad()
    def predict(self, batch: Batch, num_samples: int) -> torch.Tensor:
        """The ensemble's label probabilities ``(batch, K)`` (``aggregate``); ``num_samples`` is passed
        to the members when probabilities are averaged (point members ignore it)."""
        if self.aggregate == "logits":
            return torch.stack([member.mean_logits(batch) for member in self.members]).mean(0).softmax(-1)
        return torch.stack([member.predict(batch, num_samples) for member in self.members]).mean(0)

    def adapter_state(self) -> int:
        """The members' trainable numbers together (K times one member's)."""
        return sum(member.adapter_state() for member in self.members)

    @property
    def units(self) -> list[PyroMethod]:
        return list(self.members)

    def __repr__(self):
        return f"EnsembleMethod(size={len(self.members)}, aggregate={self.aggregate!r}, adapter_state={self.adapter_state()})"
