"""The powered comparison (issue 11 item 5), CPU profile (``experiments.grids``): full test splits.

    python -m experiments.comparison --data-dir ../shared/data [--jobs 2] [--datasets arc-e arc-c]
        [--seeds 0 1 2] [--methods zero-shot map map-ts blob melora] [--root runs/comparison]
    python -m experiments.comparison --data-dir ../shared/data --seeds 0 --methods mle mcdropout ensemble
    python -m experiments.comparison --data-dir ../shared/data --profile gpu --jobs 4   # on a GPU machine

Every cell is one ``melora-pyro train`` run (``melora_pyro.grid``), 1 epoch of the full train split;
``map-ts`` / ``melora-ts`` score the ``map`` / ``melora`` run of the same seed again with one temperature
fitted on the dev split (``melora-pyro evaluate --temperature-scale``), so they cost no training; on a
dataset without a dev split ``map-ts`` is its own run holding out 10% of train, and ``melora-ts`` is
not run. Each finished cell's metrics, predictions and cost are copied to ``results/comparison_<profile>_cells/``
(``grid.archive_cells``): the tables are rebuilt from there, and rerunning skips the cells found there or
in the run directories, and resumes stopped ones. Writes ``results/comparison_cpu.{md,json}``:
mean ± std over seeds per method, and 95% paired-bootstrap CIs (1,000 resamples of the test questions,
each resample applied to every seed) of the seed-mean differences Me-LoRA - MAP and Me-LoRA - MAP+TS;
the Me-LoRA variants (``VARIANTS``) in an ablation table of their own, against Me-LoRA.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from melora_pyro import data
from melora_pyro._atomic import atomic_write_text
from melora_pyro.grid import Cell, GridError, archive_cells, cell_cost, is_done, read_cell, run_grid
from melora_pyro.plots import reliability_diagram

from . import out_file
from .grids import OPTION_VARIANTS, PROFILES, difference_table, method_table, signal_line, temperature_cell, train_flags

METHODS = ("zero-shot", "mle", "map", "map-ts", "mcdropout", "ensemble", "laplace", "blob", "melora", "melora-ts")
VARIANTS = ("melora-elementwise", "melora-diag", "melora-flipout", "blob-adamw", "melora-kl0.1-pairs",
            "melora-kl0.1-pairs-ts")  # the ablation table
ABLATION_ORDER = ("melora", "melora-elementwise", "melora-diag", "melora-flipout", "melora-kl0.1-pairs",
                  "melora-kl0.1-pairs-ts", "map", "map-ts", "blob", "blob-adamw")
PAIRS = (("melora", "map"), ("melora", "map-ts"), ("melora-ts", "map-ts"), ("blob", "map"), ("map", "zero-shot"),
         ("mle", "map"), ("mcdropout", "map"), ("ensemble", "map"), ("laplace", "map"), ("laplace", "map-ts"),
         ("melora", "laplace"))
ABLATION_PAIRS = (("melora-elementwise", "melora"), ("melora-diag", "melora"), ("melora-flipout", "melora"),
                  ("melora-kl0.1-pairs", "melora"), ("melora-kl0.1-pairs", "map"), ("melora-kl0.1-pairs", "map-ts"),
                  ("melora-kl0.1-pairs-ts", "map-ts"), ("blob-adamw", "blob"))
SCALED = {"map-ts": "map", "melora-ts": "melora",  # a temperature on top of which trained run
          "melora-kl0.1-pairs-ts": "melora-kl0.1-pairs"}
DATASETS = ("arc-e", "arc-c", "obqa", "wg-s", "boolq")
PRIORITY = ("zero-shot", "map", "map-ts", "blob", "melora", "melora-ts")  # the first grid, 3 seeds


def cells(datasets, methods, seeds, data_dir: str, profile: str = "cpu") -> list[Cell]:
    """The grid in the order it runs: per seed, per dataset, per method."""
    grid = []
    for dataset in datasets:
        if "zero-shot" in methods:
            grid.append(Cell(f"{dataset}/zero-shot", train_flags("zero-shot", dataset, data_dir, profile=profile)))
    for seed in seeds:
        for dataset in datasets:
            for method in methods:
                if method == "zero-shot":
                    continue
                has_dev = "validation" in data.DATASETS[dataset].splits
                if method in SCALED and not has_dev and method != "map-ts":
                    continue  # a temperature on a hold-out of train needs its own training: map-ts only
                trained = SCALED.get(method, method) if has_dev else method
                runs, extra = OPTION_VARIANTS.get(trained, (trained, ()))
                cell = Cell(f"{dataset}/{trained}-s{seed}",
                            train_flags(runs, dataset, data_dir, seed=seed, extra=extra, profile=profile))
                grid.append(temperature_cell(cell, f"{dataset}/{method}-s{seed}") if trained != method else cell)
    return grid


def all_cells(datasets, data_dir: str, profile: str = "cpu", seeds=(0, 1, 2)) -> list[Cell]:
    """Every cell the tables can show (each method and variant at each seed): the report shows those done."""
    return cells(datasets, METHODS + VARIANTS, seeds, data_dir, profile)


def method_of(cell: Cell) -> str:
    name = cell.name.split("/")[1]
    return name.rsplit("-s", 1)[0] if name != "zero-shot" else name


def report(grid: list[Cell], root: Path, out: Path, datasets, profile: str = "cpu", archive=None,
           data_dir: str | None = None) -> str:
    """Write ``out.{md,json}`` from the done cells of ``grid``; with ``data_dir``, each dataset's table
    opens with its signal check (chance, and the ACC CIs of zero-shot and MAP)."""
    where = "top-2 layers + lm_head over the prefix cache" if profile == "cpu" else "every layer + lm_head"
    lines = [f"# Powered comparison, {profile} profile (SmolLM2-135M, {where}, cloze)", "",
             f"Command: `python -m experiments.comparison --data-dir ../shared/data --profile {profile}`", "",
             f"1 epoch of the full train split, lr 3e-4, batch 8; {PROFILES[profile][1]} posterior samples (blob, melora); "
             "temperatures fitted on the dev split, never on test (a 10% hold-out of train where a dataset "
             "has no dev split). Mean ± std over the seeds listed; zero-shot is deterministic (one run).", ""]
    doc, total_cpu = {}, 0.0
    for dataset in datasets:
        done = [c for c in grid if c.name.startswith(f"{dataset}/") and is_done(c, root, archive)]
        if not done:
            continue
        by_method: dict[str, list] = {}
        for cell in done:
            probs, labels, metrics = read_cell(cell, root, archive)
            by_method.setdefault(method_of(cell), []).append((cell, probs, labels, metrics))
            total_cpu += (cell_cost(cell, root, archive) or {}).get("cpu_s", 0.0)
        labels = next(iter(by_method.values()))[0][2]
        doc[dataset] = {}
        lines += [f"## {dataset} test (n = {len(labels)})", ""]
        if "validation" not in data.DATASETS[dataset].splits:
            lines += [f"{dataset} has no dev split: map-ts fits its temperature on a seeded 10% hold-out of train "
                      "(and trains on the other 90%).", ""]
        if data_dir is not None:
            lines += [signal_line(by_method, labels, dataset, data_dir, doc[dataset]), ""]
        lines += method_table(by_method, METHODS, doc[dataset])
        lines += difference_table(by_method, PAIRS, labels, doc[dataset])
        if any(m in by_method for m in VARIANTS):
            lines += ["### Ablation: Me-LoRA and BLoB variants", ""]
            lines += method_table(by_method, ABLATION_ORDER, doc[dataset])
            lines += difference_table(by_method, ABLATION_PAIRS, labels, doc[dataset])
        first = {m: (runs[0][1], labels) for m, runs in by_method.items() if m not in VARIANTS}
        reliability_diagram(first, out.parent / f"{out.name}_{dataset}.png", title=f"{dataset} test (first seed)")
        lines += ["", f"Reliability diagram (first seed of each method): `{out.name}_{dataset}.png`", ""]
    lines += [f"Total CPU time of the cells run (user + system): {total_cpu / 3600:.2f} h.", "",
              "Each cell's command:", ""]
    lines += [f"- `{c.name}`: `{c.command(root)}`" for c in grid if is_done(c, root, archive)]
    text = "\n".join(lines) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_file(out, ".md"), text)
    atomic_write_text(out_file(out, ".json"), json.dumps(doc, indent=2))
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--datasets", nargs="+", default=["arc-e", "arc-c"], choices=DATASETS)
    parser.add_argument("--methods", nargs="+", default=list(PRIORITY), choices=METHODS + VARIANTS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--profile", default="cpu", choices=("cpu", "gpu"),
                        help="cpu: top-2 layers + lm_head over the prefix cache; gpu: every layer, on CUDA")
    parser.add_argument("--root", help="where the run directories go (default runs/comparison[-gpu])")
    parser.add_argument("--jobs", type=int, default=1, help="cells run at once (the CPU threads are split)")
    parser.add_argument("--threads", type=int, help="CPU threads per run (default: the cores / --jobs)")
    parser.add_argument("--out", help="default results/comparison_<profile>")
    parser.add_argument("--archive", help="where finished cells are kept (default <out>_cells)")
    parser.add_argument("--report-only", action="store_true", help="write the tables from the finished cells")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # the cells run as subprocesses; the report's bootstrap is tiny ops, slowed by threads
    root = args.root or ("runs/comparison" if args.profile == "cpu" else f"runs/comparison-{args.profile}")
    out = args.out or f"results/comparison_{args.profile}"
    archive = args.archive or f"{out}_cells"
    grid = cells(args.datasets, args.methods, args.seeds, args.data_dir, args.profile)  # the CLI makes it absolute
    try:
        status = {} if args.report_only else run_grid(grid, root, jobs=args.jobs, threads=args.threads, archive=archive)
    except GridError as e:  # another grid holds the root
        print(f"error: {e}", file=sys.stderr)
        return 2
    every = all_cells(DATASETS, args.data_dir, args.profile)
    archive_cells(every, root, archive)  # every finished cell, whichever this call asked for
    print(report(every, Path(root), Path(out), DATASETS, args.profile, archive, data_dir=args.data_dir))
    return 1 if any(v != "done" for v in status.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
