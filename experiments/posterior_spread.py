"""How much a trained run's posterior draws disagree: is the model average doing anything?

    python -m experiments.posterior_spread --run-dir runs/overfitting/arc-e/melora-8ep-s0 [--samples 4]
        [--eval-split validation] [--eval-limit 600] [--widths 1 4 16] [--out results/posterior_spread_arc-e-8ep-s0]

Loads a finished run of a sampling method (``melora_pyro.pipeline.load_run``: it trains nothing) and scores
its evaluation split once per posterior draw (``method.predict(batch, 1)``, ``--samples`` times) and once
at the posterior mean (``predict(batch, 0)``). Reported per question set: ACC / ECE / NLL of one draw (the
mean over draws), of the model average (the mean of the draws' probabilities, what ``train`` reports), and
of the posterior mean; how often two draws pick different answers; the mutual information between the
answer and the draw, ``I = H[mean_s p_s] - mean_s H[p_s]`` in nats (the epistemic part of the predictive
entropy), against the predictive entropy itself. When the draws agree (I near 0) the model average equals
each draw and cannot correct their confidence, whatever the width of q(C).

``--random-subspace``: a counterfactual for Me-LoRA. Each layer's posterior-mean update ``s B M A`` is merged
into its W0 (so the posterior-mean row is unchanged), then A and B are replaced by random orthonormal rows and
columns, M by 0 and Omega by the one value that keeps the layer's weight-space spread
(``experiments.weight_reach``) what training left it. The draws then move the weights as far as before, in a
subspace training did not choose: if they disagree far more than the trained ones, A and B had placed the
noise where the answer scores do not feel it.

``--widths``: the draws are repeated with the guide's scale Omega multiplied by each factor (a mean-field
guide's ``log_scale``; the run's files are not touched), to see whether a wider q(C) than the ELBO's would
calibrate the model average. Judge a width on ``--eval-split validation``, never on test.
"""
from __future__ import annotations

import argparse
import contextlib
import math
from dataclasses import replace

import torch

from melora_pyro.metrics import summarize
from melora_pyro.pipeline import load_run
from melora_pyro.runs import load_settings
from melora_pyro.train import evaluate

from . import report_run_analysis, weight_reach


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


@contextlib.contextmanager
def widened(guide, factor: float):
    """Within the block, ``guide``'s Omega is ``factor`` times its trained value (a guide with ``log_scale``)."""
    if factor == 1:
        yield
        return
    if factor <= 0 or not hasattr(guide, "log_scale"):
        raise ValueError(f"width factor {factor}: needs a factor > 0 and a guide with log_scale (mean-field), "
                         f"got {type(guide).__name__}")
    trained = guide.log_scale.detach().clone()
    with torch.no_grad():
        guide.log_scale.add_(math.log(factor))
    try:
        yield
    finally:
        with torch.no_grad():
            guide.log_scale.copy_(trained)


@torch.no_grad()
def randomise_subspace(method, seed: int = 0) -> None:
    """In place, on a trained Me-LoRA ``method``: merge each layer's posterior-mean update into its W0, draw A with orthonormal rows and B with
    orthonormal columns, set M = 0 and Omega to ``spread / (s r)``, the trained layer's weight-space spread
    (``weight_reach.reach``) spread evenly over the r x r entries (see the module). Me-LoRA only."""
    model, guide = method.model, getattr(method, "guide", None)
    if not hasattr(guide, "log_scale"):
        raise ValueError(f"--random-subspace needs a mean-field guide on C, got {type(guide).__name__}")
    spreads = torch.tensor([row["spread"] for row in weight_reach.reach(method)])
    generator = torch.Generator().manual_seed(seed)
    A, B = model.fix_gauge(list(model.lora_A), list(model.lora_B))
    for name, a, b, m in zip(model.layer_names, weight_reach._unbind(A), weight_reach._unbind(B), guide.loc):
        base = model.base.get_submodule(name).base
        merged = base.weight + (model.config.scaling * b @ m @ a).to(base.weight.dtype)
        base.weight = torch.nn.Parameter(merged, requires_grad=False)  # its own tensor: W0 may be tied
    for stacks, transpose in ((model.lora_A, True), (model.lora_B, False)):
        for stack in stacks:
            for layer in stack:
                rows, cols = layer.shape if not transpose else layer.shape[::-1]
                q = torch.linalg.qr(torch.randn(rows, cols, generator=generator, dtype=torch.float64))[0]
                layer.copy_(q.T if transpose else q)
    guide.loc.zero_()
    guide.log_scale.copy_((spreads / (model.config.scaling * model.rank)).log()[:, None, None].expand_as(guide.loc))


