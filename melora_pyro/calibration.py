"""Temperature scaling (Guo et al., 2017): one temperature T fitted by NLL on held-out data.

    T = fit_temperature(val_probs, val_labels)      # probabilities (N, K) of any method, or logits
    test_probs = apply_temperature(test_probs, T)   # softmax(log p / T)

Scaling log-probabilities and scaling logits are the same map (``softmax`` ignores a per-row shift), so
both functions take either. Labels a question does not offer (probability exactly 0, logit ``-inf``)
stay at probability 0. T > 1 softens, T < 1 sharpens; the arg-max, hence the accuracy, never changes.
Fit T on a validation split, never on the data you report.
"""
from __future__ import annotations

import math

import torch

T_BOUNDS = (1e-2, 1e2)  # the search interval of T; a fit at a bound means the data ask for more


def _log_probs(scores: torch.Tensor) -> torch.Tensor:
    """``log p`` (float64) from probabilities (rows in [0, 1] summing to 1) or from logits."""
    scores = scores.detach().to(torch.float64)
    finite = scores[scores.isfinite()]
    is_probs = (finite.numel() == scores.numel() and bool((scores >= 0).all()) and bool((scores <= 1).all())
                and torch.allclose(scores.sum(-1), torch.ones_like(scores[..., 0]), atol=1e-4))
    if is_probs:
        return torch.where(scores > 0, scores.log(), torch.full_like(scores, -math.inf))
    return scores.log_softmax(-1)


def _check(scores: torch.Tensor, labels: torch.Tensor) -> None:
    if scores.dim() != 2 or labels.shape != (scores.shape[0],) or scores.shape[0] == 0:
        raise ValueError(f"expected scores (N, K) with N >= 1 and labels (N,), got {tuple(scores.shape)} "
                         f"and {tuple(labels.shape)}")
    if labels.min() < 0 or labels.max() >= scores.shape[1]:
        raise ValueError(f"labels must lie in [0, {scores.shape[1]}), got [{int(labels.min())}, {int(labels.max())}]")


def temperature_nll(scores: torch.Tensor, labels: torch.Tensor, temperature: float) -> float:
    """Mean NLL (nats) of ``labels`` under ``softmax(log p / temperature)``; ``scores`` as in the module."""
    _check(scores, labels)
    log_p = (_log_probs(scores) / temperature).log_softmax(-1)
    return -log_p.gather(1, labels.long()[:, None].to(log_p.device)).mean().item()


def fit_temperature(scores: torch.Tensor, labels: torch.Tensor, tol: float = 1e-6) -> float:
    """The temperature in ``T_BOUNDS`` minimising the mean NLL of ``labels`` (golden-section search).

    The NLL of ``softmax(beta z)`` is convex in ``beta = 1/T``, hence unimodal in ``log T``, so the search
    finds the global minimum to relative precision ``tol``. Args: ``scores`` (N, K) probabilities or
    logits of the validation examples, ``labels`` (N,). Raises ValueError for bad shapes or labels, or
    when a label has probability 0 (no temperature can fit it).
    """
    _check(scores, labels)
    log_p = _log_probs(scores)
    if not log_p.gather(1, labels.long()[:, None].to(log_p.device)).isfinite().all():
        raise ValueError("a validation label has probability 0 (or logit -inf): no temperature fits it")

    def objective(log_t: float) -> float:
        return temperature_nll(log_p, labels, math.exp(log_t))

    lo, hi = (math.log(b) for b in T_BOUNDS)
    ratio = (math.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = objective(a), objective(b)
    while hi - lo > tol:
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = objective(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = objective(b)
    return math.exp((lo + hi) / 2)


def apply_temperature(scores: torch.Tensor, temperature: float) -> torch.Tensor:
    """``softmax(log p / temperature)`` ``(N, K)`` in the dtype and on the device of ``scores``."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return (_log_probs(scores) / temperature).softmax(-1).to(dtype=scores.dtype)
