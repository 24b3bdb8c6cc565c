"""Where BLoB's posterior std ends up: the official two-optimiser scheme (``blob``) vs one AdamW on the
re-weighted ELBO (``blob-adamw``), everything else equal.

    python -m experiments.blob_sigma [--model /work/shared/models/stories260K] [--cycles 2] [--out results/blob_sigma]

Both methods train q_proj / v_proj adapters (r = 8, alpha = 16) of the base model on the embedded toy task
(600 training questions, batch 4) for ``cycles`` KL re-weighting cycles (BLoB's ``M``) with the reference
recipe (AdamW lr 1e-4, eps 1e-6, 6% warmup then linear decay; ``blob``: SGD lr 0.01 on the KL), then
report the 10/50/90% quantiles of sigma = G^2 over every A entry, the KL, and accuracy / NLL on the
100 validation questions (10 Flipout samples). Writes ``<out>.json`` and ``<out>.md`` (with the command).
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from melora_pyro import data
from melora_pyro._atomic import atomic_write_text
from melora_pyro.baselines import blob_kl, blob_kl_cycle
from melora_pyro.config import MeLoRAConfig
from melora_pyro.methods import build_method
from melora_pyro.metrics import summarize
from melora_pyro.models import load_base_model
from melora_pyro.train import TrainConfig, evaluate

from . import out_file

QUANTILES = (0.1, 0.5, 0.9)
BATCH, MAX_LENGTH, EVAL_SAMPLES = 4, 96, 10


def sigma_quantiles(guide) -> list[float]:
    sigma = torch.cat([s.detach().flatten() for s in guide.scales()])
    return torch.quantile(sigma, torch.tensor(QUANTILES)).tolist()


def run(model_path: str, cycles: int, seed: int = 0) -> dict:
    tokenizer = load_base_model(model_path)[1]
    train = data.load_examples("toy", "train")
    val = data.load_examples("toy", "validation")
    ids = data.label_token_ids(tokenizer, 4)

    def collate(examples):
        return data.encode(tokenizer, examples, MAX_LENGTH, num_labels=4)

    steps = cycles * blob_kl_cycle(len(train), BATCH)
    config = TrainConfig(steps=steps, batch_size=BATCH, lr=1e-4, seed=seed, lr_schedule="linear",
                         warmup_ratio=0.06, adam_eps=1e-6)
    adapter = MeLoRAConfig(rank=8, alpha=16, target_modules=("q_proj", "v_proj"))
    out = {"steps": steps, "cycle": blob_kl_cycle(len(train), BATCH), "train_config": vars(config), "methods": {}}
    for name in ("blob", "blob-adamw"):
        method = build_method(name, lambda: load_base_model(model_path)[0], adapter, ids, seed=seed)
        start_quantiles = sigma_quantiles(method.guide)
        start = time.time()
        history = method.fit(train, collate, config)
        seconds = time.time() - start
        torch.manual_seed(seed)
        probs, labels = evaluate(lambda b: method.predict(b, EVAL_SAMPLES), val, collate, progress=False)
        out["methods"][name] = {
            "sigma_quantiles_start": start_quantiles, "sigma_quantiles_end": sigma_quantiles(method.guide),
            "kl_end": float(blob_kl(method.guide, adapter.prior_std).detach()), "train_seconds": seconds,
            "last_train_nll": history[-1]["nll"] / len(train), "validation": summarize(probs, labels)}
        print(name, out["methods"][name], flush=True)
    return out


def markdown(result: dict, command: str) -> str:
    q = " / ".join(f"{int(100 * p)}%" for p in QUANTILES)
    lines = [f"# BLoB's posterior std: two optimisers vs one AdamW", "", f"Command: `{command}`", "",
             f"{result['steps']} steps = {result['steps'] // result['cycle']} KL cycles of M = {result['cycle']} "
             f"(batch {BATCH}, 600 toy training questions), AdamW lr 1e-4, eps 1e-6, 6% warmup + linear decay; "
             f"`blob`: SGD lr 0.01 on pi_i KL. sigma = G^2 over every entry of A.", "",
             f"| method | sigma {q} at start | sigma {q} at end | KL at end | val ACC | val NLL | train s |",
             "|---|---|---|---|---|---|---|"]
    for name, r in result["methods"].items():
        fmt = lambda qs: " / ".join(f"{v:.4g}" for v in qs)  # noqa: E731
        lines.append(f"| `{name}` | {fmt(r['sigma_quantiles_start'])} | {fmt(r['sigma_quantiles_end'])} | "
                     f"{r['kl_end']:.4g} | {r['validation']['acc']:.3f} | {r['validation']['nll']:.4f} | "
                     f"{r['train_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="/work/shared/models/stories260K")
    parser.add_argument("--cycles", type=int, default=2)
    parser.add_argument("--out", default="results/blob_sigma")
    args = parser.parse_args(argv)
    command = "python -m experiments.blob_sigma " + shlex.join(argv if argv is not None else sys.argv[1:])
    result = run(args.model, args.cycles)
    result["command"] = command.strip()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_file(out, ".json"), json.dumps(result, indent=2))
    atomic_write_text(out_file(out, ".md"), markdown(result, command.strip()))
    print(markdown(result, command.strip()))


if __name__ == "__main__":
    main()
