"""The training loop shared by the Python API, the CLI, the experiments and ``accelerate launch``.

An ``SVI(model, guide, optim, FullWeightELBO())`` script maps onto it one to one: the ELBO's
``differentiable_loss`` is the loss of :class:`ELBOModule` (so a distributed wrapper sees an
ordinary module), and one fused AdamW holds every adapter and guide parameter.
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .checkpoint import find_latest_checkpoint, load_training_state, save_training_state
from .elbo import FullWeightELBO

Batch = dict  # input_ids, attention_mask, labels, choice_mask: tensors with a leading batch axis


@dataclass
class TrainConfig:
    """Optimisation settings. ``lr``/``guide_lr`` are AdamW learning rates; ``weight_decay`` acts
    on A and B only (the MAP reading of a Gaussian prior on them); the global batch is
    ``batch_size * grad_accum`` examples per step."""

    steps: int = 300
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 1e-4
    guide_lr: float | None = None
    weight_decay: float = 0.0
    max_grad_norm: float | None = None
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 0

    def __post_init__(self):
        for name in ("steps", "batch_size", "grad_accum"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("lr", "weight_decay"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)!r}")


class NumericalError(RuntimeError):
    """A NaN or inf in the loss, the KL or a parameter: training stops before the update."""


class ELBOModule(nn.Module):
    """``forward(batch, num_data)`` returns the ELBO terms of model and guide on a batch.

    Wrapping model and guide in one module lets ``accelerate`` / DDP synchronise their gradients.
    """

    def __init__(self, model: nn.Module, guide: nn.Module, elbo: FullWeightELBO | None = None):
        super().__init__()
        self.model, self.guide = model, guide
        self.elbo = elbo or FullWeightELBO()

    def forward(self, batch: Batch, num_data: int) -> dict:
        return self.elbo.loss_terms(self.model, self.guide, batch["input_ids"], batch.get("attention_mask"),
                                    batch["labels"], num_data, choice_mask=batch.get("choice_mask"))


def make_optimizer(model: nn.Module, guide: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """One AdamW over all trainable adapter and guide parameters (weight decay on A and B only)."""
    groups = [{"params": [p for p in model.parameters() if p.requires_grad],
               "weight_decay": config.weight_decay}]
    guide_params = [p for p in guide.parameters() if p.requires_grad]
    if guide_params:
        groups.append({"params": guide_params, "weight_decay": 0.0, "lr": config.guide_lr or config.lr})
    return torch.optim.AdamW(groups, lr=config.lr, foreach=True)


class BatchOrder:
    """Shuffled epochs of example indices from a private generator, so the order is checkpointable."""

    def __init__(self, num_examples: int, batch_size: int, seed: int):
        if num_examples < 1:
            raise ValueError("the training set is empty")
        self.num_examples, self.batch_size = num_examples, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.order, self.position = torch.randperm(num_examples, generator=self.generator), 0

    def next(self) -> list[int]:
        indices = []
        while len(indices) < self.batch_size:
            if self.position == self.num_examples:
                self.order, self.position = torch.randperm(self.num_examples, generator=self.generator), 0
            take = min(self.batch_size - len(indices), self.num_examples - self.position)
            indices += self.order[self.position:self.position + take].tolist()
            self.position += take
        return indices

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "order": self.order, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.order, self.position = state["order"], int(state["position"])


def train(model: nn.Module, guide: nn.Module, examples: Sequence, collate: Callable[[list], Batch],
          config: TrainConfig, run_dir: str | Path | None = None, resume: bool = False,
          elbo: FullWeightELBO | None = None, accelerator=None, progress: bool = True) -> list[dict]:
    """Maximise the ELBO of ``model`` / ``guide`` on ``examples`` for ``config.steps`` steps.

    Args:
        examples: the training set (any sequence); ``collate(list_of_examples)`` makes a batch.
        run_dir: if given, metrics go to ``run_dir/train_log.jsonl`` (one JSON object per step)
            and checkpoints to ``run_dir/checkpoints`` every ``checkpoint_every`` steps and at the end.
        resume: continue from the last complete checkpoint in ``run_dir``.
        accelerator: an ``accelerate.Accelerator``; data are sharded by rank (each process draws
            its own ``batch_size`` slice of the global batch) and gradients synchronised.
    Returns the logged records ``{"step", "loss", "nll", "kl", "acc"}``.
    """
    torch.manual_seed(config.seed)
    module = ELBOModule(model, guide, elbo)
    optimizer = make_optimizer(model, guide, config)
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    order = BatchOrder(len(examples), config.batch_size * world, config.seed)
    step, history = 0, []
    if run_dir is not None and resume:
        checkpoint = find_latest_checkpoint(run_dir)
        if checkpoint is not None:
            step = load_training_state(checkpoint, model, guide, optimizer, order)
    wrapped, optimizer = (accelerator.prepare(module, optimizer) if accelerator else (module, optimizer))
    log_file = Path(run_dir) / "train_log.jsonl" if run_dir is not None else None
    bar = tqdm(total=config.steps, initial=step, disable=not progress or rank != 0, desc="train")
    while step < config.steps:
        optimizer.zero_grad(set_to_none=True)
        totals = {"loss": 0.0, "nll": 0.0, "kl": 0.0, "acc": 0.0}
        for _ in range(config.grad_accum):
            indices = order.next()[rank * config.batch_size:(rank + 1) * config.batch_size]
            batch = collate([examples[i] for i in indices])
            terms = wrapped(batch, len(examples))
            loss = terms["loss"] / config.grad_accum
            _check_finite(step + 1, loss=terms["loss"], kl=terms["kl"])
            (accelerator.backward(loss) if accelerator else loss.backward())
            _accumulate(totals, terms, batch["labels"], config.grad_accum)
        if config.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(module.parameters(), config.max_grad_norm)
        optimizer.step()
        step += 1
        _check_finite(step, **{name: p for name, p in module.named_parameters() if p.requires_grad})
        record = {"step": step, **totals}
        history.append(record)
        bar.update(1)
        bar.set_postfix(loss=f"{totals['loss']:.3g}", kl=f"{totals['kl']:.3g}", acc=f"{totals['acc']:.2f}")
        if log_file is not None and rank == 0:
            with open(log_file, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        if run_dir is not None and (step == config.steps or (config.checkpoint_every
                                                              and step % config.checkpoint_every == 0)):
            if accelerator:
                accelerator.wait_for_everyone()
            if rank == 0:
                save_training_state(run_dir, step, model, guide, optimizer, order,
                                    extra={"train_config": asdict(config)})
    bar.close()
    return history


def _accumulate(totals: dict, terms: dict, labels: torch.Tensor, grad_accum: int) -> None:
    totals["loss"] += terms["loss"].item() / grad_accum
    totals["nll"] += terms["nll"].item() / grad_accum
    totals["kl"] += float(terms["kl"].detach()) / grad_accum
    if terms["probs"] is not None:
        totals["acc"] += (terms["probs"].argmax(-1) == labels).float().mean().item() / grad_accum


def _check_finite(step: int, **tensors) -> None:
    tensors = {name: value.detach() for name, value in tensors.items() if isinstance(value, torch.Tensor)}
    if torch.stack([value.isfinite().all() for value in tensors.values()]).all():  # one sync
        return
    bad = [name for name, value in tensors.items() if not value.isfinite().all()]
    raise NumericalError(f"step {step}: non-finite values in {', '.join(bad)}; training stopped, "
                         f"the last complete checkpoint is kept")


@torch.no_grad()
def evaluate(predict: Callable[[Batch], torch.Tensor], examples: Sequence, collate: Callable[[list], Batch],
             batch_size: int = 16, accelerator=None, progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``predict(batch) -> probs (batch, K)`` over ``examples``; returns ``(probs (N, K), labels (N,))``.

    Under ``accelerate`` each process scores a shard and the results are gathered, in order and
    without the padding, before metrics are computed.
    """
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    # Contiguous equal-size shards (the last padded with repeats) so gathering keeps the order.
    per_rank = math.ceil(len(examples) / world)
    shard = [min(i, len(examples) - 1) for i in range(rank * per_rank, (rank + 1) * per_rank)]
    probs, labels = [], []
    for start in tqdm(range(0, len(shard), batch_size), disable=not progress or rank != 0, desc="evaluate"):
        batch = collate([examples[i] for i in shard[start:start + batch_size]])
        probs.append(predict(batch).float().cpu())
        labels.append(batch["labels"].cpu())
    probs, labels = torch.cat(probs), torch.cat(labels)
    if accelerator:
        probs = accelerator.gather(probs.to(accelerator.device)).cpu()
        labels = accelerator.gather(labels.to(accelerator.device)).cpu()
    return probs[:len(examples)], labels[:len(examples)]
