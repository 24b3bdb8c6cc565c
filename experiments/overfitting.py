"""The regime where point estimates overfit (BLoB's: a small training set, many epochs), CPU profile.

    python -m experiments.overfitting --data-dir ../shared/data [--dataset obqa] [--seeds 0 1 2]
        [--methods map melora melora-kl0.1-pairs melora-pairs blob laplace] [--epochs 1 2 4 8]
        [--root runs/overfitting/<dataset>]

OpenBookQA by default (``char`` cloze scoring, the dataset with signal whose zero-shot model is already near
calibrated; ``--dataset arc-e`` runs the same design on ARC-Easy), a 500-question subset of its train split
(drawn with the run's seed, so each seed trains on its own subset, the same for every method), MAP and
Me-LoRA (and the baselines BLoB and Laplace-LoRA, ``--methods``) trained for 1, 2, 4 and 8 epochs (``EPOCHS``, fixed before any run), each scored on the full test split; ``<method>-ts`` scores the same
run again with one temperature fitted on the dev split, and ``melora-glm`` scores the ``melora`` run with
q(C) linearised (``--predictive glm``), its width chosen by NLL on the dev split. ``melora`` keeps the settings these cells first ran
with (one draw of C, KL weight 1); ``melora-kl0.1-pairs`` is Me-LoRA with the defaults the dev sweep chose
later (KL weight 0.1, antithetic pairs) and ``melora-pairs`` changes only the draws (``grids.OPTION_VARIANTS``);
``blob`` and ``laplace`` run with the comparison's settings for them; ``--methods`` picks which trained methods run. Nothing is chosen from the test numbers. Every cell is one ``melora-pyro train`` run (``melora_pyro.grid``), resumable; finished cells are
kept in ``results/overfitting_<dataset>_cells/`` (``grid.archive_cells``), and it writes
``results/overfitting_<dataset>.{md,json,png}``: per epoch count, ACC / ECE / NLL as mean ± std over the seeds
and the 95% paired-bootstrap CIs of the seed-mean differences Me-LoRA - MAP and Me-LoRA - MAP+TS.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import torch

from melora_pyro._atomic import atomic_write_text
from melora_pyro.grid import Cell, GridError, archive_cells, cell_cost, is_done, read_cell, run_grid

from . import out_file
from .grids import (BATCH_SIZE, NORMALIZATION, OPTION_VARIANTS, difference_table, glm_cell, method_table, temperature_cell,
                    train_flags)

DATASETS, TRAIN_LIMIT = ("obqa", "arc-e"), 500
EPOCHS = (1, 2, 4, 8)
ALL_SEEDS = (0, 1, 2)
TRAINED = ("map", "melora", "melora-kl0.1-pairs", "melora-pairs", "blob", "laplace")
GLM_METHODS = ("melora",)  # also scored with q(C) linearised, its width chosen on dev (cells <method>-glm)
METHODS = tuple(m for trained in TRAINED for m in (trained, f"{trained}-ts", *[f"{trained}-glm"] * (trained in GLM_METHODS)))
PAIRS = (("melora", "map"), ("melora", "map-ts"), ("melora-ts", "map-ts"),
         ("melora-glm", "map"), ("melora-glm", "map-ts"), ("melora-glm", "melora-ts"), ("melora-glm", "laplace"),
         *((variant, reference) for variant in TRAINED[2:] for reference in ("map", "map-ts", "melora")),
         *((f"{variant}-ts", "map-ts") for variant in TRAINED[2:]))


def cells(data_dir: str, seeds=(0,), methods=TRAINED, epoch_counts=EPOCHS, dataset: str = DATASETS[0]) -> list[Cell]:
    """Per seed and epoch count: the runs of ``methods`` (of ``TRAINED``), each followed by its
    temperature-scaled scoring (cells ``<method>[-ts]-<epochs>ep-s<seed>``) and, for ``GLM_METHODS``, its
    GLM-predictive scoring (``<method>-glm-<epochs>ep-s<seed>``)."""
    grid = []
    for seed in seeds:
        for epochs in epoch_counts:
            for method in methods:
                runs, extra = OPTION_VARIANTS.get(method, (method, ()))
                trained = Cell(f"{method}-{epochs}ep-s{seed}", train_flags(runs, dataset, data_dir, epochs, seed=seed,
                                                                         extra=extra, train_limit=TRAIN_LIMIT))
                grid += [trained, temperature_cell(trained, f"{method}-ts-{epochs}ep-s{seed}")]
                if method in GLM_METHODS:
                    grid.append(glm_cell(trained, f"{method}-glm-{epochs}ep-s{seed}"))
    return grid


def report(grid: list[Cell], root: Path, out: Path, archive=None, dataset: str = DATASETS[0]) -> str:
    """Write ``out.{md,json,png}`` from the done cells of ``grid`` (``dataset``'s): one section per epoch count."""
    by_epochs: dict[int, dict[str, list]] = {e: {} for e in EPOCHS}
    cpu, seeds, trained = 0.0, set(), set()
    for cell in grid:
        if is_done(cell, root, archive):
            method, epochs, seed = cell.name.rsplit("-", 2)
            probs, labels, metrics = read_cell(cell, root, archive)
            by_epochs[int(epochs[:-2])].setdefault(method, []).append((cell, probs, labels, metrics))
            cpu += (cell_cost(cell, root, archive) or {}).get("cpu_s", 0.0)
            seeds.add(int(seed[1:]))
            trained.add(method.removesuffix("-ts").removesuffix("-glm"))
    n_test = len(next(r for by_method in by_epochs.values() for rows in by_method.values() for r in rows)[2]) \
        if any(by_epochs.values()) else 0
    lines = [f"# Overfitting regime: {dataset}, {TRAIN_LIMIT} training questions, 1-8 epochs (CPU profile, "
             f"seeds {', '.join(map(str, sorted(seeds)))})", "",
             f"Command: `python -m experiments.overfitting --data-dir ../shared/data --dataset {dataset} --seeds "
             f"{' '.join(map(str, sorted(seeds)))} --methods {' '.join(m for m in TRAINED if m in trained)}` "
             "(each cell's own command below)", "",
             f"SmolLM2-135M, `{NORMALIZATION.get(dataset, 'sum')}` cloze scoring, a {TRAIN_LIMIT}-question subset "
             f"of the {dataset} train split drawn "
             "with each run's seed (every method of a seed trains on the same one), the profile of the "
             "comparison otherwise (top-2 layers + lm_head over the prefix cache, lr 3e-4, batch 8); the epoch "
             f"counts were fixed before any run. Test: the full split ({n_test} questions); temperatures (-ts) "
             "and the GLM predictive's posterior scale (-glm) fitted on the dev split. Mean ± std over the seeds.",
             ""]
    doc = {}
    for epochs, by_method in by_epochs.items():
        if not by_method:
            continue
        labels = next(iter(by_method.values()))[0][2]
        doc[f"{epochs}ep"] = {}
        lines += [f"## {epochs} epoch{'s' * (epochs > 1)} ({math.ceil(TRAIN_LIMIT * epochs / BATCH_SIZE)} steps)", ""]
        lines += method_table(by_method, METHODS, doc[f"{epochs}ep"])
        lines += difference_table(by_method, PAIRS, labels, doc[f"{epochs}ep"])
        lines += _scale_table(by_method)
    lines += [f"Plot: `{out.name}.png` (mean over seeds, bars: ± std). Total CPU time of the cells "
              f"(user + system): {cpu / 60:.1f} min.", "", "Each cell's command:", ""]
    lines += [f"- `{c.name}`: `{c.command(root)}`" for c in grid if is_done(c, root, archive)]
    out.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join(lines) + "\n"
    atomic_write_text(out_file(out, ".md"), text)
    atomic_write_text(out_file(out, ".json"), json.dumps(doc, indent=2))
    if any(by_epochs.values()):
        _plot(by_epochs, out_file(out, ".png"))
    return text


def _scale_table(by_method: dict) -> list[str]:
    """Dev NLL of each candidate posterior scale of the ``-glm`` cells, one column per seed (the scale
    each chose in bold); [] without such cells."""
    runs = [(cell, metrics) for method, rows in sorted(by_method.items()) if method.endswith("-glm")
            for cell, _, _, metrics in rows if "validation_nll_by_scale" in metrics]
    if not runs:
        return []
    lines = ["GLM predictive (q(C) linearised, its std times the scale s): dev NLL by s, the chosen s in bold "
             "(s = 1 is the trained posterior).", "",
             "| s | " + " | ".join(cell.name for cell, _ in runs) + " |", "|---|" + "---|" * len(runs)]
    for scale in runs[0][1]["validation_nll_by_scale"]:
        cells = [(f"**{m['validation_nll_by_scale'][scale]:.4f}**" if float(scale) == float(f"{m['posterior_scale']:g}")
                  else f"{m['validation_nll_by_scale'][scale]:.4f}") for _, m in runs]
        lines.append(f"| {scale} | " + " | ".join(cells) + " |")
    return lines + [""]


def _plot(by_epochs: dict, path: Path) -> None:
    """ACC, ECE and NLL against epochs, one line per method: the mean over seeds, bars ± their std."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 3.2))
    for i, key in enumerate(("acc", "ece", "nll")):
        ax = figure.add_subplot(1, 3, i + 1)
        for method in METHODS:
            points = [(e, [r[3][key] for r in by_epochs[e][method]]) for e in EPOCHS if method in by_epochs[e]]
            if points:
                ax.errorbar([e for e, _ in points], [statistics.mean(v) for _, v in points],
                            yerr=[statistics.stdev(v) if len(v) > 1 else 0.0 for _, v in points], marker="o",
                            capsize=3, label=method, linestyle="--" if method.endswith("-ts") else ":" if method.endswith("-glm") else "-")
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
    parser.add_argument("--dataset", default=DATASETS[0], choices=DATASETS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(TRAINED[:2]), choices=TRAINED,
                        help="the trained methods to run (each with its -ts scoring)")
    parser.add_argument("--epochs", nargs="+", type=int, default=list(EPOCHS), choices=EPOCHS,
                        help="the epoch counts to run")
    parser.add_argument("--root", help="where the run directories go (default runs/overfitting/<dataset>)")
    parser.add_argument("--out", help="the results' path without suffix (default results/overfitting_<dataset>)")
    parser.add_argument("--archive", help="where finished cells are kept (default <out>_cells)")
    parser.add_argument("--jobs", type=int, default=1, help="cells run at once (the CPU threads are split)")
    parser.add_argument("--threads", type=int, help="CPU threads per run (default: the cores / --jobs)")
    parser.add_argument("--report-only", action="store_true", help="write the tables from the finished cells")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # the cells run as subprocesses; the bootstrap is tiny ops
    root, out = args.root or f"runs/overfitting/{args.dataset}", args.out or f"results/overfitting_{args.dataset}"
    grid = cells(args.data_dir, args.seeds, args.methods, args.epochs, args.dataset)
    archive = args.archive or f"{out}_cells"
    try:
        status = {} if args.report_only else run_grid(grid, root, jobs=args.jobs, threads=args.threads,
                                                      archive=archive)
    except GridError as e:  # another grid holds the root
        print(f"error: {e}", file=sys.stderr)
        return 2
    every = cells(args.data_dir, ALL_SEEDS, dataset=args.dataset)  # every seed finished, whichever this call ran
    archive_cells(every, root, archive)  # what the table is rebuilt from when the run directories are gone
    print(report(every, Path(root), Path(out), archive, args.dataset))
    return 1 if any(v != "done" for v in status.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
