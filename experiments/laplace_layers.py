"""Which adapted layers' posterior makes LAP's GLM predictive calibrated: the posterior restricted to each.

    python -m experiments.laplace_layers --run-dir runs/overfitting/arc-e/laplace-8ep-s0 [--eval-split validation]
        [--eval-limit 300] [--out results/laplace_layers_arc-e-8ep-s0]

LAP's predictive draws label logits from ``N(f(theta*), J Sigma J^T)``, ``Sigma`` its diagonal posterior
over the A and B of every adapted layer. Keeping ``Sigma`` on the layers of one kind (``lm_head``,
``q_proj``, ...) and zeroing it elsewhere shows which layers' uncertainty does the calibrating; the
covariances are additive over the kinds, so the rows are a decomposition of the full one. A second
decomposition splits the parameters by what set their variance: ``at prior`` keeps it on the entries the data
leave at the prior (curvature below 1% of the prior precision, ``LaplaceMethod.prior_held``: their variance is
``1 / lambda``, chosen by the marginal likelihood, not by the data), ``data-constrained`` on the rest. All
variants share one Jacobian per example (``LaplaceMethod.glm_covariances``), and ``map`` is the softmax of
the mean logits. Scores the validation split by default: this is an analysis, judged away from test.
"""
from __future__ import annotations

import argparse
from dataclasses import replace

import torch
from tqdm.auto import tqdm

from melora_pyro.baselines import LaplaceMethod
from melora_pyro.metrics import summarize
from melora_pyro.pipeline import load_run
from melora_pyro.runs import load_settings

from . import report_run_analysis


def kind_masks(method: LaplaceMethod) -> dict[str, torch.Tensor]:
    """``{kind: (P,) bool}`` over the flattened ``method.params``: the entries of the layers whose name
    ends in ``kind`` (``q_proj``, ``lm_head``, ...), in the order the kinds first appear."""
    model = method.map.model
    names = iter(model.layer_names)
    layer_kinds = [[next(names).rsplit(".", 1)[-1] for _ in range(stack.shape[0])] for stack in model.lora_A]
    per_param = []
    for group, stack in [*enumerate(model.lora_A), *enumerate(model.lora_B)]:
        per_param += [(kind, stack[0].numel()) for kind in layer_kinds[group]]
    kinds = list(dict.fromkeys(kind for kind, _ in per_param))
    return {kind: torch.cat([torch.full((n,), k == kind) for k, n in per_param]) for kind in kinds}


def measure(run_dir, eval_split: str | None = "validation", eval_limit: int | None = None,
            progress: bool = True) -> dict:
    """Metrics of ``map``, the full GLM predictive (``all``), the predictive restricted to each layer kind and
    to the prior-held / data-constrained entries, on ``eval_split`` of a finished ``laplace`` run (its
    curvature is refitted from the training set). ``shares``: each restriction's fraction of the entries."""
    settings = load_settings(run_dir)
    if settings.method != "laplace":
        raise ValueError(f"laplace_layers needs a laplace run, got method {settings.method!r}")
    settings = replace(settings, eval_limit=eval_limit or settings.eval_limit,
                       eval_split=eval_split or settings.eval_split)
    method, task = load_run(settings, run_dir)
    variance = torch.cat([std.square().flatten() for std in method.posterior_std()])
    masks = {f"{kind} only": mask for kind, mask in kind_masks(method).items()}
    held = torch.cat([mask.flatten() for mask in method.prior_held()])
    masks.update({"at prior": held, "data-constrained": ~held})
    variants = {"all": variance, **{name: variance * mask for name, mask in masks.items()}}
    probs = {name: [] for name in ["map", *variants]}
    labels = []
    batches = range(0, len(task.eval), settings.eval_batch_size)
    for start in tqdm(batches, desc="glm", disable=not progress):
        batch = task.collate(task.eval[start:start + settings.eval_batch_size])
        mean, covariances = method.glm_covariances(batch, list(variants.values()))
        probs["map"].append(mean.softmax(-1))
        for name, covariance in zip(variants, covariances):
            probs[name].append(method.glm_sample_mean(mean, covariance))
        labels.append(batch["labels"])
    labels = torch.cat(labels)
    return {"run_dir": str(run_dir), "dataset": settings.scored_dataset, "split": settings.eval_split,
            "n": len(labels), "prior_precision": method.prior_precision,
            "shares": {name: float(mask.float().mean()) for name, mask in masks.items()},
            "variants": {name: summarize(torch.cat(p), labels) for name, p in probs.items()}}


def markdown(result: dict, command: str) -> str:
    lines = [f"# LAP's GLM predictive restricted to one kind of layer: {result['run_dir']}", "",
             f"Command: `{command}`", "",
             f"{result['dataset']} {result['split']} (n = {result['n']}); prior precision "
             f"{result['prior_precision']:.3g}. `map`: the mean logits; `all`: LAP's predictive; `<kind> only`: its "
             "posterior variance kept on those layers' A and B, zero elsewhere; `at prior`: kept on the entries whose "
             "curvature is below 1% of the prior precision, `data-constrained`: on the rest "
             "(experiments/laplace_layers.py). `entries`: the share of LAP's parameters whose variance is kept.", "",
             "| predictive | entries | ACC | ECE | NLL | Brier |", "|---|---|---|---|---|---|"]
    shares = {"all": 1.0, **result.get("shares", {})}
    lines += [f"| {name} | {f'{shares[name]:.1%}' if name in shares else ''} | {m['acc']:.4f} | {m['ece']:.4f} | "
              f"{m['nll']:.4f} | {m['brier']:.4f} |" for name, m in result["variants"].items()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--eval-split", default="validation", help="the split to score (default validation)")
    parser.add_argument("--eval-limit", type=int, help="score a seeded subset of N questions of the split only")
    parser.add_argument("--out", help="write <out>.md and <out>.json")
    args = parser.parse_args(argv)
    return report_run_analysis("laplace_layers", argv, args.out,
                               lambda: measure(args.run_dir, args.eval_split, args.eval_limit), markdown)

if __name__ == "__main__":
    raise SystemExit(main())