def measure(run_dir, samples: int = 4, eval_limit: int | None = None, eval_split: str | None = None,
            widths=(1.0,), progress: bool = True, random_subspace: bool = False) -> dict:
    """Score ``run_dir``'s evaluation split (or ``eval_split``) per draw at each Omega factor in ``widths``,
    averaged, and at the posterior mean (see the module); ``random_subspace``: after
    :func:`randomise_subspace`."""
    if samples < 2:
        raise ValueError(f"samples must be >= 2 to measure disagreement, got {samples}")
    settings = load_settings(run_dir)
    settings = replace(settings, eval_limit=eval_limit or settings.eval_limit,
                       eval_split=eval_split or settings.eval_split)
    method, task = load_run(settings, run_dir)
    if random_subspace:
        randomise_subspace(method, settings.train.seed)

    def scored(num_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
        return evaluate(lambda batch: method.predict(batch, num_samples), task.eval, task.collate,
                        settings.eval_batch_size, progress=progress)

    mean_probs, labels = scored(0)
    by_width = {}
    for factor in widths:
        with widened(method.guide, factor):
            draws = torch.stack([scored(1)[0] for _ in range(samples)])
        per_draw = [summarize(p, labels) for p in draws]
        by_width[str(factor)] = {"one_draw": {k: sum(m[k] for m in per_draw) / samples for k in per_draw[0]},
                                 "model_average": summarize(draws.mean(0), labels), **spread(draws)}
    return {"run_dir": str(run_dir), "method": settings.method, "dataset": settings.scored_dataset,
            "split": settings.eval_split, "n": len(labels), "samples": samples, "random_subspace": random_subspace,
            "posterior_mean": summarize(mean_probs, labels), "widths": by_width}


def markdown(result: dict, command: str) -> str:
    lines = [f"# Posterior spread: {result['run_dir']}", "", f"Command: `{command}`", "",
             f"{result['method']} on {result['dataset']} {result['split']} (n = {result['n']}); "
             f"{result['samples']} draws per factor on the guide's scale (Omega x; 1: the trained posterior)"
             f"{'; A and B replaced by a random subspace with the same weight-space spread (--random-subspace)' if result.get('random_subspace') else ''}. MI: mutual information between "
             "answer and draw, H: predictive entropy (nats); disagree: pairs of draws with different answers.", "",
             "| Omega x | prediction | ACC | ECE | NLL | Brier | disagree | MI | H |",
             "|---|---|---|---|---|---|---|---|---|"]

    def row(width, name, m, extra=("", "", "")):
        return f"| {width} | {name} | {m['acc']:.4f} | {m['ece']:.4f} | {m['nll']:.4f} | {m['brier']:.4f} | " \
               + " | ".join(extra) + " |"

    lines.append(row("", "posterior mean", result["posterior_mean"]))
    for width, r in result["widths"].items():
        lines.append(row(width, "one draw (mean over draws)", r["one_draw"]))
        lines.append(row(width, f"model average of {result['samples']} draws", r["model_average"],
                         (f"{100 * r['disagreement']:.1f} %", f"{r['mutual_information']:.4f}",
                          f"{r['predictive_entropy']:.4f}")))
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--samples", type=int, default=4, help="posterior draws, each scored alone (>= 2)")
    parser.add_argument("--eval-split", help="the split to score (default: the run's own evaluation split)")
    parser.add_argument("--eval-limit", type=int, help="score a seeded subset of N questions of the split only")
    parser.add_argument("--widths", nargs="+", type=float, default=[1.0],
                        help="factors on the guide's Omega, each scored with its own draws")
    parser.add_argument("--random-subspace", action="store_true",
                        help="the same weight-space spread in a random subspace (Me-LoRA; see the module)")
    parser.add_argument("--out", help="write <out>.md and <out>.json")
    args = parser.parse_args(argv)
    return report_run_analysis("posterior_spread", argv, args.out, lambda: measure(
        args.run_dir, args.samples, args.eval_limit, args.eval_split, args.widths,
        random_subspace=args.random_subspace), markdown)

if __name__ == "__main__":
    raise SystemExit(main())
