"""How far a trained posterior's draws move each adapted weight matrix, against the mean update.

    python -m experiments.weight_reach --run-dir runs/overfitting/arc-e/melora-8ep-s0 [--out results/weight_reach_...]

A posterior can be wide and still leave the answers alone; this separates the two. Per adapted layer, in
closed form from the run's last checkpoint (nothing is scored):

- ``mean``: ``|E dW|_F``, the update of the posterior-mean model;
- ``spread``: ``sqrt(E |dW - E dW|_F^2)``, the draws' root-mean-square distance from it.

Me-LoRA (a mean-field guide on C, ``dW = s B C A``, ``C_ij ~ N(M_ij, Omega_ij^2)`` independent):
``E dW = s B M A`` and ``spread^2 = s^2 sum_ij Omega_ij^2 |B_:i|^2 |A_j:|^2``. BLoB (``q(A_in) =
N(M_in, sigma_in^2)``, ``dW = s B A``): ``E dW = s B M`` and ``spread^2 = s^2 sum_in sigma_in^2 |B_:i|^2``.
LAP (``q(A, B)`` diagonal Gaussian around the MAP ``(A*, B*)``, stds ``a_jk``, ``b_pj``; ``dW = s B A``):
``E dW = s B* A*`` and ``spread^2 = s^2 [sum_pj b_pj^2 (|A*_j:|^2 + sum_k a_jk^2) + sum_jk a_jk^2 |B*_:j|^2]``
(the draws its ``weights`` predictive makes). Its GLM predictive linearises in (A, B), so it sees only the
first-order part ``s (dB A* + B* dA)``: ``linear`` drops the ``b^2 a^2`` term. (Me-LoRA's and BLoB's dW
are linear in their latent: there ``linear = spread``.) For LAP also ``prior_share``: the fraction of
``linear^2`` carried by parameters the data leave at the prior (curvature below 1% of the prior precision
lambda, so their std is ``1 / sqrt(lambda)`` within 0.5%).
All in the units of W0's entries; ``|W0|_F`` is printed alongside for scale.
"""
from __future__ import annotations

import argparse

import torch

from melora_pyro.baselines import LaplaceMethod
from melora_pyro.pipeline import load_run
from melora_pyro.runs import load_settings

from . import report_run_analysis


def _unbind(stacks) -> list[torch.Tensor]:
    return [t for stack in stacks for t in stack.unbind(0)]


@torch.no_grad()
def reach(method) -> list[dict]:
    """Per adapted layer of a trained ``method`` (in its model's ``layer_names`` order): ``{"layer",
    "mean", "spread", "linear", "w0"}`` (Frobenius norms, see the module). ``method``: Me-LoRA (a mean-field guide
    on C, ``loc`` and ``scale`` ``(L, r, r)``), BLoB (its guide on A) or a fitted ``LaplaceMethod``;
    ``ValueError`` for any other."""
    extra = {}
    if isinstance(method, LaplaceMethod):
        model = method.map.model
        means, spreads, linears, extra["prior_share"] = _laplace(model, method)
    else:
        model, guide = getattr(method, "model", None), getattr(method, "guide", None)
        if hasattr(guide, "log_scale"):
            means, spreads = _mean_field_c(model, guide)
        elif hasattr(guide, "sqrt_scale"):
            means, spreads = _blob(model, guide)
        else:
            raise ValueError(f"weight reach needs a mean-field guide on C, BLoB's guide on A or a Laplace "
                             f"posterior, got {type(method).__name__} with {type(guide).__name__}")
        linears = spreads
    rows = [{"layer": name, "mean": float(mean.norm()), "spread": float(spread), "linear": float(linear),
             "w0": float(model.base.get_submodule(name).base.weight.norm())}  # the adapter wraps W0's layer
            for name, mean, spread, linear in zip(model.layer_names, means, spreads, linears)]
    for key, values in extra.items():
        for row, value in zip(rows, values):
            row[key] = float(value)
    return rows


