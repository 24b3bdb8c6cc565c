"""A plain LoRA trained with peft's own API, then made Bayesian here (q(C) post hoc, A and B frozen).

    python -m experiments.peft_posthoc train-peft --data-dir ../shared/data --out results/peft_posthoc

trains a LoRA with ``peft.get_peft_model`` and a plain torch loop on ARC-Easy with cloze scoring (the
loss is the cross-entropy of the softmax over the choices' summed continuation log-likelihoods, the
lm-evaluation-harness form ``"Question: {q}\\nAnswer:"`` + ``" {choice}"``), on SmolLM2-135M's top
decoder layers, and saves the adapter with ``save_pretrained`` into ``<out>/peft_adapter``. It scores
that adapter on the test subset the same way and writes ``<out>/peft_adapter_metrics.json``.
Nothing of melora_pyro's model or training is used in this stage: only its data loader and metrics.
The post-hoc stage is ``melora-pyro train --init-from-peft <out>/peft_adapter --freeze-ab`` (see
``results/peft_posthoc/README.md``).
"""
from __future__ import annotations

import argparse
import json
import random
import shlex
import sys
import time
from pathlib import Path

import torch

from melora_pyro import data
from melora_pyro.metrics import summarize
from melora_pyro.models import load_base_model


def cloze_rows(tokenizer, example: data.Example, bos: list[int]) -> list[tuple[list[int], list[int]]]:
    """``(context_ids, continuation_ids)`` per choice, as lm-eval's ``_encode_pair`` makes them."""
    context = f"Question: {example.question}\nAnswer:"
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    rows = []
    for choice in example.choices:
        whole = tokenizer(f"{context} {choice}", add_special_tokens=False)["input_ids"]
        rows.append((bos + context_ids, whole[len(context_ids):]))
    return rows


def choice_scores(lm, tokenizer, examples: list[data.Example], num_labels: int) -> torch.Tensor:
    """Summed continuation log-likelihoods ``(b, num_labels)`` (``-inf`` for absent choices), one
    left-padded sequence per choice; differentiable."""
    bos = data._bos_prefix(tokenizer)
    pairs = [(i, k, row) for i, ex in enumerate(examples) for k, row in enumerate(cloze_rows(tokenizer, ex, bos))]
    seqs = [(ctx + cont)[:-1] for _, _, (ctx, cont) in pairs]
    width, keep = max(map(len, seqs)), max(len(cont) for _, _, (_, cont) in pairs)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs])
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
    targets = torch.tensor([[pad] * (keep - len(c)) + c for _, _, (_, c) in pairs])
    scored = torch.tensor([[False] * (keep - len(c)) + [True] * len(c) for _, _, (_, c) in pairs])
    logits = lm(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                logits_to_keep=keep, use_cache=False).logits.float()
    token_logp = logits.log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1).masked_fill(~scored, 0.0)
    scores = torch.full((len(examples), num_labels), float("-inf"))
    index_i = torch.tensor([i for i, _, _ in pairs])
    index_k = torch.tensor([k for _, k, _ in pairs])
    return scores.index_put((index_i, index_k), token_logp.sum(-1))


@torch.no_grad()
def evaluate(lm, tokenizer, examples, num_labels: int, batch_size: int = 8) -> dict:
    probs = torch.cat([choice_scores(lm, tokenizer, examples[i:i + batch_size], num_labels).softmax(-1)
                       for i in range(0, len(examples), batch_size)])
    labels = torch.tensor([ex.label for ex in examples])
    return {**summarize(probs, labels), "n": len(examples)}


def train_peft(args) -> int:
    from peft import LoraConfig, get_peft_model

    started = time.time()
    torch.manual_seed(args.seed)
    base, tokenizer = load_base_model(args.model)
    layers = base.config.num_hidden_layers
    targets = [f"model.layers.{i}.self_attn.{m}" for i in range(layers - args.top_layers, layers)
               for m in ("q_proj", "v_proj")]
    model = get_peft_model(base, LoraConfig(r=args.rank, lora_alpha=args.alpha, target_modules=targets,
                                            lora_dropout=0.0, task_type="CAUSAL_LM"))
    train = data.load_examples("arc-e", "train", args.data_dir)
    test = random.Random(args.seed).sample(data.load_examples("arc-e", "test", args.data_dir), args.test_limit)
    num_labels = max(len(ex.choices) for ex in train + test)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    order = random.Random(args.seed).sample(range(len(train)), len(train))
    log = []
    model.train()
    for step in range(args.steps):
        batch = [train[order[(step * args.batch_size + j) % len(train)]] for j in range(args.batch_size)]
        scores = choice_scores(model, tokenizer, batch, num_labels)
        loss = torch.nn.functional.cross_entropy(scores, torch.tensor([ex.label for ex in batch]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        log.append({"step": step + 1, "loss": loss.item(), "seconds": round(time.time() - started, 1)})
        if (step + 1) % 10 == 0:
            print(json.dumps(log[-1]), flush=True)
    train_seconds = time.time() - started
    out = Path(args.out)
    model.save_pretrained(out / "peft_adapter")
    model.eval()
    metrics = evaluate(model, tokenizer, test, num_labels)
    result = {"command": "python -m experiments.peft_posthoc " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
              "train_seconds": round(train_seconds, 1), "eval_seconds": round(time.time() - started - train_seconds, 1),
              "test_metrics": metrics, "targets": targets, "train_log": log}
    (out / "peft_adapter_metrics.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("train_seconds", "eval_seconds", "test_metrics")}))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(required=True)
    stage = commands.add_parser("train-peft", help="train a plain LoRA with peft's API on ARC-Easy (cloze)")
    stage.add_argument("--model", default="smollm2-135m")
    stage.add_argument("--data-dir", required=True)
    stage.add_argument("--out", default="results/peft_posthoc")
    stage.add_argument("--top-layers", type=int, default=2)
    stage.add_argument("--rank", type=int, default=8)
    stage.add_argument("--alpha", type=float, default=16.0)
    stage.add_argument("--lr", type=float, default=3e-4)
    stage.add_argument("--steps", type=int, default=100)
    stage.add_argument("--batch-size", type=int, default=4)
    stage.add_argument("--test-limit", type=int, default=200)
    stage.add_argument("--seed", type=int, default=0)
    stage.set_defaults(handler=train_peft)
    args = parser.parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
