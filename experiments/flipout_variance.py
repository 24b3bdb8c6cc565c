"""Do Flipout on C or antithetic pairs of C lower the variance of Me-LoRA's ELBO gradient? (issue 12: Flipout
for Me-LoRA as an option, if it helps its variance; issue 11: the guide's scale reaching its optimum.)

    python -m experiments.flipout_variance --run-dir runs/comparison/arc-e/melora-s1 [--batches 4] [--repeats 16]
        [--estimators flipout antithetic] [--out results/flipout_variance]

Loads a finished Me-LoRA run (its settings and last checkpoint: ``pipeline.load_run``, the CLI's path) and,
on fixed training batches, draws the ELBO gradient ``repeats`` times with one C per draw shared by the batch
(the default estimator) and with each of ``--estimators``: ``flipout`` (``FullWeightELBO(flipout=True)``:
signs per example and token) and ``antithetic`` (``FullWeightELBO(antithetic=True)``: a draw and its mirror
``2 M - C``, averaged; two forward passes, so it pays off only below a ratio of 0.5, the variance of two
independent shared draws). Per parameter group (A, B, M, log Omega) it reports the gradient variance over
draws (summed over entries, averaged over batches), the squared norm of the mean gradient, and the ratio
estimator / shared with a 95% bootstrap interval over the draws, at the trained posterior and at one
``--widen`` times wider (Omega x widen), since the noise grows with Omega. Writes ``<out>.json`` and
``<out>.md`` (with the command).
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from melora_pyro._atomic import atomic_write_text
from melora_pyro.elbo import FullWeightELBO
from melora_pyro.pipeline import load_run
from melora_pyro.readouts import readout_inputs
from melora_pyro.runs import load_settings

from . import out_file

GROUPS = ("A", "B", "M", "log Omega")
ESTIMATORS = {"flipout": lambda: FullWeightELBO(flipout=True), "antithetic": lambda: FullWeightELBO(antithetic=True)}


def parameter_groups(method) -> dict[str, list[torch.Tensor]]:
    roles = method.guide.param_roles()
    return {"A": list(method.model.lora_A), "B": list(method.model.lora_B), "M": roles["loc"],
            "log Omega": roles["scale"]}


def gradient_draws(method, batch: dict, num_data: int, elbo: FullWeightELBO, repeats: int, seed: int) -> dict:
    """``{group: (repeats, P)}``: the flattened gradient of the negative ELBO, one draw per row."""
    groups = parameter_groups(method)
    params = [p for group in groups.values() for p in group]
    torch.manual_seed(seed)
    rows = {name: [] for name in groups}
    for _ in range(repeats):
        loss = elbo.differentiable_loss(method.model, method.guide, batch["input_ids"], batch.get("attention_mask"),
                                        batch["labels"], num_data, choice_mask=batch.get("choice_mask"),
                                        **readout_inputs(batch))
        grads = iter(torch.autograd.grad(loss, params))
        for name, group in groups.items():
            rows[name].append(torch.cat([next(grads).flatten() for _ in group]))
    return {name: torch.stack(r) for name, r in rows.items()}


def measure(method, batches: list[dict], num_data: int, repeats: int, estimators=("flipout",),
            resamples: int = 200) -> dict:
    """``{estimator: {group: {"variance", "mean_sq"}}, "ratio": {estimator: {group: [ratio, low, high]}}}``:
    variances and squared mean norms averaged over ``batches`` (common seeds per batch), and each of
    ``estimators`` (``ESTIMATORS``) / shared with a 95% bootstrap interval (the draws of each batch and
    estimator resampled with replacement)."""
    elbos = {"shared C": FullWeightELBO(), **{name: ESTIMATORS[name]() for name in estimators}}
    draws = {estimator: [gradient_draws(method, batch, num_data, elbo, repeats, seed=k) for k, batch in enumerate(batches)]
             for estimator, elbo in elbos.items()}

    def variance(per_batch: list[dict], name: str, rows=None) -> float:
        return sum(float((d[name] if rows is None else d[name][r]).var(0).sum())
                   for d, r in zip(per_batch, rows or [None] * len(per_batch))) / len(per_batch)

    out = {estimator: {name: {"variance": variance(per_batch, name),
                              "mean_sq": sum(float(d[name].mean(0).square().sum()) for d in per_batch) / len(per_batch)}
                       for name in GROUPS} for estimator, per_batch in draws.items()}
    generator = torch.Generator().manual_seed(0)
    out["ratio"] = {estimator: {} for estimator in estimators}
    for estimator in estimators:
        for name in GROUPS:
            boot = []
            for _ in range(resamples):
                rows = {e: [torch.randint(repeats, (repeats,), generator=generator) for _ in batches]
                        for e in ("shared C", estimator)}
                shared = variance(draws["shared C"], name, rows["shared C"])  # 0 if a resample repeats one draw
                boot.append(variance(draws[estimator], name, rows[estimator]) / shared if shared > 0 else float("nan"))
            low, high = torch.nanquantile(torch.tensor(boot), torch.tensor([0.025, 0.975])).tolist()
            out["ratio"][estimator][name] = [out[estimator][name]["variance"] / out["shared C"][name]["variance"],
                                             low, high]
    return out


def run(run_dir: str, num_batches: int, repeats: int, widen: float, estimators=("flipout",)) -> dict:
    settings = load_settings(run_dir)
    if not settings.method.startswith("melora") or settings.method == "melora-diag":
        raise SystemExit(f"{run_dir}: a melora / melora-elementwise / melora-noise run is needed, "
                         f"got method {settings.method!r}")
    method, task = load_run(settings, run_dir)
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(len(task.train), generator=generator).tolist()
    size = settings.train.batch_size
    batches = [task.collate([task.train[i] for i in order[k * size:(k + 1) * size]]) for k in range(num_batches)]
    result = {"run_dir": str(run_dir), "method": settings.method, "batch_size": size, "batches": num_batches,
              "repeats": repeats, "widen": widen, "estimators": list(estimators), "conditions": {}}
    log_scale = method.guide.param_roles()["scale"][0]
    trained = log_scale.detach().clone()
    for condition, shift in (("trained", 0.0), (f"Omega x {widen:g}", float(torch.tensor(widen).log()))):
        with torch.no_grad():
            log_scale.copy_(trained + shift)
        omega = log_scale.detach().exp().flatten()
        start = time.time()
        result["conditions"][condition] = {
            "omega_quantiles": torch.quantile(omega, torch.tensor([0.1, 0.5, 0.9])).tolist(),
            "estimators": measure(method, batches, len(task.train), repeats, estimators), "seconds": time.time() - start}
        print(condition, json.dumps(result["conditions"][condition]), flush=True)
    with torch.no_grad():
        log_scale.copy_(trained)
    return result


def markdown(result: dict, command: str) -> str:
    estimators = result.get("estimators", ["flipout"])
    lines = [f"# {', '.join(estimators).capitalize()} vs one shared C: Me-LoRA's ELBO gradient variance", "",
             f"Command: `{command}`", "",
             f"Run `{result['run_dir']}` ({result['method']}), {result['batches']} fixed training batches of "
             f"{result['batch_size']}, {result['repeats']} gradient draws per batch and estimator "
             "(common seeds). Variance: summed over a group's entries, averaged over batches; |mean|^2: the "
             "squared norm of the mean gradient (the signal); the interval: 200 bootstrap resamples of the draws. "
             "An antithetic draw is a pair (two forward passes): it beats two independent shared draws only "
             "below a ratio of 0.5.", ""]
    for condition, c in result["conditions"].items():
        q = " / ".join(f"{v:.3g}" for v in c["omega_quantiles"])
        ratios = c["estimators"]["ratio"]
        lines += [f"## {condition} (Omega 10/50/90%: {q}; {c['seconds']:.0f} s)", "",
                  "| group | variance, shared C | " + " | ".join(f"variance, {e}" for e in estimators) + " | "
                  + " | ".join(f"{e} / shared [95% CI]" for e in estimators) + " | |mean|^2 (shared) |",
                  "|---|---|" + "---|" * (2 * len(estimators)) + "---|"]
        shared = c["estimators"]["shared C"]
        for name in GROUPS:
            cells = [f"{c['estimators'][e][name]['variance']:.4g}" for e in estimators]
            cells += ["{:.3f} [{:.3f}, {:.3f}]".format(*ratios[e][name]) for e in estimators]
            lines.append(f"| {name} | {shared[name]['variance']:.4g} | " + " | ".join(cells)
                         + f" | {shared[name]['mean_sq']:.4g} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", required=True, help="a finished melora run directory")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=16)
    parser.add_argument("--widen", type=float, default=10.0, help="the second condition's Omega factor")
    parser.add_argument("--estimators", nargs="+", choices=sorted(ESTIMATORS), default=["flipout"],
                        help="compared with one shared C")
    parser.add_argument("--out", default="results/flipout_variance")
    args = parser.parse_args(argv)
    command = "python -m experiments.flipout_variance " + shlex.join(sys.argv[1:] if argv is None else argv)
    result = run(args.run_dir, args.batches, args.repeats, args.widen, args.estimators)
    result["command"] = command
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_file(out, ".json"), json.dumps(result, indent=2) + "\n")
    atomic_write_text(out_file(out, ".md"), markdown(result, command))
    print(markdown(result, command))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
