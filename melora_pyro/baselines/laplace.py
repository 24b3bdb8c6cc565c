"""Post-hoc diagonal Laplace approximation over the LoRA parameters A and B of a MAP adapter.

Our own implementation of Yang et al. (2024), "Bayesian low-rank adaptation for large language
models" (reference: ``run_gpt_laplace.py`` of github.com/adamxyang/laplace-lora, which calls
laplace-torch with ``hessian_structure="kron"`` and the GLM predictive), with a *diagonal* curvature
instead of their Kronecker-factored one. Why not laplace-torch: its KFAC backends hook ``nn.Linear``
modules holding the parameters, while our adapters are stacked tensors bound to the layers at each
forward (one Pyro site for all layers), so KFAC would need a per-layer rewrite of the adapters; and it
would add laplace-torch (and its backends) as a dependency for one baseline. The steps:

1. train plain LoRA by MAP (``theta* = (A, B)``, weight decay as the ``map`` method);
2. curvature: the diagonal of the generalised Gauss-Newton matrix of the training NLL,
   ``F = sum_n sum_k p_nk (d log p_nk / d theta)^2`` (exact for the categorical likelihood: it is the
   diagonal of ``J^T (diag p - p p^T) J``; K backward passes per example), or the empirical Fisher
   ``sum_n (d log p_{n, y_n} / d theta)^2`` (one backward pass per example). Over a capped subset of
   ``n`` of the ``N`` training examples it is scaled by ``N / n``;
3. prior ``theta ~ N(0, lambda^-1 I)``; the posterior is ``N(theta*, diag(1 / (F + lambda)))``;
4. ``lambda`` by (a) maximising the Laplace log marginal likelihood over a log-spaced grid,
   ``log Z(lambda) = log p(D | theta*) - lambda/2 |theta*|^2 + P/2 log lambda - 1/2 sum_i log(F_i + lambda)``
   (up to terms free of lambda), or (b) a grid search on validation NLL;
5. predictive, ``predictive="glm"`` (default, the reference's): the linearised model
   ``f(theta) ~ f(theta*) + J (theta - theta*)`` gives Gaussian label logits
   ``N(f(theta*), J Sigma J^T)`` per example, ``J`` ``(K, P)`` the Jacobian of the label logits (one
   backward pass per example and offered label), ``Sigma = diag(1 / (F + lambda))``; the probabilities
   are the mean softmax of ``glm_samples`` (100,000, as the reference) logit draws
   ``f + chol(J Sigma J^T + 1e-6 I) z``. ``predictive="weights"``: Monte Carlo in weight space, ``N``
   draws of ``theta ~ N(theta*, Sigma)``, each one forward pass, probabilities averaged.
"""
from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..config import FISHERS, PREDICTIVES
from ..glm import GLM_SAMPLES, gaussian_softmax_mean, label_jacobian, logit_covariance
from ..metrics import nll as nll_metric
from ..train import TrainConfig, evaluate
from .method import Batch, PointMethod, example_row

DEFAULT_GRID = tuple(10.0 ** (k / 4) for k in range(-24, 25))  # 1e-6 .. 1e6, 4 per decade


