"""Benchmark of cloze scoring and the prefix cache (DESIGN.md section 6, last two items).

    python -m experiments.bench_cloze [--questions 32] [--data-dir ../shared/data] [--out results/bench_cloze.md]

Measured in one run on SmolLM2-135M and real ARC-Easy test questions, contenders interleaved repeat
by repeat (``experiments.bench.interleaved``; CPU timer: the process's CPU time on one torch thread):

1. Packed cloze scoring (``choice_loglikelihoods``: the context once, K continuations after it, only
   continuation positions through ``lm_head``) against K separate sequences per question scored as
   lm-evaluation-harness does (one row per choice, logits at every position). Target: <= 0.4x.
2. The prefix cache with adapters on the top 1 and top 2 decoder layers (+ ``lm_head``): one MAP
   training step (ELBO loss and backward) and a 4-sample Me-LoRA evaluation, cached vs uncached.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import pyro
import torch

from experiments.bench import interleaved, machine_info, mmm, ratios, verdict
from guides import IdentityGuide, MeanFieldGuide
from melora_pyro import FullWeightELBO, MeLoRAConfig, MeLoRAModel, predict_proba
from melora_pyro._atomic import atomic_write_text
from melora_pyro.cloze import template_for
from melora_pyro.data import _bos_prefix, load_examples
from melora_pyro.models import load_base_model
from melora_pyro.packing import encode_pair, pack_batch, pack_example
from melora_pyro.prefix_cache import PrefixCachedLM, top_layer_targets
from melora_pyro.readouts import ClozeReadout, readout_inputs
from melora_pyro.scoring import choice_loglikelihoods

TARGET_PACKED = 0.4


def separate_scores(lm, tokenizer, examples, batch_size: int) -> None:
    """K right-padded rows per question, full-sequence logits (the harness's way), summed log-probs."""
    bos = _bos_prefix(tokenizer)
    rows = [encode_pair(tokenizer, c, x, bos) for ex in examples for c, x in template_for("arc-e").pairs(ex)]
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            width = max(len(c) + len(x) for c, x in chunk)
            ids = torch.tensor([c + x + [0] * (width - len(c) - len(x)) for c, x in chunk])
            mask = torch.tensor([[1] * (len(c) + len(x)) + [0] * (width - len(c) - len(x)) for c, x in chunk])
            logp = lm(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)
            for i, (c, x) in enumerate(chunk):
                sum(float(logp[i, len(c) + j - 1, t]) for j, t in enumerate(x))


def packing_section(lm, tokenizer, examples, batch_size: int, repeats: int) -> tuple[list[str], dict]:
    packed_rows = [pack_example(tokenizer, ex, template_for("arc-e"), 1024) for ex in examples]
    separate_tokens = sum(len(c) + len(x) for ex in examples
                          for c, x in (encode_pair(tokenizer, c, x, _bos_prefix(tokenizer))
                                       for c, x in template_for("arc-e").pairs(ex)))
    packed_tokens = sum(len(r.tokens) for r in packed_rows)
    times = interleaved({
        "separate": lambda: separate_scores(lm, tokenizer, examples, batch_size * 4),
        "packed": lambda: choice_loglikelihoods(lm, tokenizer, examples, "sum", batch_size=batch_size),
    }, repeats=repeats)
    r = ratios(times, "separate")["packed"]
    lines = ["## 1. Packed cloze scoring vs K separate sequences", "",
             f"{len(examples)} ARC-Easy test questions ({sum(len(e.choices) for e in examples)} choices); "
             f"tokens through the model: packed {packed_tokens:,}, separate {separate_tokens:,} "
             f"({packed_tokens / separate_tokens:.2f}x).", "",
             "| contender | CPU s per question (min / median / max) |", "|---|---|"]
    for name, ts in times.items():
        lines.append(f"| {name} | {mmm([t / len(examples) for t in ts])} |")
    lines += ["", f"packed / separate: {mmm(r)} (target <= {TARGET_PACKED}): **{verdict(min(r), TARGET_PACKED)}** "
              f"(best repeat; median {sorted(r)[len(r) // 2]:.3f})", ""]
    return lines, {"times": times, "ratio": r, "tokens": (packed_tokens, separate_tokens)}


def cache_section(model_name: str, tokenizer, examples, top_layers: tuple[int, ...], repeats: int,
                  samples: int) -> tuple[list[str], dict]:
    rows = [pack_example(tokenizer, ex, template_for("arc-e"), 1024) for ex in examples]
    batch = pack_batch(rows, max(len(e.choices) for e in examples))
    lines = ["## 2. Prefix cache: cached vs uncached", "",
             f"A batch of {len(examples)} packed ARC-Easy questions; adapters (r = 8) on q_proj, v_proj of the top "
             f"k decoder layers and lm_head. Train: one MAP step (ELBO loss + backward, `IdentityGuide`). "
             f"Evaluate: `predict_proba` with {samples} samples (`MeanFieldGuide`). The cache is warm "
             "(filled once before timing, as `melora-pyro train --adapt-top-layers k` fills it before training).", "",
             "| k | contender | uncached CPU s | cached CPU s | cached / uncached (min / median / max) |",
             "|---|---|---|---|---|"]
    record = {}
    for k in top_layers:
        models = {}
        for cached in (False, True):
            lm, _ = load_base_model(model_name)
            layers = lm.config.num_hidden_layers
            if cached:
                lm = PrefixCachedLM(lm, layers - k)
                lm.warm([batch])
            config = MeLoRAConfig(rank=8, target_modules=top_layer_targets(("q_proj", "v_proj", "lm_head"), layers, k))
            pyro.clear_param_store()
            model = MeLoRAModel(lm, config, ClozeReadout("token"))
            models[cached] = (model, IdentityGuide(model), MeanFieldGuide(model))
        extras = readout_inputs(batch)

        def train_step(model, point, _):
            loss = FullWeightELBO().differentiable_loss(model, point, batch["input_ids"], batch["attention_mask"],
                                                        batch["labels"], 1000, choice_mask=batch["choice_mask"],
                                                        **extras)
            loss.backward()

        def evaluate(model, _, guide):
            predict_proba(model, guide, batch["input_ids"], batch["attention_mask"], num_samples=samples,
                          choice_mask=batch["choice_mask"], **extras)
        for label, fn in (("train step", train_step), ("evaluate", evaluate)):
            times = interleaved({"uncached": lambda: fn(*models[False]), "cached": lambda: fn(*models[True])},
                                repeats=repeats)
            r = ratios(times, "uncached")["cached"]
            record[f"top{k}/{label}"] = {"times": times, "ratio": r}
            lines.append(f"| {k} | {label} | {min(times['uncached']):.3f} | {min(times['cached']):.3f} | {mmm(r)} |")
    return lines + [""], record


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--questions", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="results/bench_cloze.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # CPU time of one thread: robust to other jobs on a shared machine
    command = "python -m experiments.bench_cloze " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    lm, tokenizer = load_base_model(args.model)
    examples = load_examples("arc-e", "test", args.data_dir)[:args.questions]
    lines = ["# Cloze scoring and prefix-cache benchmark", "", f"Command: `{command}`", ""] + machine_info("cpu") + [""]
    section, _ = packing_section(lm, tokenizer, examples, args.batch_size, args.repeats)
    lines += section
    section, _ = cache_section(args.model, tokenizer, examples[:args.batch_size], (1, 2), args.repeats, 4)
    lines += section
    report = "\n".join(lines) + "\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(args.out), report)
    print(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
