"""The powered comparison (issue 11 item 5), CPU profile (``experiments.grids``): full test splits.

    python -m experiments.comparison --data-dir ../shared/data [--jobs 2] [--datasets arc-e arc-c]
        [--seeds 0 1 2] [--methods zero-shot map map-ts blob melora] [--root runs/comparison]
    python -m experiments.comparison --data-dir ../shared/data --profile gpu --jobs 4   # on a GPU machine

Every cell is one ``melora-pyro train`` run (``melora_pyro.grid``), 1 epoch of the full train split;
``map-ts`` / ``melora-ts`` score the ``map`` / ``melora`` run of the same seed again with one temperature
fitted on the dev split (``melora-pyro evaluate --temperature-scale``), so they cost no training.
Rerunning skips finished cells and resumes stopped ones. Writes ``results/comparison_cpu.{md,json}``:
mean ± std over seeds per method, and 95% paired-bootstrap CIs (1,000 resamples of the test questions,
each resample applied to every seed) of the seed-mean differences Me-LoRA - MAP and Me-LoRA - MAP+TS.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from melora_pyro._atomic import atomic_write_text
from melora_pyro.grid import Cell, cell_cost, is_done, read_cell, run_grid
from melora_pyro.metrics import METRICS, bootstrap_ci
from melora_pyro.plots import reliability_diagram

from .grids import PROFILES, mean_std, temperature_cell, train_flags

METHODS = ("zero-shot", "map", "map-ts", "blob", "melora", "melora-ts")
PAIRS = (("melora", "map"), ("melora", "map-ts"), ("melora-ts", "map-ts"), ("blob", "map"), ("map", "zero-shot"))
SCALED = {"map-ts": "map", "melora-ts": "melora"}  # a temperature on top of which trained run


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
                trained = SCALED.get(method, method)
                cell = Cell(f"{dataset}/{trained}-s{seed}",
                            train_flags(trained, dataset, data_dir, seed=seed, profile=profile))
                grid.append(temperature_cell(cell, f"{dataset}/{method}-s{seed}") if method in SCALED else cell)
    return grid


def method_of(cell: Cell) -> str:
    name = cell.name.split("/")[1]
    return name.rsplit("-s", 1)[0] if name != "zero-shot" else name


def report(grid: list[Cell], root: Path, out: Path, datasets, profile: str = "cpu") -> str:
    where = "top-2 layers + lm_head over the prefix cache" if profile == "cpu" else "every layer + lm_head"
    lines = [f"# Powered comparison, {profile} profile (SmolLM2-135M, {where}, cloze)", "",
             f"Command: `python -m experiments.comparison --data-dir ../shared/data --profile {profile}`", "",
             f"1 epoch of the full train split, lr 3e-4, batch 8; {PROFILES[profile][1]} posterior samples (blob, melora); "
             "temperatures fitted on the dev split, never on test. Mean ± std over the seeds listed; "
             "zero-shot is deterministic (one run).", ""]
    doc, total_cpu = {}, 0.0
    for dataset in datasets:
        done = [c for c in grid if c.name.startswith(f"{dataset}/") and is_done(c, root)]
        if not done:
            continue
        by_method: dict[str, list] = {}
        for cell in done:
            probs, labels, metrics = read_cell(cell, root)
            by_method.setdefault(method_of(cell), []).append((cell, probs, labels, metrics))
            total_cpu += (cell_cost(cell, root) or {}).get("cpu_s", 0.0)
        labels = next(iter(by_method.values()))[0][2]
        lines += [f"## {dataset} test (n = {len(labels)})", "",
                  "| method | seeds | ACC ↑ | ECE ↓ | NLL ↓ | Brier ↓ |", "|---|---|---|---|---|---|"]
        doc[dataset] = {}
        for method in METHODS:
            runs = by_method.get(method)
            if not runs:
                continue
            values = {k: [r[3][k] for r in runs] for k in METRICS}
            doc[dataset][method] = {"runs": [r[0].name for r in runs], **values,
                                    "temperature": [r[3].get("temperature") for r in runs]}
            lines.append(f"| {method} | {len(runs)} | " + " | ".join(mean_std(values[k]) for k in METRICS) + " |")
        lines += ["", "Seed-mean differences on the same questions, 95% paired-bootstrap CIs (seeds present in "
                  "both methods); a CI that excludes 0 resolves the difference.", "",
                  "| difference | seeds | " + " | ".join(f"Δ {k.upper()}" for k in METRICS) + " |",
                  "|---|---|" + "---|" * len(METRICS)]
        for a, b in PAIRS:
            if a not in by_method or b not in by_method:
                continue
            seeds_a = {r[0].name.rsplit("-s", 1)[-1]: r[1] for r in by_method[a]}
            seeds_b = {r[0].name.rsplit("-s", 1)[-1]: r[1] for r in by_method[b]}
            common = sorted(set(seeds_a) & set(seeds_b)) if b != "zero-shot" else sorted(seeds_a)
            pa = [seeds_a[s] for s in common]
            pb = [seeds_b[s] for s in common] if b != "zero-shot" else [by_method[b][0][1]] * len(common)
            cells_ = []
            for key, metric in METRICS.items():
                diff = sum(metric(x, labels) - metric(y, labels) for x, y in zip(pa, pb)) / len(pa)
                lo, hi = bootstrap_ci(metric, pa, labels, pb)
                cells_.append(f"{diff:+.4f} [{lo:+.4f}, {hi:+.4f}]")
                doc[dataset].setdefault("differences", {})[f"{a} - {b} {key}"] = [diff, lo, hi]
            lines.append(f"| {a} - {b} | {len(common)} | " + " | ".join(cells_) + " |")
        first = {m: (runs[0][1], labels) for m, runs in by_method.items()}
        reliability_diagram(first, out.parent / f"{out.name}_{dataset}.png", title=f"{dataset} test (first seed)")
        lines += ["", f"Reliability diagram (first seed of each method): `{out.name}_{dataset}.png`", ""]
    lines += [f"Total CPU time of the cells run (user + system): {total_cpu / 3600:.2f} h.", "",
              "Each cell's command:", ""]
    lines += [f"- `{c.name}`: `{c.command(root)}`" for c in grid if is_done(c, root)]
    text = "\n".join(lines) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out.with_suffix(".md"), text)
    atomic_write_text(out.with_suffix(".json"), json.dumps(doc, indent=2))
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--datasets", nargs="+", default=["arc-e", "arc-c"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--profile", default="cpu", choices=("cpu", "gpu"),
                        help="cpu: top-2 layers + lm_head over the prefix cache; gpu: every layer, on CUDA")
    parser.add_argument("--root", help="where the run directories go (default runs/comparison[-gpu])")
    parser.add_argument("--jobs", type=int, default=1, help="cells run at once (the CPU threads are split)")
    parser.add_argument("--threads", type=int, help="CPU threads per run (default: the cores / --jobs)")
    parser.add_argument("--out", help="default results/comparison_<profile>")
    parser.add_argument("--report-only", action="store_true", help="write the tables from the finished cells")
    args = parser.parse_args(argv)
    root = args.root or ("runs/comparison" if args.profile == "cpu" else f"runs/comparison-{args.profile}")
    out = args.out or f"results/comparison_{args.profile}"
    grid = cells(args.datasets, args.methods, args.seeds, args.data_dir, args.profile)  # the CLI makes it absolute
    status = {} if args.report_only else run_grid(grid, root, jobs=args.jobs, threads=args.threads)
    print(report(grid, Path(root), Path(out), args.datasets, args.profile))
    return 1 if any(v != "done" for v in status.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
