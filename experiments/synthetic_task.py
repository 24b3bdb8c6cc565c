"""The synthetic 4-way task (``melora_pyro.synthetic.marked_token_task``) on a tiny random LLaMA
(q_proj, v_proj, lm_head): test accuracy (4-sample BMA), final KL / NLL, Omega quantiles and |M| of each
method, trained by the shared loop (batch 32). What tests/test_posterior.py checks, for one seed.

    python -m experiments.synthetic_task [--steps 200] [--lr 1e-2] [--methods mle melora-elementwise melora]
        [--settings JSON]

``--settings``: ``{"adapter": {MeLoRAConfig fields}, "train": {TrainConfig fields}}``, e.g.
``'{"adapter": {"gauge": "unit"}}'``.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from melora_pyro import MeLoRAConfig
from melora_pyro.methods import build_method
from melora_pyro.models import tiny_llama
from melora_pyro.synthetic import MARKED_TASK_LABELS, collate_pairs, marked_token_task
from melora_pyro.train import TrainConfig


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--methods", nargs="+", default=["mle", "melora-elementwise", "melora"])
    parser.add_argument("--settings", type=json.loads, default={}, help="JSON: adapter / train overrides")
    args = parser.parse_args(argv)
    train_x, train_y = marked_token_task(256, seed=1)
    test_x, test_y = marked_token_task(256, seed=2)
    config = MeLoRAConfig(target_modules=("q_proj", "v_proj", "lm_head"), **args.settings.get("adapter", {}))
    for name in args.methods:
        start = time.time()
        method = build_method(name, tiny_llama, config, MARKED_TASK_LABELS, seed=0)
        history = method.fit(list(zip(train_x, train_y)), collate_pairs,
                             TrainConfig(steps=args.steps, batch_size=32, lr=args.lr, **args.settings.get("train", {})))
        probs = method.predict({"input_ids": test_x, "labels": test_y}, num_samples=4)
        acc = (probs.argmax(-1) == test_y).float().mean().item()
        last = history[-1]
        omega = {k: round(v, 4) for k, v in last.items() if k.startswith("omega")}
        loc = getattr(getattr(method, "guide", None), "loc", None)
        norm = f"{loc.norm().item():.3f}" if isinstance(loc, torch.Tensor) else "-"
        print(f"{name:20s} acc {acc:.3f} kl {last['kl']:.1f} nll {last['nll']:.1f} {omega} |M| {norm} "
              f"({time.time() - start:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
