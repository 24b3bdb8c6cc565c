"""Training runs for tests/test_distributed.py and tests/test_resume.py, in a child process.

Importable (the tests use :func:`build`, :func:`examples`, :func:`collate` for their single-process
reference runs) and runnable:

    accelerate launch --multi_gpu --num_processes 2 tests/_distributed_worker.py distributed OUT
        every process runs the RUNS below; rank r writes OUT/<name>-rank<r>.safetensors (the final
        adapter and guide tensors) and OUT/<name>-rank<r>.json (world size, log records).
    python tests/_distributed_worker.py sigkill RUN_DIR MARKER
        trains 10 steps with checkpoint_every=5; while the step-10 checkpoint is being written
        (its temporary directory half full) it writes MARKER and sleeps, waiting for SIGKILL.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from guides import DeltaGuide, IdentityGuide, MeanFieldGuide
from melora_pyro import MeLoRAConfig, MeLoRAModel
from melora_pyro.models import tiny_llama
from melora_pyro.train import TrainConfig, train

LABELS = [10, 11, 12, 13]
GUIDES = {"meanfield": MeanFieldGuide, "delta": DeltaGuide, "identity": IdentityGuide}
NUM_EXAMPLES, SEQ = 24, 8
# name: (guide, per-process TrainConfig fields); the single-process twin uses batch_size * world.
RUNS = {
    "delta": ("delta", dict(steps=3, batch_size=2)),
    "delta-accum": ("delta", dict(steps=2, batch_size=2, grad_accum=2)),
    "meanfield": ("meanfield", dict(steps=4, batch_size=2)),
}
COMMON = dict(lr=1e-2, seed=0, log_every=1)
EVAL_EXAMPLES = 7


def build(guide: str = "meanfield", dtype: torch.dtype = torch.float32):
    """A fresh (model, guide) on a tiny random LLaMA, the same in every process."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        config = MeLoRAConfig(rank=4, gauge="none" if guide == "identity" else "unit")
        model = MeLoRAModel(tiny_llama().to(dtype), config, LABELS)
        return model, GUIDES[guide](model)


def examples(n: int = NUM_EXAMPLES) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    ids, labels = torch.randint(0, 128, (n, SEQ), generator=g), torch.randint(0, len(LABELS), (n,), generator=g)
    return [{"input_ids": ids[i], "label": int(labels[i])} for i in range(n)]


def collate(batch: list[dict]) -> dict:
    ids = torch.stack([ex["input_ids"] for ex in batch])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "labels": torch.tensor([ex["label"] for ex in batch])}


def posterior_mean_probs(model, guide, batch) -> torch.Tensor:
    from melora_pyro import predict_proba

    return predict_proba(model, guide, batch["input_ids"], batch["attention_mask"], num_samples=0)


def trained_tensors(model, guide) -> dict[str, torch.Tensor]:
    """Every adapter and guide tensor, by name."""
    return {**{f"model.{k}": v.detach().clone() for k, v in model.adapter_state_dict().items()},
            **{f"guide.{k}": v.detach().clone() for k, v in guide.state_dict().items()}}


def distributed(out: Path) -> None:
    from melora_pyro.train import evaluate, launched_accelerator

    accelerator = launched_accelerator()
    assert accelerator is not None, "not launched with several processes"
    rank = accelerator.process_index
    info = {"num_processes": accelerator.num_processes, "distributed_type": str(accelerator.distributed_type)}
    for name, (guide_name, fields) in RUNS.items():
        model, guide = build(guide_name)
        history = train(model, guide, examples(), collate, TrainConfig(**fields, **COMMON), progress=False)
        save_file(trained_tensors(model, guide), out / f"{name}-rank{rank}.safetensors")
        (out / f"{name}-rank{rank}.json").write_text(json.dumps({**info, "history": history}))
    # Sharded evaluation, gathered: EVAL_EXAMPLES (odd, so the last shard is padded) at the posterior mean.
    probs, labels = evaluate(lambda batch: posterior_mean_probs(model, guide, batch), examples()[:EVAL_EXAMPLES],
                             collate, batch_size=2, progress=False)
    save_file({"probs": probs, "labels": labels}, out / f"eval-rank{rank}.safetensors")
    # Checkpoints and resume under DDP: 2 steps, then a fresh model resumed to 4 (as "meanfield").
    run_dir = out / "run"
    config = dict(RUNS["meanfield"][1], checkpoint_every=2, **COMMON)
    train(*build("meanfield"), examples(), collate, TrainConfig(**{**config, "steps": 2}), run_dir=run_dir,
          progress=False)
    model, guide = build("meanfield")
    train(model, guide, examples(), collate, TrainConfig(**config), run_dir=run_dir, resume=True, progress=False)
    save_file(trained_tensors(model, guide), out / f"resumed-rank{rank}.safetensors")


def sigkill(run_dir: Path, marker: Path) -> None:
    import melora_pyro.checkpoint as checkpoint

    write = checkpoint.atomic_write_bytes

    def slow_write(path, data):
        write(path, data)
        if Path(path).parent.name.startswith(".tmp-step-00000010"):  # the state file is in, trainer.json not
            marker.write_text(str(path))
            time.sleep(600)

    checkpoint.atomic_write_bytes = slow_write
    model, guide = build("meanfield")
    train(model, guide, examples(), collate, TrainConfig(steps=10, batch_size=4, checkpoint_every=5, **COMMON),
          run_dir=run_dir, progress=False)


if __name__ == "__main__":
    torch.set_num_threads(1)
    mode, *args = sys.argv[1:]
    if mode == "distributed":
        distributed(Path(args[0]))
    elif mode == "sigkill":
        sigkill(Path(args[0]), Path(args[1]))
    else:
        sys.exit(f"unknown mode {mode!r}")
