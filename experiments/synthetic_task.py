"""The synthetic 4-way task of tests/test_model.py on a tiny random LLaMA (q_proj, v_proj, lm_head, rank 8):
test accuracy (4-sample BMA), final KL / NLL and Omega quantiles of plain LoRA (mle, IdentityGuide),
melora-elementwise and melora (full-weight KL), trained by the shared loop (batch 32).

    python -m experiments.synthetic_task [STEPS=200] [LR=1e-2] [METHODS=mle,melora-elementwise,melora] [JSON]

JSON: {"adapter": {MeLoRAConfig fields}, "train": {TrainConfig fields}}, e.g. '{"adapter": {"gauge": "unit"}}'.
"""
import json
import sys
import time

import torch
from tests.test_model import _separable_but_noisy_task, LABELS
from melora_pyro import MeLoRAConfig
from melora_pyro.methods import build_method
from melora_pyro.models import tiny_llama
from melora_pyro.train import TrainConfig

steps = int(sys.argv[1]) if len(sys.argv) > 1 else 200
lr = float(sys.argv[2]) if len(sys.argv) > 2 else 1e-2
methods = sys.argv[3].split(",") if len(sys.argv) > 3 else ["mle", "melora-elementwise", "melora"]
extra = json.loads(sys.argv[4]) if len(sys.argv) > 4 else {}
tx, ty = _separable_but_noisy_task(256, seed=1)
vx, vy = _separable_but_noisy_task(256, seed=2)
train = list(zip(tx, ty))
collate = lambda ex: {"input_ids": torch.stack([x for x, _ in ex]), "labels": torch.stack([y for _, y in ex])}
config = MeLoRAConfig(target_modules=("q_proj", "v_proj", "lm_head"), **extra.get("adapter", {}))
for name in methods:
    t = time.time()
    m = build_method(name, tiny_llama, config, LABELS, seed=0)
    hist = m.fit(train, collate, TrainConfig(steps=steps, batch_size=32, lr=lr, **extra.get("train", {})))
    acc = (m.predict({"input_ids": vx, "labels": vy}, num_samples=4).argmax(-1) == vy).float().mean().item()
    last = hist[-1]
    om = {k: round(v, 4) for k, v in last.items() if k.startswith("omega")}
    g = getattr(m, "guide", None)
    mfro = g.loc.norm().item() if hasattr(g, "loc") and isinstance(g.loc, torch.Tensor) else None
    print(f"{name:20s} acc {acc:.3f} kl {last['kl']:.1f} nll {last['nll']:.1f} {om} |M|={mfro} ({time.time()-t:.0f}s)", flush=True)
