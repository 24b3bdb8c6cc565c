"""Adapter training state per method: counted, and measured after one optimiser step.

    python -m experiments.memory [--model smollm2-135m] [--rank 8] [--alpha 16] [--methods ...] [--out results/memory]

For every method and two target sets (``q_proj+v_proj``, and ``+lm_head`` as in BLoB's protocol):

- **counted**: ``method.adapter_state()`` (trainable numbers, ``count_adapter_state``), at SmolLM2-135M's
  shapes and at LLaMA-7B's (32 layers, hidden 4096, vocab 32000), the latter built on the ``meta``
  device (shapes only, no memory);
- **measured**: bytes of the trainable tensors, their gradients and AdamW's moments after one
  training step of the shared loop's pieces (``ELBOModule`` + ``make_optimizer``), summed over the
  method's independently trained units (the ensemble's members). At SmolLM2's shapes on the real
  model; at LLaMA-7B's on a real 2-layer LLaMA-7B-shaped model (random bfloat16 weights, float32
  adapters), reported per decoder layer.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from melora_pyro._atomic import atomic_write_text
from melora_pyro.config import MeLoRAConfig
from melora_pyro.methods import METHODS, build_method
from melora_pyro.models import load_base_model
from melora_pyro.train import ELBOModule, TrainConfig, make_optimizer

from . import out_file

TARGETS = {"q_proj+v_proj": ("q_proj", "v_proj"), "q_proj+v_proj+lm_head": ("q_proj", "v_proj", "lm_head")}
LABEL_IDS = [330, 389, 340, 422, 469]  # any distinct ids below both vocabularies (the state does not depend on them)


def llama7b_config(num_layers: int = 32) -> LlamaConfig:
    return LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=num_layers,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)


def meta_llama7b():
    with torch.device("meta"):
        return LlamaForCausalLM(llama7b_config())


def small_llama7b():
    """A real 2-layer model with LLaMA-7B's widths, random bfloat16 weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return LlamaForCausalLM(llama7b_config(2)).to(torch.bfloat16).eval()


def measured_state_bytes(method, num_data: int = 4) -> dict[str, int]:
    """Bytes of params, grads and optimiser state of every unit of ``method`` after one step."""
    totals = {"params": 0, "grads": 0, "optimizer": 0}
    batch = {"input_ids": torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29]]), "attention_mask": torch.ones(1, 8, dtype=torch.long),
             "labels": torch.tensor([0])}
    for unit in method.units:
        module = ELBOModule(unit.model, unit.guide, unit.elbo)
        optimizer = make_optimizer(unit.model, unit.guide, unit.train_config(TrainConfig(steps=1, lr=1e-4)))
        module(batch, num_data)["loss"].backward()
        optimizer.step()
        trainable = [p for group in optimizer.param_groups for p in group["params"]]
        totals["params"] += sum(p.numel() * p.element_size() for p in trainable)
        totals["grads"] += sum(p.grad.numel() * p.grad.element_size() for p in trainable if p.grad is not None)
        totals["optimizer"] += sum(v.numel() * v.element_size() for state in optimizer.state.values()
                                   for v in state.values() if torch.is_tensor(v))
        optimizer.zero_grad(set_to_none=True)
    totals["total"] = sum(totals.values())
    return totals


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="the base model measured at its own shapes")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), metavar="METHOD")
    parser.add_argument("--out", default="results/memory", help="writes <out>.md and <out>.json")
    args = parser.parse_args(argv)
    command = "python -m experiments.memory" + "".join(" " + shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    rows = {}
    for target_name, targets in TARGETS.items():
        config = MeLoRAConfig(rank=args.rank, alpha=args.alpha, target_modules=targets)
        for name in args.methods:
            start = time.time()
            smol = build_method(name, lambda: load_base_model(args.model)[0], config, LABEL_IDS)
            row = {"smollm2_counted": smol.adapter_state(), "smollm2_measured": measured_state_bytes(smol)}
            del smol
            row["llama7b_counted"] = build_method(name, meta_llama7b, config, LABEL_IDS).adapter_state()
            if target_name == "q_proj+v_proj":  # measured per decoder layer on the 2-layer model
                small = build_method(name, small_llama7b, config, LABEL_IDS)
                measured = measured_state_bytes(small)
                row["llama7b_measured_per_layer"] = {k: v // 2 for k, v in measured.items()}
                del small
            rows[f"{target_name}/{name}"] = row
            print(f"{target_name} {name}: {row} ({time.time() - start:.0f}s)", flush=True)
    lines = render(rows, args, command)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_file(out, ".json"), json.dumps({"command": command, "rows": rows}, indent=1))
    atomic_write_text(out_file(out, ".md"), "\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    return 0


def render(rows: dict, args, command: str) -> list[str]:
    lines = ["# Adapter training state per method", "", f"Model {args.model}, r = {args.rank}, alpha = {args.alpha:g}.",
             "", f"Command: `{command}`", "",
             "Counted: trainable numbers (`method.adapter_state()`). Measured: bytes of trainable parameters + "
             "gradients + AdamW moments after one step of the shared loop (summed over an ensemble's members). "
             "LLaMA-7B counts use the meta device (32 layers); LLaMA-7B bytes are measured on a real 2-layer "
             "model of LLaMA-7B's widths and given per decoder layer (2 adapted 4096 x 4096 matrices). "
             "Ratios are against BLoB.", ""]
    for target_name in TARGETS:
        blob = rows.get(f"{target_name}/blob")
        lines += [f"## Targets: {target_name}", "",
                  "| method | SmolLM2 counted | SmolLM2 measured (bytes) | LLaMA-7B counted | ratio to BLoB (7B counted)"
                  + (" | LLaMA-7B measured per layer (bytes) | ratio to BLoB (7B measured) |" if target_name == "q_proj+v_proj" else " |"),
                  "|---|---|---|---|---|" + ("---|---|" if target_name == "q_proj+v_proj" else "")]
        for name in args.methods:
            row = rows.get(f"{target_name}/{name}")
            if row is None:
                continue
            ratio = f"{row['llama7b_counted'] / blob['llama7b_counted']:.3f}" if blob else "-"
            cells = [name, f"{row['smollm2_counted']:,}", f"{row['smollm2_measured']['total']:,}",
                     f"{row['llama7b_counted']:,}", ratio]
            if "llama7b_measured_per_layer" in row:
                measured = row["llama7b_measured_per_layer"]["total"]
                blob_measured = blob["llama7b_measured_per_layer"]["total"] if blob else None
                cells += [f"{measured:,}", f"{measured / blob_measured:.3f}" if blob_measured else "-"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