def _mean_field_c(model, guide):
    """q(C), with A and B as the layers use them."""
    s = model.config.scaling
    A, B = (_unbind(x) for x in model.fix_gauge(list(model.lora_A), list(model.lora_B)))
    M, omega = guide.loc.unbind(0), guide.scale.unbind(0)
    means = [s * b @ m @ a for a, b, m in zip(A, B, M)]
    spreads = [s * (o.square() * b.square().sum(0)[:, None] * a.square().sum(1)[None, :]).sum().sqrt()
               for a, b, o in zip(A, B, omega)]
    return means, spreads


def _blob(model, guide):
    """BLoB's q(A), B a point estimate."""
    s = model.config.scaling
    B, M, sigma = _unbind(model.lora_B), _unbind(guide.loc), _unbind(guide.scales())
    means = [s * b @ m for b, m in zip(B, M)]
    spreads = [s * (sd.square() * b.square().sum(0)[:, None]).sum().sqrt() for b, sd in zip(B, sigma)]
    return means, spreads


def _laplace(model, method: LaplaceMethod):
    """LAP's diagonal q(A, B) around the MAP; its draws perturb the stored A and B (no gauge)."""
    if model.config.gauge != "none":
        raise ValueError(f"weight reach of a Laplace posterior needs gauge 'none', got {model.config.gauge!r}")
    s, groups = model.config.scaling, len(model.lora_A)
    stds = method.posterior_std()
    A, B = _unbind(model.lora_A), _unbind(model.lora_B)
    a_var, b_var = (_unbind([x.square() for x in stds[:groups]]), _unbind([x.square() for x in stds[groups:]]))
    free = method.prior_held()
    a_free, b_free = _unbind(free[:groups]), _unbind(free[groups:])
    means = [s * b @ a for a, b in zip(A, B)]
    a_terms = [av * b.square().sum(0)[:, None] for b, av in zip(B, a_var)]  # (r, n): dA's share of linear^2
    b_terms = [bv * a.square().sum(1)[None, :] for a, bv in zip(A, b_var)]  # (m, r): dB's
    first = [at.sum() + bt.sum() for at, bt in zip(a_terms, b_terms)]
    second = [(bv * av.sum(1)[None, :]).sum() for av, bv in zip(a_var, b_var)]
    shares = [(at[af].sum() + bt[bf].sum()) / f for at, bt, af, bf, f in zip(a_terms, b_terms, a_free, b_free, first)]
    return means, [s * (f + g).sqrt() for f, g in zip(first, second)], [s * f.sqrt() for f in first], shares


def measure(run_dir) -> dict:
    """``{"run_dir", "method", "layers": reach(...)}`` of a finished run (nothing is scored)."""
    settings = load_settings(run_dir)
    return {"run_dir": str(run_dir), "method": settings.method, "layers": reach(load_run(settings, run_dir)[0])}


def markdown(result: dict, command: str) -> str:
    rows = result["layers"]
    lines = [f"# Weight reach: {result['run_dir']}", "", f"Command: `{command}`", "",
             f"{result['method']}: per adapted layer, the posterior-mean update ‖E dW‖ (Frobenius), the draws' spread "
             "sqrt(E ‖dW - E dW‖²), its part linear in the latent (what a linearised predictive sees; "
             "closed form, experiments/weight_reach.py) and the frozen ‖W0‖.", "",
             "| layer | ‖E dW‖ | spread | linear part | spread / ‖E dW‖ | ‖W0‖ |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['layer']} | {r['mean']:.3f} | {r['spread']:.3f} | {r['linear']:.3f} | "
              f"{r['spread'] / r['mean']:.2f} | {r['w0']:.1f} |" for r in rows]
    if "prior_share" in rows[0]:
        lines += ["", "Share of the linear part's square carried by parameters the data leave at the prior "
                  "(curvature below 1% of the prior precision): " +
                  ", ".join(f"{r['layer']} {r['prior_share']:.1%}" for r in rows) + "."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--out", help="write <out>.md and <out>.json")
    args = parser.parse_args(argv)
    return report_run_analysis("weight_reach", argv, args.out, lambda: measure(args.run_dir), markdown)

if __name__ == "__main__":
    raise SystemExit(main())
