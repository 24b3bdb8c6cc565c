"""Reliability diagrams, rendered with matplotlib's Agg backend (no display, no pyplot state)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .metrics import ece, reliability_bins


def reliability_diagram(
    results: dict[str, tuple[torch.Tensor, torch.Tensor]],
    path: str | os.PathLike,
    title: str = "",
    n_bins: int = 15,
) -> Path:
    """Save a reliability diagram with one column of panels per method as a PNG.

    Args:
        results: method name -> ``(probs (N, K), labels (N,))``, as in :mod:`melora_pyro.metrics`.
        path: output PNG file; written atomically (temporary file in the same directory, then
            ``os.replace``), its parent directory created if needed.
        title: figure title.
        n_bins: equal-width confidence bins on (0, 1].

    Each column shows, on top, the accuracy per confidence bin (bars), the diagonal of perfect
    calibration, the gap between accuracy and the bin's mean confidence (hatched) and the ECE in the
    title; beneath, the fraction of examples per bin.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    if not results:
        raise ValueError("results is empty: nothing to plot")
    path = Path(path)
    width = 1.0 / n_bins
    left_edges = torch.arange(n_bins, dtype=torch.float64) * width

    fig = Figure(figsize=(3.2 * len(results), 4.4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, len(results), squeeze=False, sharex=True, height_ratios=(3, 1))
    for col, (name, (probs, labels)) in enumerate(results.items()):
        bins = reliability_bins(probs, labels, n_bins)
        filled = (bins.count > 0).numpy(force=True)
        x = left_edges.numpy()[filled]
        acc = bins.accuracy.numpy(force=True)[filled]
        conf = bins.confidence.numpy(force=True)[filled]

        top, bottom = axes[0, col], axes[1, col]
        top.bar(x, acc, width=width, align="edge", color="tab:blue", edgecolor="black", lw=0.5,
                label="accuracy")
        top.bar(x, conf - acc, bottom=acc, width=width, align="edge", color="tab:red", alpha=0.3,
                edgecolor="tab:red", hatch="//", lw=0.5, label="gap")
        top.plot([0, 1], [0, 1], ls="--", color="gray", lw=1)
        top.set(xlim=(0, 1), ylim=(0, 1), title=f"{name}\nECE = {ece(probs, labels, n_bins):.3f}")
        bottom.bar(left_edges.numpy(), (bins.count / bins.count.sum()).numpy(force=True), width=width,
                   align="edge", color="gray", edgecolor="black", lw=0.5)
        bottom.set(xlabel="confidence", ylim=(0, 1))
        if col == 0:
            top.set_ylabel("accuracy")
            bottom.set_ylabel("fraction")
            top.legend(loc="upper left", fontsize="small")
    if title:
        fig.suptitle(title)

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png", dpi=120)
        os.chmod(tmp, 0o644)  # mkstemp creates the file private (0600)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path
