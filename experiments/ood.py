"""Out-of-distribution calibration (BLoB's table): train on OBQA, score ARC-C, ARC-E, MMLU chemistry and physics.

    python -m experiments.ood --data-dir ../shared/data [--seeds 0] [--methods zero-shot map map-ts melora melora-ts]
        [--tests arc-c arc-e mmlu-chem mmlu-phys] [--profile cpu] [--root runs/ood]

Each method trains once on OpenBookQA (the comparison's profile, ``experiments.grids``: 1 epoch of the
full train split, ``char`` cloze): one ``melora-pyro train``, scored on OBQA's test split (the
in-distribution column). Every other test set is a ``melora-pyro evaluate --eval-dataset`` of that
run, with the test set's own cloze template and the run's normalisation (``char``: a checkpoint is
scored as it was trained); ``-ts`` fits its one temperature on OBQA's dev split, never on a test set
(and rescales the test set's stored scoring). Cells are resumable and archived
in ``results/ood_<profile>_cells/``; writes ``results/ood_<profile>.{md,json}`` and a reliability
diagram per test set: per test set the signal line, mean ± std over seeds and the 95% paired-bootstrap
CIs of Me-LoRA - MAP and Me-LoRA - MAP+TS.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from melora_pyro._atomic import atomic_write_text
from melora_pyro.grid import Cell, GridError, archive_cells, cell_cost, is_done, read_cell, run_grid
from melora_pyro.plots import reliability_diagram

from . import out_file
from .grids import difference_table, method_table, signal_line, train_flags

TRAIN = "obqa"
TESTS = ("arc-c", "arc-e", "mmlu-chem", "mmlu-phys")
METHODS = ("zero-shot", "map", "map-ts", "mcdropout", "ensemble", "laplace", "blob", "melora", "melora-ts")
SCALED = {"map-ts": "map", "melora-ts": "melora"}  # a temperature (fitted on OBQA dev) on top of which run
PAIRS = (("melora", "map"), ("melora", "map-ts"), ("melora-ts", "map-ts"), ("map", "zero-shot"))


def cells(methods, seeds, tests, data_dir: str, profile: str = "cpu") -> list[Cell]:
    """Per seed and method: the OBQA run (``obqa/<method>-s<seed>``), then its scoring on each test set
    (``<test>/<method>-s<seed>``); zero-shot once (``<test>/zero-shot``)."""
    grid = []
    for seed in seeds:
        for method in methods:
            if method == "zero-shot" and seed != seeds[0]:
                continue  # deterministic: one run
            trained_method = SCALED.get(method, method)
            suffix = "" if method == "zero-shot" else f"-s{seed}"
            trained = Cell(f"{TRAIN}/{trained_method}{suffix}",
                           train_flags(trained_method, TRAIN, data_dir, seed=seed, profile=profile))
            scale = ("--temperature-scale",) if method in SCALED else ()
            for test in (TRAIN, *tests):
                name = f"{test}/{method}{suffix}"
                if test == TRAIN and not scale:
                    grid.append(trained)
                    continue
                elsewhere = () if test == TRAIN else ("--eval-dataset", test)
                grid.append(Cell(name, trained.flags, run=trained.run_name, evaluate=(*elsewhere, *scale)))
    return grid


def method_of(cell: Cell) -> str:
    name = cell.name.split("/")[1]
    return name.rsplit("-s", 1)[0] if name != "zero-shot" else name


def report(grid: list[Cell], root: Path, out: Path, tests, data_dir: str, archive=None) -> str:
    """Write ``out.{md,json}`` and ``out_<test>.png`` from the done cells of ``grid``."""
    lines = [f"# Out of distribution: trained on {TRAIN}, {out.name.split('_')[-1]} profile", "",
             "Command: `python -m experiments.ood --data-dir ../shared/data`", "",
             "Each method's OBQA run (1 epoch of its train split, `char` cloze) scored on every test set with "
             "that set's template and the run's `char` normalisation; temperatures (-ts) fitted on OBQA's dev split. Mean ± std "
             "over the seeds listed.", ""]
    doc, total_cpu = {}, 0.0
    for test in (TRAIN, *tests):
        by_method: dict[str, list] = {}
        for cell in grid:
            if cell.name.startswith(f"{test}/") and is_done(cell, root, archive):
                by_method.setdefault(method_of(cell), []).append((cell, *read_cell(cell, root, archive)))
                total_cpu += (cell_cost(cell, root, archive) or {}).get("cpu_s", 0.0)
        if not by_method:
            continue
        labels = next(iter(by_method.values()))[0][2]
        doc[test] = {}
        where = "in distribution" if test == TRAIN else "out of distribution"
        lines += [f"## {TRAIN} -> {test} test ({where}, n = {len(labels)})", "",
                  signal_line(by_method, labels, test, data_dir, doc[test]), ""]
        lines += method_table(by_method, METHODS, doc[test])
        lines += difference_table(by_method, PAIRS, labels, doc[test])
        first = {m: (runs[0][1], labels) for m, runs in by_method.items()}
        reliability_diagram(first, out.parent / f"{out.name}_{test}.png", title=f"{TRAIN} -> {test} (first seed)")
        lines += [f"Reliability diagram (first seed of each method): `{out.name}_{test}.png`", ""]
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
    parser.add_argument("--methods", nargs="+", default=["zero-shot", "map", "map-ts", "melora", "melora-ts"],
                        choices=METHODS)
    parser.add_argument("--tests", nargs="+", default=list(TESTS), choices=TESTS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--profile", default="cpu", choices=("cpu", "gpu"))
    parser.add_argument("--root", help="where the run directories go (default runs/ood[-gpu])")
    parser.add_argument("--jobs", type=int, default=1, help="cells run at once (the CPU threads are split)")
    parser.add_argument("--threads", type=int, help="CPU threads per run (default: the cores / --jobs)")
    parser.add_argument("--out", help="default results/ood_<profile>")
    parser.add_argument("--archive", help="where finished cells are kept (default <out>_cells)")
    parser.add_argument("--report-only", action="store_true", help="write the tables from the finished cells")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # the cells run as subprocesses; the report's bootstrap is tiny ops
    root = args.root or ("runs/ood" if args.profile == "cpu" else f"runs/ood-{args.profile}")
    out = Path(args.out or f"results/ood_{args.profile}")
    archive = args.archive or f"{out}_cells"
    grid = cells(args.methods, args.seeds, args.tests, args.data_dir, args.profile)
    try:
        status = {} if args.report_only else run_grid(grid, root, jobs=args.jobs, threads=args.threads, archive=archive)
    except GridError as e:  # another grid holds the root
        print(f"error: {e}", file=sys.stderr)
        return 2
    every = cells(METHODS, (0, 1, 2), TESTS, args.data_dir, args.profile)  # every finished cell, whichever ran
    archive_cells(every, root, archive)
    print(report(every, Path(root), out, TESTS, args.data_dir, archive))
    return 1 if any(v != "done" for v in status.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
