"""Me-LoRA's linearised (GLM) predictive: q(C) pushed through the label logits to first order.

``predictive="glm"`` of the Me-LoRA variants. With ``q(C) = N(M, diag(Omega^2))`` the linearised model
``f(C) ~ f(M) + J (C - M)`` gives label logits ``N(f(M), s^2 J diag(Omega^2) J^T)`` per example
(:mod:`melora_pyro.glm`; ``J`` ``(K, L r^2)``, one backward pass per offered label), the probabilities
the mean softmax of ``glm_samples`` logit draws. ``s`` is ``posterior_scale``: 1 is the trained
posterior; a wider one (``s > 1``) is a tempered posterior, ``N(M, s^2 Omega^2)``, whose mean prediction
stays ``f(M)``'s. ``posterior_scale="validation"`` picks ``s`` from ``SCALE_GRID`` by NLL on the
validation examples (the Jacobians computed once, every ``s`` scored with the same draws), never on test.

The same predictive as Laplace-LoRA's (``baselines.laplace``), over C instead of (A, B); Flipout, a
sampling device, plays no part in it.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import pyro.poutine as poutine
import torch
from tqdm.auto import tqdm

from ..glm import GLM_SAMPLES, gaussian_softmax_mean, label_jacobian, logit_covariance
from ..metrics import nll as nll_metric
from ..readouts import readout_inputs
from ..train import TrainConfig
from .method import Batch, PyroMethod, example_row

SCALE_GRID = tuple(2.0 ** (k / 2) for k in range(0, 15))  # 1 .. 128, two per octave
SEARCH_BATCH = 64  # validation examples per logit-sampling batch of the scale search


class GLMPredictiveMethod:
    """A variational ``PyroMethod`` (guide with ``posterior_mean`` and ``posterior_std`` over one site
    ``"C"``) predicting with the GLM predictive (module docstring).

    Args:
        base: the Me-LoRA method; ``fit`` trains it unchanged.
        posterior_scale: ``s``, a positive float (1: the trained q(C)), or ``"validation"``.
        glm_samples: logit draws per example.
        val_examples: the validation examples of ``posterior_scale="validation"``.

    After ``fit``: ``posterior_scale`` (the float used) and, for a search, ``selection``
    (``{s: validation NLL}``).
    """

    def __init__(self, base: PyroMethod, posterior_scale: float | str = 1.0, glm_samples: int = GLM_SAMPLES,
                 val_examples: Sequence | None = None):
        if posterior_scale == "validation" and not val_examples:
            raise ValueError("posterior_scale='validation' needs val_examples")
        if posterior_scale != "validation" and not (isinstance(posterior_scale, (int, float)) and posterior_scale > 0):
            raise ValueError(f"posterior_scale must be 'validation' or a positive number, got {posterior_scale!r}")
        self.base, self.name = base, base.name
        self.rule, self.glm_samples, self.val_examples = posterior_scale, glm_samples, val_examples
        self.posterior_scale = None if posterior_scale == "validation" else float(posterior_scale)
        self.selection: dict[float, float] = {}

    def fit(self, examples: Sequence, collate: Callable[[list], Batch], train_config: TrainConfig,
            run_dir: str | Path | None = None, resume: bool = False, progress: bool = False) -> list[dict]:
        """Train ``base``; then, for ``posterior_scale="validation"``, choose the scale."""
        history = self.base.fit(examples, collate, train_config, run_dir=run_dir, resume=resume, progress=progress)
        if self.rule == "validation":
            self.select_scale(collate, progress=progress)
        return history

    def logit_moments(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The label logits' mean ``f(M)`` ``(batch, K)`` and covariance ``J diag(Omega^2) J^T``
        ``(batch, K, K)`` at scale 1, one example per forward (``glm.label_jacobian``)."""
        variance = self.base.guide.posterior_std()["C"].detach().square().flatten()
        rows = [self._example_moments(example_row(batch, i), variance) for i in range(len(batch["labels"]))]
        return torch.cat([m for m, _ in rows]), torch.cat([c for _, c in rows])

    def _example_moments(self, example: Batch, variance: torch.Tensor):
        c = self.base.guide.posterior_mean()["C"].detach().clone().requires_grad_(True)
        model = poutine.condition(self.base.model, data={"C": c})
        logits, jacobian, offered = label_jacobian(
            lambda: model(example["input_ids"], example.get("attention_mask"),
                          choice_mask=example.get("choice_mask"), **readout_inputs(example)), [c])
        return logits, logit_covariance(jacobian, offered, variance, logits.shape[-1])

    @torch.no_grad()
    def predict(self, batch: Batch, num_samples: int) -> torch.Tensor:
        """The GLM predictive ``(batch, K)`` (``glm_samples`` logit draws; ``num_samples`` is not used);
        ``num_samples = 0`` gives the posterior-mean prediction."""
        if num_samples == 0:
            return self.base.predict(batch, 0)
        if self.posterior_scale is None:
            raise RuntimeError(f"{self.name}: call fit before predict (the posterior scale is not chosen yet)")
        mean, covariance = self.logit_moments(batch)
        return gaussian_softmax_mean(mean, self.posterior_scale ** 2 * covariance, self.glm_samples)

    def select_scale(self, collate: Callable[[list], Batch], grid: Sequence[float] = SCALE_GRID,
                     progress: bool = False) -> float:
        """The ``s`` of ``grid`` with the lowest NLL on ``val_examples`` (common random numbers: the same
        seed for every ``s``); sets and returns it."""
        batches = [collate(self.val_examples[i:i + SEARCH_BATCH]) for i in range(0, len(self.val_examples), SEARCH_BATCH)]
        moments = [self.logit_moments(b) for b in tqdm(batches, disable=not progress, desc="GLM Jacobians")]
        labels = torch.cat([b["labels"] for b in batches])
        for scale in grid:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                probs = torch.cat([gaussian_softmax_mean(m, scale ** 2 * c, self.glm_samples) for m, c in moments])
            self.selection[scale] = nll_metric(probs, labels)
        self.posterior_scale = min(self.selection, key=self.selection.get)
        return self.posterior_scale

    def adapter_state(self) -> int:
        return self.base.adapter_state()

    @property
    def units(self) -> list[PyroMethod]:
        return [self.base]

    def unit_dirs(self, run_dir) -> list[Path]:
        return self.base.unit_dirs(run_dir)

    def __repr__(self):
        return f"GLMPredictiveMethod(base={self.base!r}, posterior_scale={self.posterior_scale})"
