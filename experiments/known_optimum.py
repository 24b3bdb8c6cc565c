"""How close training gets to a known mean-field optimum, by schedule and step budget.

    python -m experiments.known_optimum [--seeds 0 1 2 3 4 5] [--out results/known_optimum]

The problem of tests/test_posterior.py (``melora_pyro.synthetic.linear_gaussian_problem``: a likelihood
linear-Gaussian in C, the full-weight prior; ``MeanFieldGuide``, ``FullWeightELBO`` with one draw or
antithetic pairs, batch 4 of 8 examples), one problem per seed, trained by :func:`melora_pyro.train.train`
under each entry of ``CONFIGS`` (``TrainConfig`` overrides of the defaults). Per run: the relative error of
M (Frobenius), the largest relative error of Omega's 10%, 50% and 90% quantiles and the mean
|log(Omega / Omega_opt)| per entry (what the test of the defaults checks). Writes
``<out>.{md,json}`` with the worst and median over the seeds.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import pyro
import torch

from guides import MeanFieldGuide
from melora_pyro._atomic import atomic_write_text
from melora_pyro.elbo import FullWeightELBO
from melora_pyro.synthetic import collate_pairs, linear_gaussian_problem
from melora_pyro.train import TrainConfig, train

from . import out_file

CONFIGS = {  # TrainConfig overrides; "antithetic" / "num_particles" go to FullWeightELBO (default: one draw)
    "single draws, constant rates, 300 steps (the defaults before antithetic pairs)": {},
    "single draws, linear decay": {"lr_schedule": "linear"},
    "single draws, linear decay, guide rates 3e-2 / 1e-1": {"lr_schedule": "linear", "guide_lr": 3e-2,
                                                            "guide_scale_lr": 1e-1},
    "single draws, batch 8 (full)": {"batch_size": 8},
    "single draws, 1,000 steps": {"steps": 1000},
    "single draws, linear decay, 1,000 steps": {"lr_schedule": "linear", "steps": 1000},
    "single draws, 3,000 steps": {"steps": 3000},
    "single draws, linear decay, 3,000 steps": {"lr_schedule": "linear", "steps": 3000},
    "single draws, 2 particles (the compute of a pair)": {"num_particles": 2},
    "**antithetic pairs (the defaults: train()'s ELBO)**": {"antithetic": True},
    "antithetic pairs, 600 steps": {"antithetic": True, "steps": 600},
    "antithetic pairs, guide scale lr 3e-2": {"antithetic": True, "guide_scale_lr": 3e-2},
    "antithetic pairs, linear decay, 3,000 steps": {"antithetic": True, "lr_schedule": "linear", "steps": 3000},
}


def errors(seed: int, overrides: dict) -> dict[str, float]:
    """Train on problem ``seed`` with ``TrainConfig(**overrides)`` (its ``antithetic`` and
    ``num_particles`` go to ``FullWeightELBO``); the errors against its optimum."""
    overrides = dict(overrides)
    elbo = FullWeightELBO(antithetic=overrides.pop("antithetic", False),
                          num_particles=overrides.pop("num_particles", 1))
    pyro.set_rng_seed(0)
    model, X, y = linear_gaussian_problem(seed)
    M_opt, omega_opt = model.optimum(X, y)
    guide = MeanFieldGuide(model)
    train(model, guide, list(zip(X, y)), collate_pairs, TrainConfig(**overrides), elbo=elbo, progress=False)
    M, omega = guide.loc.detach()[0], guide.scale.detach()[0]
    q = torch.tensor([0.1, 0.5, 0.9])
    quantiles = torch.quantile(omega.flatten(), q) / torch.quantile(omega_opt.flatten(), q) - 1
    return {"m": ((M - M_opt).norm() / M_opt.norm()).item(), "quantile": quantiles.abs().max().item(),
            "log": (omega / omega_opt).log().abs().mean().item()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=list(range(6)))
    parser.add_argument("--out", default="results/known_optimum")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start, doc = time.process_time(), {}
    lines = ["# Distance to a known mean-field optimum, by schedule and step budget", "",
             f"Command: `python -m experiments.known_optimum --seeds {' '.join(map(str, args.seeds))}`", "",
             f"The known-optimum problem of `tests/test_posterior.py`, problem seeds {args.seeds}; worst / median "
             "over the seeds. The test of the defaults asks mean abs log(Omega / Omega_opt) below 0.1 (Omega within "
             "10% in the geometric mean over its entries) and M within 10%.", "",
             "| training | M error | largest Omega-quantile error | mean abs log(Omega / Omega_opt) |",
             "|---|---|---|---|"]
    for name, overrides in CONFIGS.items():
        runs = [errors(seed, overrides) for seed in args.seeds]
        doc[name] = {"overrides": overrides, "runs": runs}
        cells = [f"{max(r[k] for r in runs):.3f} / {statistics.median(r[k] for r in runs):.3f}"
                 for k in ("m", "quantile", "log")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    lines += ["", f"CPU time: {time.process_time() - start:.0f} s (one thread)."]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_file(out, ".md"), "\n".join(lines) + "\n")
    atomic_write_text(out_file(out, ".json"), json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
