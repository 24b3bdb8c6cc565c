"""Me-LoRA's defaults by sweep on ARC-Easy *validation* (never test), CPU profile (``experiments.grids``).

    python -m experiments.sweep --data-dir ../shared/data [--jobs 2] [--root runs/sweep] [--only CELL ...]

One seed, the full train split (2,251 questions), the 570 dev questions. One setting is changed at a
time from the defaults the sweep started from (prior std 0.2, full-weight KL, init_scale 1e-2, guide
lrs 1e-2 / 5e-2, 1 epoch): the prior kind (``melora-elementwise``) and std (0.05, 1.0, given as flags
so the cells stay what they were after the default moved to 1.0); MAP at 1 and 2 epochs is the
reference (and shows what a second epoch does). Then, from prior std 1.0 (``melora-prior1``), one change
each: init_scale 0.1, the guide's scale lr (1e-2, 0.2) and location lr (1e-3), a second epoch, and the KL
weight (``--kl-weight`` 0.1, 10), and antithetic pairs of C (``--antithetic true``); later prior std 4.0
(against 1.0: the grid's edge had won). Each cell's paired dev
differences from the cell it changes are reported with bootstrap CIs. Every cell is a ``melora-pyro train`` run (``melora_pyro.grid``); rerunning
skips finished cells. Writes ``results/sweep_arc-e_dev.{md,json,png}``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from melora_pyro._atomic import atomic_write_text
from melora_pyro.grid import Cell, GridError, archive_cells, cell_cost, is_done, read_cell, run_grid, train_log
from melora_pyro.metrics import accuracy, bootstrap_ci, ece, nll

from . import out_file
from .grids import train_flags

DATASET = "arc-e"
# (cell name, method, epochs, extra flags, what is varied)
SETTINGS = (
    ("map-1ep", "map", 1, (), "MAP, 1 epoch (reference)"),
    ("map-2ep", "map", 2, (), "MAP, 2 epochs"),
    ("melora", "melora", 1, ("--prior-std", "0.2"), "Me-LoRA, the starting defaults"),
    ("melora-elementwise", "melora-elementwise", 1, ("--prior-std", "0.2"), "KL: elementwise"),
    ("melora-prior1", "melora", 1, ("--prior-std", "1.0"), "prior std 1.0"),
    ("melora-prior0.05", "melora", 1, ("--prior-std", "0.05"), "prior std 0.05"),
    # From the defaults after the prior-std cells (prior std 1.0; reference: melora-prior1), one change each.
    ("melora-init0.1", "melora", 1, ("--prior-std", "1.0", "--init-scale", "0.1"), "init_scale 0.1"),
    ("melora-scale-lr0.01", "melora", 1, ("--prior-std", "1.0", "--guide-scale-lr", "0.01"),
     "guide scale lr 1e-2"),
    ("melora-scale-lr0.2", "melora", 1, ("--prior-std", "1.0", "--guide-scale-lr", "0.2"), "guide scale lr 0.2"),
    ("melora-loc-lr1e-3", "melora", 1, ("--prior-std", "1.0", "--guide-lr", "1e-3"), "guide location lr 1e-3"),
    ("melora-2ep", "melora", 2, ("--prior-std", "1.0"), "Me-LoRA, 2 epochs"),
    ("melora-kl0.1", "melora", 1, ("--prior-std", "1.0", "--kl-weight", "0.1"), "KL weight 0.1 (tempered)"),
    ("melora-kl10", "melora", 1, ("--prior-std", "1.0", "--kl-weight", "10"), "KL weight 10"),
    ("melora-antithetic", "melora", 1, ("--prior-std", "1.0", "--antithetic", "true"),
     "antithetic pairs of C (2x training compute)"),
    # After the cells above: the KL weight below 0.1, and the two changes that helped, together.
    ("melora-kl0.01", "melora", 1, ("--prior-std", "1.0", "--kl-weight", "0.01"), "KL weight 0.01"),
    ("melora-kl0.1-antithetic", "melora", 1, ("--prior-std", "1.0", "--kl-weight", "0.1", "--antithetic", "true"),
     "KL weight 0.1 and antithetic pairs"),
    # Later: 1.0 had won at the edge of the prior-std grid, and a trained q(C) at sigma 1 moved the answers
    # hardly at all (results/posterior_spread_*): the grid's next step up.
    ("melora-prior4", "melora", 1, ("--prior-std", "4.0"), "prior std 4.0"),
    # After prior4 (wider spread, draws disagreeing twice as often, ECE unresolved): a prior wide enough
    # (spread sigma r = 128 > |W0| of q/v) that the data, not the prior, set q(C)'s width.
    ("melora-prior16", "melora", 1, ("--prior-std", "16.0"), "prior std 16.0"),
)


NOT_SWEPT = ("Not swept, for lack of CPU time: more than one seed (a cell's dev ACC CI is about +-4 points, so only "
             "paired differences can resolve anything), combinations of the changes, and prior kinds other than the "
             "full-weight and elementwise KLs (``melora-noise``, ``melora-diag``).")
# The cell each one changes one setting of: its paired dev differences are taken against it.
REFERENCES = {"map-2ep": "map-1ep", "melora-elementwise": "melora", "melora-prior1": "melora",
              "melora-prior0.05": "melora", "melora-prior4": "melora-prior1",
              "melora-prior16": "melora-prior1"}


def reference(name: str) -> str | None:
    """The cell ``name`` varies one setting of (None for the references themselves)."""
    if name in ("map-1ep", "melora"):
        return None
    return REFERENCES.get(name, "melora-prior1")


def cells(data_dir: str) -> list[Cell]:
    return [Cell(name, train_flags(method, DATASET, data_dir, epochs, eval_split="validation", extra=extra))
            for name, method, epochs, extra, _ in SETTINGS]


def omega_stats(cell: Cell, root: Path, archive=None) -> str:
    """Omega's median [10%, 90%] at the last logged step (variational methods), else ''."""
    last = next((r for r in reversed(train_log(cell, root, archive)) if "omega_median" in r), None)
    if last is None:
        return ""
    return f"{last['omega_median']:.3f} [{last['omega_q10']:.3f}, {last['omega_q90']:.3f}]"


