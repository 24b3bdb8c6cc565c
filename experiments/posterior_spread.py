"""How much a trained run's posterior draws disagree: is the model average doing anything?

    python -m experiments.posterior_spread --run-dir runs/overfitting/arc-e/melora-8ep-s0 [--samples 4]
        [--eval-limit 600] [--out results/posterior_spread_arc-e-8ep-s0]

Loads a finished run of a sampling method (``melora_pyro.pipeline.load_run``: it trains nothing) and scores
its evaluation split once per posterior draw (``method.predict(batch, 1)``, ``--samples`` times) and once
at the posterior mean (``predict(batch, 0)``). Reported per question set: ACC / ECE / NLL of one draw (the
mean over draws), of the model average (the mean of the draws' probabilities, what ``train`` reports), and
of the posterior mean; how often two draws pick different answers; the mutual information between the
answer and the draw, ``I = H[mean_s p_s] - mean_s H[p_s]`` in nats (the epistemic part of the predictive
entropy), against the predictive entropy itself. When the draws agree (I near 0) the model average equals
each draw and cannot correct their confidence, whatever the width of q(C).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

from melora_pyro._atomic import atomic_write_text
from melora_pyro.metrics import summarize
from melora_pyro.pipeline import load_run
from melora_pyro.runs import RunError, load_settings
from melora_pyro.train import evaluate


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of each row of ``probs`` ``(..., K)`` (0 log 0 = 0)."""
    return -(probs * probs.clamp_min(1e-30).log()).sum(-1)


def spread(draws: torch.Tensor) -> dict[str, float]:
    """Disagreement statistics of ``draws`` ``(S, N, K)``, S >= 2 posterior draws of N questions' probabilities:
    ``disagreement`` (the fraction of draw pairs and questions whose argmax differ), ``mutual_information``
    and ``predictive_entropy`` (means over questions, nats)."""
    average = draws.mean(0)
    picks = draws.argmax(-1)                                               # (S, N)
    differ = (picks[:, None] != picks[None, :]).float()                   # (S, S, N)
    pairs = draws.shape[0] * (draws.shape[0] - 1)
    return {"disagreement": float(differ.sum((0, 1)).mean() / pairs),
            "mutual_information": float((entropy(average) - entropy(draws).mean(0)).mean()),
            "predictive_entropy": float(entropy(average).mean())}


def measure(run_dir, samples: int = 4, eval_limit: int | None = None, progress: bool = True) -> dict:
    """Score ``run_dir``'s evaluation split per draw, averaged and at the posterior mean (see the module)."""
    if samples < 2:
        raise ValueError(f"samples must be >= 2 to measure disagreement, got {samples}")
    settings = load_settings(run_dir)
    settings = replace(settings, eval_limit=eval_limit or settings.eval_limit)
    method, task = load_run(settings, run_dir)

    def scored(num_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
        return evaluate(lambda batch: method.predict(batch, num_samples), task.eval, task.collate,
                        settings.eval_batch_size, progress=progress)

    draws, labels = zip(*(scored(1) for _ in range(samples)))
    draws, labels = torch.stack(draws), labels[0]
    mean_probs, _ = scored(0)
    per_draw = [summarize(p, labels) for p in draws]
    return {"run_dir": str(run_dir), "method": settings.method, "dataset": settings.scored_dataset,
            "split": settings.eval_split, "n": len(labels), "samples": samples,
            "one_draw": {k: sum(m[k] for m in per_draw) / samples for k in per_draw[0]},
            "model_average": summarize(draws.mean(0), labels), "posterior_mean": summarize(mean_probs, labels),
            **spread(draws)}


def markdown(result: dict, command: str) -> str:
    rows = [(name, result[key]) for name, key in (("one draw (mean over draws)", "one_draw"),
                                                  (f"model average of {result['samples']} draws", "model_average"),
                                                  ("posterior mean of C", "posterior_mean"))]
    lines = [f"# Posterior spread: {result['run_dir']}", "", f"Command: `{command}`", "",
             f"{result['method']} on {result['dataset']} {result['split']} (n = {result['n']}).", "",
             "| prediction | ACC | ECE | NLL | Brier |", "|---|---|---|---|---|"]
    lines += [f"| {name} | {m['acc']:.4f} | {m['ece']:.4f} | {m['nll']:.4f} | {m['brier']:.4f} |" for name, m in rows]
    lines += ["", f"Draws disagree on {100 * result['disagreement']:.1f} % of (pair, question); mutual information "
              f"{result['mutual_information']:.4f} nats of a predictive entropy of {result['predictive_entropy']:.4f}.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--samples", type=int, default=4, help="posterior draws, each scored alone (>= 2)")
    parser.add_argument("--eval-limit", type=int, help="score the first N questions of the split only")
    parser.add_argument("--out", help="write <out>.md and <out>.json")
    args = parser.parse_args(argv)
    try:
        result = measure(args.run_dir, args.samples, args.eval_limit)
    except (RunError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = markdown(result, "python -m experiments.posterior_spread " + " ".join(argv or sys.argv[1:]))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out.with_suffix(".json"), json.dumps(result, indent=2))
        atomic_write_text(out.with_suffix(".md"), text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
