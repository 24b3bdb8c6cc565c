"""``PyroMethod``: one adapter set (a Pyro model and guide) trained by the shared loop.

Every method of :mod:`melora_pyro.methods` is a ``PyroMethod``, or a composition of them (the ensemble,
the Laplace approximation): all train through :func:`melora_pyro.train.train`, with the same data,
optimiser (one fused AdamW) and evaluation entry point ``predict(batch, num_samples) -> (batch, K)``.
"""
from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path

import pyro.poutine as poutine
import torch
from torch import nn

from ..elbo import FullWeightELBO
from ..flipout import flipout
from ..layers import MeLoRALinear
from ..predict import predict_proba
from ..readouts import readout_inputs
from ..state import count_adapter_state
from ..train import TrainConfig, UpdateRule, train

Batch = dict  # input_ids (b, T), attention_mask (b, T), labels (b,), choice_mask (b, K)


class PyroMethod:
    """A model / guide / ELBO triple trained by :func:`melora_pyro.train.train`.

    Args:
        model: a ``MeLoRAModel`` (or subclass) wrapping its base model.
        guide: a guide for ``model`` (``guides.IdentityGuide`` for plain LoRA).
        elbo: the ELBO; ``FullWeightELBO()`` by default.
        train_overrides: ``TrainConfig`` fields this method pins whatever the caller passes
            (``{"weight_decay": 0.0}`` for MLE), applied with ``dataclasses.replace``.
        dropout_at_test: keep the adapter dropout active in ``predict`` (MC dropout).
        update: the optimiser and its step (``train.UpdateRule``; default one AdamW).
        flipout: apply the guide's Normal latents by Flipout (``melora_pyro.flipout``) in predictions,
            and in training when ``elbo`` is not given (then ``FullWeightELBO(flipout=True)``).
        name: the method's registry name, for messages and outputs.

    ``predict`` with ``num_samples = N >= 1`` averages the label probabilities of N guide draws
    (``melora_pyro.predict_proba``); with a point guide (or ``N = 0``) it is one forward pass at the
    guide's posterior mean. Adapter dropout is on while fitting and off in ``predict`` unless
    ``dropout_at_test``; the frozen base model stays in eval mode throughout.
    """

    deterministic = False  # True when the guide is a point mass: predict ignores num_samples

    def __init__(self, model: nn.Module, guide: nn.Module, elbo: FullWeightELBO | None = None,
                 train_overrides: dict | None = None, dropout_at_test: bool = False,
                 update: UpdateRule | None = None, flipout: bool = False, name: str = ""):
        self.model, self.guide, self.update, self.flipout = model, guide, update, flipout
        self.elbo = elbo or FullWeightELBO(flipout=flipout)
        self.train_overrides = dict(train_overrides or {})
        self.dropout_at_test = dropout_at_test
        self.name = name or type(self).__name__

    def train_config(self, config: TrainConfig) -> TrainConfig:
        """``config`` with this method's pinned fields."""
        return dataclasses.replace(config, **self.train_overrides)

    def fit(self, examples: Sequence, collate: Callable[[list], Batch], train_config: TrainConfig,
            run_dir: str | Path | None = None, resume: bool = False, progress: bool = False) -> list[dict]:
        """Train on ``examples`` with the shared loop; returns its log records (see ``train``)."""
        set_adapter_dropout(self.model, active=True)
        return train(self.model, self.guide, examples, collate, self.train_config(train_config),
                     run_dir=run_dir, resume=resume, elbo=self.elbo, progress=progress, update=self.update)

    def unit_dirs(self, run_dir) -> list[Path]:
        """Where ``fit(run_dir=run_dir)`` keeps the log and checkpoints of each adapter set: ``[run_dir]``."""
        return [Path(run_dir)]

    @torch.no_grad()
    def predict(self, batch: Batch, num_samples: int) -> torch.Tensor:
        """Predictive label probabilities ``(batch, K)`` averaged over ``num_samples`` draws."""
        set_adapter_dropout(self.model, active=self.dropout_at_test)
        draws = 0 if self.deterministic and not self.dropout_at_test else num_samples
        if self.dropout_at_test:  # each draw: a fresh dropout mask at the posterior mean
            return sum(self._predict(batch, 0) for _ in range(max(draws, 1))) / max(draws, 1)
        return self._predict(batch, draws)

    def _predict(self, batch: Batch, num_samples: int) -> torch.Tensor:
        with flipout() if self.flipout else contextlib.nullcontext():
            return predict_proba(self.model, self.guide, batch["input_ids"], batch.get("attention_mask"),
                                 num_samples=num_samples, choice_mask=batch.get("choice_mask"),
                                 **readout_inputs(batch))

    def mean_logits(self, batch: Batch) -> torch.Tensor:
        """Label logits ``(batch, K)`` at the guide's posterior mean, differentiable in A and B
        (labels other than a question's choices are ``-inf``)."""
        conditioned = poutine.condition(self.model, data=self.guide.posterior_mean())
        return conditioned(batch["input_ids"], batch.get("attention_mask"),
                           choice_mask=batch.get("choice_mask"), **readout_inputs(batch))

    def adapter_state(self) -> int:
        """Trainable numbers of the adapters and the guide (``count_adapter_state``)."""
        return count_adapter_state(self.model, self.guide)

    @property
    def units(self) -> list["PyroMethod"]:
        """The independently trained adapter sets: ``[self]`` (an ensemble has several)."""
        return [self]

    def __repr__(self):
        return f"{type(self).__name__}(name={self.name!r}, adapter_state={self.adapter_state()})"


class PointMethod(PyroMethod):
    """A point-estimated adapter (plain LoRA: MLE, MAP, MC dropout): ``predict`` is one forward pass
    at the posterior mean (C = I), or with ``dropout_at_test`` one pass per dropout mask."""

    deterministic = True


def example_row(batch: Batch, i: int) -> Batch:
    """Example ``i`` of a batch as a batch of one (every tensor's leading dimension is the batch)."""
    return {k: v[i:i + 1] if torch.is_tensor(v) else v for k, v in batch.items()}


def set_adapter_dropout(model: nn.Module, active: bool) -> None:
    """Put the dropout modules of every ``MeLoRALinear`` in train (``active``) or eval mode, and nothing else."""
    for module in model.modules():
        if isinstance(module, MeLoRALinear):
            module.dropout.train(active)
