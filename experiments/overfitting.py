"""The regime where point estimates overfit (BLoB's: a small training set, many epochs), CPU profile.

    python -m experiments.overfitting --data-dir ../shared/data [--root runs/overfitting] [--jobs 1]

OpenBookQA (``char`` cloze scoring, the dataset with signal whose zero-shot model is already near
calibrated), a seeded 500-question subset of its train split, seed 0, MAP and Me-LoRA trained for 1, 2, 4
and 8 epochs (``EPOCHS``, fixed before any run), each scored on the full test split; ``map-ts`` /
``melora-ts`` score the same runs again with one temperature fitted on the dev split. Nothing is
chosen from the test numbers. Every cell is one ``melora-pyro train`` run (``melora_pyro.grid``),
resumable; finished cells are kept in ``results/overfitting_obqa_cells/`` (``grid.archive_cells``), and it
writes ``results/overfitting_obqa.{md,json,png}``: ACC / ECE / NLL per epoch count and the
95% paired-bootstrap CIs of Me-LoRA - MAP and Me-LoRA - MAP+TS at each.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from melora_pyro._atomic import atomic_write_text
from melora_pyro.grid import Cell, GridError, archive_cells, cell_cost, is_done, read_cell, run_grid
from melora_pyro.metrics import METRICS, bootstrap_ci

from .grids import temperature_cell, train_flags

DATASET, TRAIN_LIMIT, SEED = "obqa", 500, 0
EPOCHS = (1, 2, 4, 8)
METHODS = ("map", "map-ts", "melora", "melora-ts")
PAIRS = (("melora", "map"), ("melora", "map-ts"), ("melora-ts", "map-ts"))


def cells(data_dir: str) -> list[Cell]:
    """Per epoch count: the MAP and Me-LoRA runs, then their temperature-scaled scorings."""
    grid = []
    for epochs in EPOCHS:
        for method in ("map", "melora"):
            trained = Cell(f"{method}-{epochs}ep", train_flags(method, DATASET, data_dir, epochs, seed=SEED,
                                                             train_limit=TRAIN_LIMIT))
            grid += [trained, temperature_cell(trained, f"{method}-ts-{epochs}ep")]
    return grid


def report(grid: list[Cell], root: Path, out: Path, archive=None) -> str:
    results, doc, cpu = {}, {"cells": {}, "differences": {}}, 0.0
    for cell in grid:
        if is_done(cell, root, archive):
            method, epochs = cell.name.rsplit("-", 1)
            results[(method, int(epochs[:-2]))] = read_cell(cell, root, archive)
            cpu += (cell_cost(cell, root, archive) or {}).get("cpu_s", 0.0)
    lines = [f"# Overfitting regime: OBQA, {TRAIN_LIMIT} training questions, 1-8 epochs (CPU profile, seed {SEED})",
             "", "Command: `python -m experiments.overfitting --data-dir ../shared/data`", "",
             f"SmolLM2-135M, `char` cloze scoring, a seeded {TRAIN_LIMIT}-question subset of the OBQA train split, "
             "the profile of the comparison otherwise (top-2 layers + lm_head over the prefix cache, lr 3e-4, "
             "batch 8); the epoch counts were fixed before any run. Test: the full split (500 questions); "
             "temperatures (-ts) fitted on the dev split.", "",
             "| epochs | method | ACC | ECE | NLL | temperature |", "|---|---|---|---|---|---|"]
    for epochs in EPOCHS:
        for method in METHODS:
            if (method, epochs) not in results:
                continue
            probs, labels, metrics = results[(method, epochs)]
            doc["cells"][f"{method}-{epochs}ep"] = metrics
            t = f"{metrics['temperature']:.2f}" if "temperature" in metrics else ""
            lines.append(f"| {epochs} | {method} | {metrics['acc']:.4f} | {metrics['ece']:.4f} | "
                         f"{metrics['nll']:.4f} | {t} |")
    lines += ["", "Paired differences on the same test questions, 95% bootstrap CIs (a CI that excludes 0 "
              "resolves the difference):", "", "| epochs | difference | " +
              " | ".join(f"Δ {k.upper()}" for k in METRICS) + " |", "|---|---|" + "---|" * len(METRICS)]
    for epochs in EPOCHS:
        for a, b in PAIRS:
            if (a, epochs) not in results or (b, epochs) not in results:
                continue
            pa, labels, _ = results[(a, epochs)]
            pb = results[(b, epochs)][0]
            row = []
            for key, metric in METRICS.items():
                diff = metric(pa, labels) - metric(pb, labels)
                lo, hi = bootstrap_ci(metric, pa, labels, pb)
                row.append(f"{diff:+.4f} [{lo:+.4f}, {hi:+.4f}]")
                doc["differences"][f"{epochs}ep {a} - {b} {key}"] = [diff, lo, hi]
            lines.append(f"| {epochs} | {a} - {b} | " + " | ".join(row) + " |")
    lines += ["", f"Plot: `{out.name}.png`. Total CPU time of the cells (user + system): {cpu / 60:.1f} min.", "",
              "Each cell's command:", ""]
    lines += [f"- `{c.name}`: `{c.command(root)}`" for c in grid if is_done(c, root, archive)]
    out.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join(lines) + "\n"
    atomic_write_text(out.with_suffix(".md"), text)
    atomic_write_text(out.with_suffix(".json"), json.dumps(doc, indent=2))
    if results:
        _plot(results, out.with_suffix(".png"))
    return text


def _plot(results: dict, path: Path) -> None:
    """ACC, ECE and NLL against epochs, one line per method."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 3.2))
    for i, key in enumerate(("acc", "ece", "nll")):
        ax = figure.add_subplot(1, 3, i + 1)
        for method in METHODS:
            points = [(e, results[(method, e)][2][key]) for e in EPOCHS if (method, e) in results]
            if points:
                ax.plot(*zip(*points), marker="o", label=method, linestyle="--" if method.endswith("-ts") else "-")
        ax.set_xscale("log", base=2)
        ax.set_xticks(EPOCHS, [str(e) for e in EPOCHS])
        ax.set_xlabel("epochs")
        ax.set_title(f"test {key.upper()} {'↑' if key == 'acc' else '↓'}")
        ax.grid(alpha=0.3)
    figure.axes[0].legend(fontsize=7)
    figure.tight_layout()
    FigureCanvasAgg(figure).print_png(str(path))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--root", default="runs/overfitting", help="where the run directories go")
    parser.add_argument("--out", default=f"results/overfitting_{DATASET}")
    parser.add_argument("--archive", help="where finished cells are kept (default <out>_cells)")
    parser.add_argument("--jobs", type=int, default=1, help="cells run at once (the CPU threads are split)")
    parser.add_argument("--threads", type=int, help="CPU threads per run (default: the cores / --jobs)")
    parser.add_argument("--report-only", action="store_true", help="write the tables from the finished cells")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # the cells run as subprocesses; the bootstrap is tiny ops
    grid, archive = cells(args.data_dir), args.archive or f"{args.out}_cells"
    try:
        status = {} if args.report_only else run_grid(grid, args.root, jobs=args.jobs, threads=args.threads,
                                                      archive=archive)
    except GridError as e:  # another grid holds the root
        print(f"error: {e}", file=sys.stderr)
        return 2
    archive_cells(grid, args.root, archive)  # what the table is rebuilt from when the run directories are gone
    print(report(grid, Path(args.root), Path(args.out), archive))
    return 1 if any(v != "done" for v in status.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