class LaplaceMethod:
    """Diagonal Laplace over the A, B stacks of a trained MAP adapter (module docstring).

    Args:
        map_method: the plain-LoRA MAP method whose A and B are approximated.
        prior_precision: ``"marglik"`` (default), ``"validation"`` (grid search on the NLL of
            ``val_examples``), or a fixed positive float.
        fisher: ``"ggn"`` (default, exact diagonal GGN) or ``"empirical"``.
        max_fisher_examples: cap on the training examples used for the curvature (a seeded subset),
            ``None`` for all.
        grid: prior precisions searched, log-spaced by default (1e-6 .. 1e6).
        val_examples: the validation set for ``prior_precision="validation"``.
        val_samples: Monte Carlo draws per candidate in the validation search (weight-space predictive).
        predictive: ``"glm"`` (default) or ``"weights"`` (module docstring).
        glm_samples: logit draws of the GLM predictive.

    After ``fit``: ``fisher`` (list of tensors shaped like the A and B stacks), ``prior_precision``
    (the chosen float) and ``selection`` (the criterion per grid point).
    """

    def __init__(self, map_method: PointMethod, prior_precision: str | float = "marglik",
                 fisher: str = "ggn", max_fisher_examples: int | None = None,
                 grid: Sequence[float] = DEFAULT_GRID, val_examples: Sequence | None = None,
                 val_samples: int = 4, predictive: str = "glm", glm_samples: int = GLM_SAMPLES,
                 name: str = "laplace"):
        if predictive not in PREDICTIVES:
            raise ValueError(f"predictive must be one of {PREDICTIVES}, got {predictive!r}")
        if fisher not in FISHERS:
            raise ValueError(f"fisher must be one of {FISHERS}, got {fisher!r}")
        if not (prior_precision in ("marglik", "validation")
                or (isinstance(prior_precision, (int, float)) and prior_precision > 0)):
            raise ValueError(f"prior_precision must be 'marglik', 'validation' or a positive number, "
                             f"got {prior_precision!r}")
        if prior_precision == "validation" and not val_examples:
            raise ValueError("prior_precision='validation' needs val_examples")
        self.map, self.name = map_method, name
        self.precision_rule, self.fisher_kind = prior_precision, fisher
        self.max_fisher_examples, self.grid = max_fisher_examples, tuple(float(g) for g in grid)
        self.val_examples, self.val_samples = val_examples, val_samples
        self.predictive, self.glm_samples = predictive, glm_samples
        self.fisher: list[torch.Tensor] | None = None
        self.prior_precision: float | None = None
        self.selection: dict[float, float] = {}

    @property
    def params(self) -> list[torch.Tensor]:
        """The A stacks ``(L_g, r, n)`` then the B stacks ``(L_g, m, r)`` of the MAP model."""
        return [*self.map.model.lora_A, *self.map.model.lora_B]

    def fit(self, examples: Sequence, collate: Callable[[list], Batch], train_config: TrainConfig,
            run_dir: str | Path | None = None, resume: bool = False, progress: bool = False) -> list[dict]:
        """MAP training by the shared loop, then the curvature and the prior precision."""
        history = self.map.fit(examples, collate, train_config, run_dir=run_dir, resume=resume, progress=progress)
        self.fit_posterior(examples, collate, progress=progress)
        return history

    def unit_dirs(self, run_dir) -> list[Path]:
        """Where the MAP adapter keeps its log and checkpoints: ``[run_dir]``."""
        return self.map.unit_dirs(run_dir)

    def fit_posterior(self, examples: Sequence, collate: Callable[[list], Batch], progress: bool = False) -> float:
        """Accumulate the curvature on ``examples`` and choose the prior precision; returns it."""
        self.fisher = self.fisher_diagonal(examples, collate, progress)
        rule = self.precision_rule
        if rule == "marglik":
            self.selection = {lam: self.log_marginal_likelihood(lam) for lam in self.grid}
            self.prior_precision = max(self.selection, key=self.selection.get)
        elif rule == "validation":
            self.selection = {lam: self.validation_nll(lam, collate) for lam in self.grid}
            self.prior_precision = min(self.selection, key=self.selection.get)
        else:
            self.prior_precision = float(rule)
        return self.prior_precision

    def fisher_diagonal(self, examples: Sequence, collate: Callable[[list], Batch],
                        progress: bool = False) -> list[torch.Tensor]:
        """Diagonal GGN (or empirical Fisher) of the summed NLL, shaped like ``params``, scaled to all of
        ``examples`` when a capped subset is used. One example per backward pass (per-example squares)."""
        chosen = list(range(len(examples)))
        if self.max_fisher_examples is not None and self.max_fisher_examples < len(examples):
            chosen = sorted(random.Random(0).sample(chosen, self.max_fisher_examples))
        params = self.params
        total = [torch.zeros_like(p) for p in params]
        for i in tqdm(chosen, desc="curvature", disable=not progress):
            batch = collate([examples[i]])
            log_p = self.map.mean_logits(batch).log_softmax(-1)[0]
            if self.fisher_kind == "empirical":
                weights = {int(batch["labels"][0]): 1.0}
            else:
                probs = log_p.detach().exp()
                weights = {k: float(probs[k]) for k in range(len(probs)) if probs[k] > 0}
            for n, (k, weight) in enumerate(weights.items()):
                grads = torch.autograd.grad(log_p[k], params, retain_graph=n + 1 < len(weights))
                for acc, g in zip(total, grads):
                    acc.add_(g.square(), alpha=weight)
        scale = len(examples) / len(chosen)
        return [acc.mul_(scale) for acc in total]

    def log_marginal_likelihood(self, prior_precision: float) -> float:
        """The Laplace log evidence up to terms free of the prior precision (module docstring)."""
        lam = float(prior_precision)
        params = [p.detach() for p in self.params]
        num = sum(p.numel() for p in params)
        sq_norm = sum(float(p.double().square().sum()) for p in params)
        log_det = sum(float((f.double() + lam).log().sum()) for f in self._require_fisher())
        return -0.5 * lam * sq_norm + 0.5 * num * math.log(lam) - 0.5 * log_det

    def posterior_std(self, prior_precision: float | None = None) -> list[torch.Tensor]:
        """``1 / sqrt(F + lambda)`` per parameter, shaped like ``params``."""
        lam = self.prior_precision if prior_precision is None else float(prior_precision)
        if lam is None:
            raise RuntimeError("no prior precision yet: call fit or fit_posterior first")
        return [(f + lam).rsqrt() for f in self._require_fisher()]

    def prior_held(self, fraction: float = 0.01) -> list[torch.Tensor]:
        """Bool masks shaped like ``params``: the entries whose curvature is below ``fraction`` of the prior
        precision, which the data leave at the prior (their std is ``1 / sqrt(lambda)`` within ``fraction / 2``)."""
        if self.prior_precision is None:
            raise RuntimeError("no prior precision yet: call fit or fit_posterior first")
        return [f < fraction * self.prior_precision for f in self._require_fisher()]

    @torch.no_grad()
    def predict_samples(self, batch: Batch, num_samples: int, prior_precision: float | None = None) -> torch.Tensor:
        """Label probabilities of ``num_samples`` posterior draws of (A, B), ``(num_samples, batch, K)``."""
        stds = self.posterior_std(prior_precision)
        draws = []
        for _ in range(num_samples):
            with _perturbed(self.params, stds):
                draws.append(self.map.predict(batch, 0))
        return torch.stack(draws)

    def glm_logits(self, batch: Batch, prior_precision: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The linearised predictive's label logits: mean ``(batch, K)`` (the MAP logits, ``-inf`` for
        labels not offered) and covariance ``J Sigma J^T`` ``(batch, K, K)`` (zero rows and columns for
        labels not offered)."""
        variance = torch.cat([std.square().flatten() for std in self.posterior_std(prior_precision)])
        mean, (covariance,) = self.glm_covariances(batch, [variance])
        return mean, covariance

    def glm_covariances(self, batch: Batch, variances: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``glm_logits`` for several diagonal covariances of the flattened ``params`` (each ``(P,)``, for
        example the posterior restricted to some layers) from one Jacobian per example: the mean
        ``(batch, K)`` and one ``(batch, K, K)`` covariance per entry of ``variances``."""
        rows = [self._example_glm_logits(example_row(batch, i), variances) for i in range(len(batch["labels"]))]
        return torch.cat([mean for mean, _ in rows]), [torch.cat(blocks) for blocks in zip(*(c for _, c in rows))]

    def _example_glm_logits(self, example: Batch, variances: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list]:
        """The mean ``(1, K)`` and a ``(1, K, K)`` covariance per variance of a one-example batch. One
        example per forward: each backward pass then costs one example, not the batch's (16x less work at
        batch 16)."""
        logits, jacobian, offered = label_jacobian(lambda: self.map.mean_logits(example), self.params)
        return logits, [logit_covariance(jacobian, offered, v, logits.shape[-1]) for v in variances]

    @torch.no_grad()
    def glm_predict(self, batch: Batch, prior_precision: float | None = None,
                    num_samples: int | None = None) -> torch.Tensor:
        """Mean softmax of ``num_samples`` (default ``glm_samples``) draws of the GLM logits, ``(batch, K)``."""
        return self.glm_sample_mean(*self.glm_logits(batch, prior_precision), num_samples)

    def glm_sample_mean(self, mean: torch.Tensor, covariance: torch.Tensor, num_samples: int | None = None) -> torch.Tensor:
        """Mean softmax of ``num_samples`` (default ``glm_samples``) draws of ``N(mean, covariance)`` logits
        (``(batch, K)``, ``(batch, K, K)``), ``(batch, K)`` (``glm.gaussian_softmax_mean``)."""
        return gaussian_softmax_mean(mean, covariance, num_samples or self.glm_samples)

    @torch.no_grad()
    def predict(self, batch: Batch, num_samples: int) -> torch.Tensor:
        """The predictive ``(batch, K)``: GLM (``glm_samples`` logit draws; ``num_samples`` is not used)
        or the mean of ``predict_samples``; ``num_samples = 0`` gives the MAP prediction."""
        if num_samples == 0:
            return self.map.predict(batch, 0)
        if self.predictive == "glm":
            return self.glm_predict(batch)
        return self.predict_samples(batch, num_samples).mean(0)

    def validation_nll(self, prior_precision: float, collate: Callable[[list], Batch]) -> float:
        """NLL of the Monte Carlo predictive on ``val_examples`` at ``prior_precision`` (fixed seed,
        so that the candidates are compared with common random numbers)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            predict = ((lambda b: self.glm_predict(b, prior_precision)) if self.predictive == "glm" else
                       (lambda b: self.predict_samples(b, self.val_samples, prior_precision).mean(0)))
            probs, labels = evaluate(predict, self.val_examples, collate, progress=False)
        return nll_metric(probs, labels)

    def adapter_state(self) -> int:
        """Trainable numbers of the MAP adapter; the curvature adds as many numbers again after training."""
        return self.map.adapter_state()

    @property
    def units(self) -> list[PointMethod]:
        return [self.map]

    def _require_fisher(self) -> list[torch.Tensor]:
        if self.fisher is None:
            raise RuntimeError("no curvature yet: call fit or fit_posterior first")
        return self.fisher


@contextmanager
def _perturbed(params: Sequence[torch.Tensor], stds: Sequence[torch.Tensor]):
    """Add ``std * N(0, 1)`` noise to each parameter in place; restore the values on exit."""
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, std in zip(params, stds):
            p.add_(torch.randn_like(p) * std)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, value in zip(params, saved):
                p.copy_(value)