def report(grid: list[Cell], root: Path, out: Path, archive=None) -> None:
    """Write ``out.{md,json,png}`` from the finished cells (run directory or ``archive``); a cell found in
    neither keeps the row an earlier report recorded in ``out.json`` (cells run before the archive)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    recorded_file = out_file(out, ".json")
    recorded = json.loads(recorded_file.read_text()) if recorded_file.is_file() else {}
    rows, doc, n = [], {}, recorded.get("n")
    by_name = {cell.name: cell for cell in grid}
    for cell, (_, _, _, _, what) in zip(grid, SETTINGS):
        if not is_done(cell, root, archive):
            if cell.name in recorded.get("cells", {}):  # its metrics as recorded, its command as the grid has it
                doc[cell.name] = {**recorded["cells"][cell.name], "command": cell.command(root)}
                rows.append(cell.name)
            continue
        probs, labels, metrics = read_cell(cell, root, archive)
        cost = cell_cost(cell, root, archive) or {}
        doc[cell.name] = {**{k: metrics[k] for k in ("acc", "ece", "nll", "brier")}, "what": what,
                          "omega": omega_stats(cell, root, archive) or recorded.get("cells", {}).get(
                              cell.name, {}).get("omega", ""),
                          "cpu_s": cost.get("cpu_s"), "wall_s": cost.get("wall_s"), "command": cell.command(root),
                          "acc_ci": bootstrap_ci(accuracy, probs, labels),
                          "reference": reference(cell.name), **paired_differences(cell, by_name, root, archive)}
        rows.append(cell.name)
        n = len(labels)
    lines = [f"# Sweep on ARC-Easy validation (n = {n}), CPU profile, seed 0", "",
             "Command: `python -m experiments.sweep --data-dir ../shared/data`", "",
             "Judged on the dev split only; the test split is not read. Omega: median [10 %, 90 %] of the "
             "guide's std at the last logged step. CPU time: user + system seconds of the cell's commands "
             "(n/a: the cell finished under a grid process that was restarted, so its cost was not recorded; "
             "its log has the wall time).", "", NOT_SWEPT, "",
             "Δ: the paired difference from the cell it changes one setting of (ref), with its 95% bootstrap CI "
             "over the same dev questions; n/a where the predictions of either were not kept (cells run before "
             "the archive). Omega n/a: the run directory and its log were gone before logs were archived.", "",
             "| cell | varied | ref | ACC [95% CI] | ECE | NLL | Brier | Δ ACC | Δ ECE | Δ NLL | Omega | CPU s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in rows:
        r = doc[name]
        cpu = f"{r['cpu_s']:.0f}" if r["cpu_s"] else "n/a"
        ref = reference(name)
        deltas = [_delta(r.get(f"d_{k}")) for k in ("acc", "ece", "nll")] if ref else [""] * 3
        lines.append(f"| {name} | {r['what']} | {ref or ''} | "
                     f"{r['acc']:.4f} [{r['acc_ci'][0]:.3f}, {r['acc_ci'][1]:.3f}] | "
                     f"{r['ece']:.4f} | {r['nll']:.4f} | {r['brier']:.4f} | {' | '.join(deltas)} | "
                     f"{r['omega'] or 'n/a'} | {cpu} |")
    lines += ["", "Commands:", ""] + [f"- {name}: `{doc[name]['command']}`" for name in rows]
    total = sum(doc[name]["cpu_s"] or 0 for name in rows)
    lines += ["", f"Total CPU time of the cells run: {total / 60:.1f} min."]
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_file(out, ".md"), "\n".join(lines) + "\n")
    atomic_write_text(out_file(out, ".json"), json.dumps({"n": n, "cells": doc}, indent=2))
    if rows:
        figure = Figure(figsize=(10, 3.6))
        for i, key in enumerate(("acc", "ece", "nll")):
            ax = figure.add_subplot(1, 3, i + 1)
            values = [doc[r][key] for r in rows]
            errors = None
            if key == "acc":  # the 95% bootstrap CI: how much of a difference dev can resolve
                errors = [[v - doc[r]["acc_ci"][0] for r, v in zip(rows, values)],
                          [doc[r]["acc_ci"][1] - v for r, v in zip(rows, values)]]
            colors = ["tab:gray" if r.startswith("map") else "tab:blue" for r in rows]
            ax.scatter(values, range(len(rows)), c=colors, zorder=3)
            if errors:
                ax.errorbar(values, range(len(rows)), xerr=errors, fmt="none", ecolor="lightgray", zorder=2)
            ax.set_yticks(range(len(rows)), rows if i == 0 else [""] * len(rows), fontsize=7)
            ax.invert_yaxis()
            ax.grid(axis="x", alpha=0.3)
            ax.set_title(f"dev {key.upper()} {'↑' if key == 'acc' else '↓'}")
        figure.tight_layout()
        FigureCanvasAgg(figure).print_png(str(out_file(out, ".png")))


def paired_differences(cell: Cell, by_name: dict, root: Path, archive=None) -> dict:
    """``{"d_acc", "d_ece", "d_nll"}``: each ``[difference, low, high]`` of ``cell`` minus its reference
    on the same questions (95% paired bootstrap); {} without a reference or its predictions."""
    ref = reference(cell.name)
    if ref is None or not is_done(by_name[ref], root, archive):
        return {}
    probs, labels, _ = read_cell(cell, root, archive)
    ref_probs, ref_labels, _ = read_cell(by_name[ref], root, archive)
    assert torch.equal(labels, ref_labels), f"{cell.name} and {ref} were scored on different questions"
    return {f"d_{name}": [metric(probs, labels) - metric(ref_probs, labels),
                          *bootstrap_ci(metric, probs, labels, other=ref_probs)]
            for name, metric in (("acc", accuracy), ("ece", ece), ("nll", nll))}


def _delta(value) -> str:
    return "n/a" if value is None else f"{value[0]:+.4f} [{value[1]:+.3f}, {value[2]:+.3f}]"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--root", default="runs/sweep", help="where the run directories go")
    parser.add_argument("--jobs", type=int, default=1, help="cells run at once (the CPU threads are split)")
    parser.add_argument("--threads", type=int, help="CPU threads per run (default: the cores / --jobs)")
    parser.add_argument("--out", default="results/sweep_arc-e_dev")
    parser.add_argument("--archive", help="where finished cells are kept (default <out>_cells)")
    parser.add_argument("--only", nargs="*", help="run only these cells (the report includes every done cell)")
    parser.add_argument("--report-only", action="store_true", help="write the tables from the finished cells")
    args = parser.parse_args(argv)
    grid = cells(args.data_dir)  # as given: the CLI makes it absolute, the printed commands stay portable
    chosen = [c for c in grid if not args.only or c.name in args.only]
    archive = args.archive or f"{args.out}_cells"
    try:
        status = {} if args.report_only else run_grid(chosen, args.root, jobs=args.jobs, threads=args.threads,
                                                      archive=archive)
    except GridError as e:  # another grid holds the root
        print(f"error: {e}", file=sys.stderr)
        return 2
    archive_cells(grid, args.root, archive)  # what the table is rebuilt from when the run directories are gone
    report(grid, Path(args.root), Path(args.out), archive)
    failed = {k: v for k, v in status.items() if v != "done"}
    print(open(out_file(Path(args.out), ".md")).read())
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
