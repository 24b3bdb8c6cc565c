"""How far a trained posterior's draws move each adapted weight matrix, against the mean update.

    python -m experiments.weight_reach --run-dir runs/overfitting/arc-e/melora-8ep-s0 [--out results/weight_reach_...]

A posterior can be wide and still leave the answers alone; this separates the two. Per adapted layer, in
closed form from the run's last checkpoint (nothing is scored):

- ``mean``: ``|E dW|_F``, the update of the posterior-mean model;
- ``spread``: ``sqrt(E |dW - E dW|_F^2)``, the draws' root-mean-square distance from it.

Me-LoRA (a mean-field guide on C, ``dW = s B C A``, ``C_ij ~ N(M_ij, Omega_ij^2)`` independent):
``E dW = s B M A`` and ``spread^2 = s^2 sum_ij Omega_ij^2 |B_:i|^2 |A_j:|^2``. BLoB (``q(A_in) =
N(M_in, sigma_in^2)``, ``dW = s B A``): ``E dW = s B M`` and ``spread^2 = s^2 sum_in sigma_in^2 |B_:i|^2``.
Both in the units of W0's entries; ``|W0|_F`` is printed alongside for scale.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from melora_pyro._atomic import atomic_write_text
from melora_pyro.pipeline import load_run
from melora_pyro.runs import RunError, load_settings

from . import out_file


def _unbind(stacks) -> list[torch.Tensor]:
    return [t for stack in stacks for t in stack.unbind(0)]


@torch.no_grad()
def reach(model, guide) -> list[dict]:
    """Per adapted layer of ``model`` (in its ``layer_names`` order): ``{"layer", "mean", "spread", "w0"}``
    (Frobenius norms, see the module). ``guide``: a mean-field guide on C (``loc``, ``scale``, both
    ``(L, r, r)``) or BLoB's guide on A; ``ValueError`` for any other."""
    if not (hasattr(guide, "log_scale") or hasattr(guide, "sqrt_scale")):
        raise ValueError(f"weight reach needs a mean-field guide on C or BLoB's guide on A, "
                         f"got {type(guide).__name__}")
    s = model.config.scaling
    if hasattr(guide, "log_scale"):  # q(C): A and B as the layers use them
        A, B = (_unbind(x) for x in model.fix_gauge(list(model.lora_A), list(model.lora_B)))
        M, omega = guide.loc.unbind(0), guide.scale.unbind(0)
        means = [s * b @ m @ a for a, b, m in zip(A, B, M)]
        spreads = [s * (o.square() * b.square().sum(0)[:, None] * a.square().sum(1)[None, :]).sum().sqrt()
                   for a, b, o in zip(A, B, omega)]
    else:  # BLoB's q(A)
        B, M, sigma = _unbind(model.lora_B), _unbind(guide.loc), _unbind(guide.scales())
        means = [s * b @ m for b, m in zip(B, M)]
        spreads = [s * (sd.square() * b.square().sum(0)[:, None]).sum().sqrt() for b, sd in zip(B, sigma)]
    return [{"layer": name, "mean": float(mean.norm()), "spread": float(spread),
             "w0": float(model.base.get_submodule(name).base.weight.norm())}  # the adapter wraps W0's layer
            for name, mean, spread in zip(model.layer_names, means, spreads)]


def markdown(run_dir: str, method: str, rows: list[dict], command: str) -> str:
    lines = [f"# Weight reach: {run_dir}", "", f"Command: `{command}`", "",
             f"{method}: per adapted layer, the posterior-mean update ‖E dW‖ (Frobenius), the draws' spread "
             "sqrt(E ‖dW - E dW‖²) (closed form, experiments/weight_reach.py) and the frozen ‖W0‖.", "",
             "| layer | ‖E dW‖ | spread | spread / ‖E dW‖ | ‖W0‖ |", "|---|---|---|---|---|"]
    lines += [f"| {r['layer']} | {r['mean']:.3f} | {r['spread']:.3f} | {r['spread'] / r['mean']:.2f} | "
              f"{r['w0']:.1f} |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--out", help="write <out>.md and <out>.json")
    args = parser.parse_args(argv)
    try:
        settings = load_settings(args.run_dir)
        method, _ = load_run(settings, args.run_dir)
        rows = reach(method.model, method.guide)
    except (RunError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = markdown(args.run_dir, settings.method, rows,
                    "python -m experiments.weight_reach " + " ".join(argv or sys.argv[1:]))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_file(out, ".json"), json.dumps({"run_dir": args.run_dir, "method": settings.method,
                                                                "layers": rows}, indent=2))
        atomic_write_text(out_file(out, ".md"), text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
