"""Paired comparison of finished runs on the same evaluation questions, with bootstrap CIs.

    python -m experiments.paired RUN_DIR_A RUN_DIR_B [...] [--out results/x.md]

Each run is loaded as ``melora-pyro evaluate`` loads it (``pipeline.load_run``: never trains) and
scored on its evaluation split; the first run is the reference. For every other run the table gives
ACC / ECE / NLL / Brier and the 95% paired-bootstrap CI (1,000 resamples of questions, the same for
both runs) of its difference to the reference: a CI that excludes 0 resolves the difference.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch

from melora_pyro._atomic import atomic_write_text
from melora_pyro.metrics import METRICS, bootstrap_ci, summarize
from melora_pyro.pipeline import load_run, score
from melora_pyro.runs import load_settings


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dirs", nargs="+", help="finished run directories; the first is the reference")
    parser.add_argument("--out", help="write the Markdown table here too")
    args = parser.parse_args(argv)
    command = "python -m experiments.paired " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    scored = {}
    for run_dir in args.run_dirs:
        settings = load_settings(run_dir)
        method, task = load_run(settings, run_dir)
        _, (probs, labels) = score(settings, method, task)
        scored[run_dir] = (settings, probs, labels)
    reference, (ref_settings, ref_probs, labels) = args.run_dirs[0], scored[args.run_dirs[0]]
    lines = [f"# Paired comparison on {ref_settings.dataset} ({ref_settings.eval_split}, n = {len(labels)})", "",
             f"Command: `{command}`", "", f"Reference: `{reference}` ({ref_settings.method}).", "",
             "| run | method | " + " | ".join(f"{k.upper()} | Δ {k.upper()} 95% CI" for k in METRICS) + " |",
             "|---|---|" + "---|---|" * len(METRICS)]
    for run_dir, (settings, probs, run_labels) in scored.items():
        if not torch.equal(run_labels, labels):
            raise SystemExit(f"{run_dir}: evaluated on other questions than {reference}")
        values = summarize(probs, labels)
        cells = []
        for key, metric in METRICS.items():
            ci = "" if run_dir == reference else "[{:+.4f}, {:+.4f}]".format(*bootstrap_ci(metric, probs, labels, ref_probs))
            cells += [f"{values[key]:.4f}", ci]
        lines.append(f"| `{Path(run_dir).name}` | {settings.method} | " + " | ".join(cells) + " |")
    report = "\n".join(lines) + "\n"
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(args.out), report)
    print(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
