"""Classification metrics on predictive probabilities: accuracy, ECE, NLL, Brier.

Every function takes ``probs``, a float tensor (N, K) whose rows sum to 1, and ``labels``, an integer
tensor (N,) with values in [0, K). Computation is in float64 on the inputs' device.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

_EPS = 1e-12  # probability floor for the log in nll


class ReliabilityBins(NamedTuple):
    """Per-bin statistics over equal-width confidence bins; each field is a float64 tensor (n_bins,).

    Bin b covers confidences (b / n_bins, (b + 1) / n_bins]. Empty bins hold zeros.
    """

    confidence: torch.Tensor  # mean max-probability of the bin's rows
    accuracy: torch.Tensor  # fraction of the bin's rows predicted correctly
    count: torch.Tensor  # number of rows in the bin


def _validate(probs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Check shapes and label range; return ``(probs as float64, labels on probs' device)``."""
    if probs.dim() != 2 or labels.dim() != 1 or probs.shape[0] != labels.shape[0]:
        raise ValueError(
            f"expected probs (N, K) and labels (N,), got probs {tuple(probs.shape)} "
            f"and labels {tuple(labels.shape)}"
        )
    if probs.numel() == 0:
        raise ValueError(f"empty input: probs {tuple(probs.shape)}")
    labels = labels.to(device=probs.device, dtype=torch.long)
    if labels.min() < 0 or labels.max() >= probs.shape[1]:
        raise ValueError(
            f"labels must lie in [0, {probs.shape[1]}), "
            f"got values in [{labels.min().item()}, {labels.max().item()}]"
        )
    return probs.detach().to(torch.float64), labels


def accuracy(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of rows whose arg-max class equals the label (ties go to the lowest index)."""
    probs, labels = _validate(probs, labels)
    return (probs.argmax(dim=1) == labels).double().mean().item()


def reliability_bins(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> ReliabilityBins:
    """Bin rows by confidence (max probability) into ``n_bins`` equal-width, right-closed bins on (0, 1].

    Confidence exactly 1 falls in the last bin.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    probs, labels = _validate(probs, labels)
    conf, pred = probs.max(dim=1)
    correct = (pred == labels).double()
    inner_edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64, device=probs.device)[1:-1]
    # right=False: bin b holds edges[b] < conf <= edges[b + 1].
    idx = torch.bucketize(conf, inner_edges, right=False)
    zeros = torch.zeros(n_bins, dtype=torch.float64, device=probs.device)
    count = zeros.index_add(0, idx, torch.ones_like(conf))
    conf_sum = zeros.index_add(0, idx, conf)
    correct_sum = zeros.index_add(0, idx, correct)
    denom = count.clamp_min(1)
    return ReliabilityBins(conf_sum / denom, correct_sum / denom, count)


def ece(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> float:
    """Expected calibration error in [0, 1]: sum over bins of ``count / N * |accuracy - confidence|``."""
    bins = reliability_bins(probs, labels, n_bins)
    weights = bins.count / bins.count.sum()
    return (weights * (bins.accuracy - bins.confidence).abs()).sum().item()


def nll(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean negative log-likelihood of the labels in nats; probabilities are floored at 1e-12."""
    probs, labels = _validate(probs, labels)
    p_label = probs.gather(1, labels[:, None]).squeeze(1)
    return -p_label.clamp_min(_EPS).log().mean().item()


def brier(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean over rows of ``sum_k (p_k - onehot_k)^2`` (in [0, 2])."""
    probs, labels = _validate(probs, labels)
    onehot = torch.nn.functional.one_hot(labels, probs.shape[1]).double()
    return (probs - onehot).pow(2).sum(dim=1).mean().item()


def summarize(probs: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """All four metrics: ``{"acc", "ece", "nll", "brier"}`` (ECE with 15 bins)."""
    return {name: metric(probs, labels) for name, metric in METRICS.items()}


METRICS = {"acc": accuracy, "ece": ece, "nll": nll, "brier": brier}


def bootstrap_ci(metric, probs, labels: torch.Tensor, other=None,
                 num_resamples: int = 1000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of ``metric(probs, labels)`` over questions; with ``other`` (the
    probabilities of a second method on the same questions) the CI of the paired difference
    ``metric(probs) - metric(other)``, both computed on the same resampled questions.

    ``probs`` (and ``other``) may also be a list of ``(N, K)`` tensors, e.g. one per seed: the
    statistic is then the mean of ``metric`` over the list, every member resampled alike."""
    generator = torch.Generator().manual_seed(seed)
    n = labels.shape[0]

    def value_of(p, index):
        members = p if isinstance(p, (list, tuple)) else [p]
        return sum(metric(m[index], labels[index]) for m in members) / len(members)

    values = []
    for _ in range(num_resamples):
        index = torch.randint(n, (n,), generator=generator)
        value = value_of(probs, index)
        if other is not None:
            value -= value_of(other, index)
        values.append(value)
    values = torch.tensor(values, dtype=torch.float64)
    tail = (1 - level) / 2
    return float(values.quantile(tail)), float(values.quantile(1 - tail))
