"""The training loop shared by the Python API, the CLI, the experiments and ``accelerate launch``.

An ``SVI(model, guide, optim, FullWeightELBO())`` script maps onto it one to one: the ELBO's
``differentiable_loss`` is the loss of :class:`ELBOModule` (so a distributed wrapper sees an
ordinary module), and one fused AdamW holds every adapter and guide parameter.

Under ``accelerate launch`` / ``torchrun`` (more than one process) :func:`train` and :func:`evaluate`
pick up the process's ``Accelerator`` themselves (:func:`launched_accelerator`): DDP synchronises the
gradients, each process takes its own slice of every global batch, metrics are averaged (training)
or gathered (evaluation) across processes, and rank 0 alone writes the log and the checkpoints.
See the README, section "Scaling out".
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyro
import torch
from torch import nn
from tqdm.auto import tqdm

from ._atomic import atomic_write_text
from .checkpoint import find_latest_checkpoint, load_training_state, save_training_state
from .config import check_train_config
from .elbo import FullWeightELBO
from .errors import MeLoRAError
from .readouts import readout_inputs

Batch = dict  # input_ids, attention_mask, labels, choice_mask: tensors with a leading batch axis


@dataclass
class TrainConfig:
    """Optimisation settings. ``lr``/``guide_lr`` are AdamW learning rates; ``weight_decay`` acts
    on A and B only (the MAP reading of a Gaussian prior on them); the global batch is
    ``batch_size * grad_accum * num_processes`` examples per step (``batch_size`` per process and
    micro-step)."""

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
        check_train_config(self)  # types and ranges of every field; raises errors.ConfigError


class NumericalError(MeLoRAError, RuntimeError):
    """A NaN or inf in the loss, the KL or a parameter: training stops before the update."""


class ELBOModule(nn.Module):
    """``forward(batch, num_data)`` returns the ELBO terms of model and guide on a batch.

    Wrapping model and guide in one module lets ``accelerate`` / DDP synchronise their gradients:
    DDP hooks the module's parameters, which are the very tensors ``pyro_param`` registers, so call
    the wrapped module (``accelerator.prepare(module)``), not ``module.model``, to get them synchronised.
    Autocast is switched off inside: mixed precision means a half-precision *frozen* base while A, B,
    the guide and the KL stay float32 (see :func:`train`).
    """

    def __init__(self, model: nn.Module, guide: nn.Module, elbo: FullWeightELBO | None = None):
        super().__init__()
        self.model, self.guide = model, guide
        self.elbo = elbo or FullWeightELBO()

    def forward(self, batch: Batch, num_data: int) -> dict:
        # With Pyro's argument validation on, NaN logits raise a ValueError deep inside the model; off,
        # they reach the loss, which train() checks: a NumericalError naming the step and the tensor.
        with pyro.validation_enabled(False):
            return self._terms(batch, num_data)

    def _terms(self, batch: Batch, num_data: int) -> dict:
        with torch.autocast(batch["input_ids"].device.type, enabled=False):
            return self.elbo.loss_terms(self.model, self.guide, batch["input_ids"], batch.get("attention_mask"),
                                        batch["labels"], num_data, choice_mask=batch.get("choice_mask"),
                                        **readout_inputs(batch))


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


def launched_accelerator():
    """This process's ``accelerate.Accelerator`` when it was started by ``accelerate launch`` /
    ``torchrun`` / ``mpirun`` with more than one process (``WORLD_SIZE`` > 1), else ``None``.

    Made once per process and cached. Without CUDA (or with ``ACCELERATE_USE_CPU=1``) it runs on the
    CPU with the gloo backend. Mixed precision comes from the launcher (``--mixed_precision bf16``).
    """
    global _LAUNCHED
    if _LAUNCHED is None and _launched_world_size() > 1:
        from accelerate import Accelerator
        from accelerate.utils import parse_flag_from_env

        _LAUNCHED = Accelerator(cpu=not torch.cuda.is_available() or parse_flag_from_env("ACCELERATE_USE_CPU"))
    return _LAUNCHED


_LAUNCHED = None
_SUPPORTED_DISTRIBUTED = ("NO", "MULTI_CPU", "MULTI_GPU", "MULTI_XPU", "MULTI_NPU", "MULTI_MLU", "MULTI_MUSA",
                          "MULTI_SDAA", "MULTI_HPU")


def _launched_world_size() -> int:
    for name in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 1


def wait_for_everyone(accelerator) -> None:
    """A barrier across the processes. ``accelerator.wait_for_everyone()`` passes ``device_ids`` to the
    barrier even on the CPU (gloo), which fails on a CUDA host with more CPU processes than GPUs; a tiny
    all-reduce, waited for, is a barrier on every backend."""
    if accelerator is not None and accelerator.num_processes > 1:
        accelerator.reduce(torch.zeros(1, device=accelerator.device), "sum").item()


def _resolve_accelerator(accelerator):
    """``None``: the launched one, if any; ``False``: none; else ``accelerator``, checked."""
    if accelerator is None:
        accelerator = launched_accelerator()
    if not accelerator:
        return None
    kind = str(accelerator.distributed_type).rsplit(".", 1)[-1]
    if kind not in _SUPPORTED_DISTRIBUTED:
        raise ValueError(f"distributed type {kind} is not supported: train() checkpoints the full optimiser state "
                         f"from rank 0, which assumes replicated (DDP) training; configure accelerate for "
                         f"multi-GPU/multi-CPU data parallelism (the adapters are small, sharding buys nothing)")
    if accelerator.gradient_accumulation_steps != 1:
        raise ValueError("set TrainConfig.grad_accum (--grad-accum) for gradient accumulation, not the "
                         f"Accelerator's gradient_accumulation_steps ({accelerator.gradient_accumulation_steps})")
    return accelerator


def _apply_mixed_precision(model: nn.Module, guide: nn.Module, accelerator) -> None:
    """Mixed precision: frozen floating-point parameters (the base) in bf16/fp16, trainables float32."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision)
    if dtype is None:
        return
    for p in model.parameters():
        if not p.requires_grad and p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
    wrong = [n for m in (model, guide) for n, p in m.named_parameters() if p.requires_grad and p.dtype != torch.float32]
    if wrong:
        raise ValueError(f"mixed precision keeps trainable parameters in float32; these are not: {wrong[:5]}")


def train(model: nn.Module, guide: nn.Module, examples: Sequence, collate: Callable[[list], Batch],
          config: TrainConfig, run_dir: str | Path | None = None, resume: bool = False,
          elbo: FullWeightELBO | None = None, accelerator=None, progress: bool = True) -> list[dict]:
    """Maximise the ELBO of ``model`` / ``guide`` on ``examples`` for ``config.steps`` steps.

    Args:
        examples: the training set (any sequence); ``collate(list_of_examples)`` makes a batch.
        run_dir: if given, metrics go to ``run_dir/train_log.jsonl`` (one JSON object per step)
            and checkpoints to ``run_dir/checkpoints`` every ``checkpoint_every`` steps and at the end.
        resume: continue from the last complete checkpoint in ``run_dir`` (the log is cut back to it).
        accelerator: an ``accelerate.Accelerator``; ``None`` (default) takes :func:`launched_accelerator`
            (so a launched script needs no change), ``False`` forces single-process training.
            Every process draws the same global batch order and takes its ``batch_size`` slice;
            DDP averages the gradients, so a step equals a single-process step on the global batch
            (the processes share the RNG seed, hence draw the same C). ``grad_accum`` micro-steps run
            under ``no_sync`` but the last. With ``mixed_precision`` bf16/fp16 the frozen base is cast
            to it; adapters, guide, KL and optimiser stay float32. Rank 0 alone writes files.
    Returns the logged records ``{"step", "loss", "nll", "kl", "acc"}`` (averaged over processes).
    """
    accelerator = _resolve_accelerator(accelerator)
    # All three RNGs the checkpoints restore, seeded alike in every process (so ranks draw the same C).
    random.seed(config.seed)
    np.random.seed(config.seed)
    torch.manual_seed(config.seed)
    if accelerator:
        _apply_mixed_precision(model, guide, accelerator)
    module = ELBOModule(model, guide, elbo)
    optimizer = make_optimizer(model, guide, config)
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    order = BatchOrder(len(examples), config.batch_size * world, config.seed)
    step, history = 0, []
    log_file = Path(run_dir) / "train_log.jsonl" if run_dir is not None else None
    if log_file is not None and rank == 0:
        log_file.parent.mkdir(parents=True, exist_ok=True)
    if run_dir is not None and resume:
        checkpoint = find_latest_checkpoint(run_dir)
        if checkpoint is not None:
            step = load_training_state(checkpoint, model, guide, optimizer, order)
        if rank == 0:
            _truncate_log(log_file, step)
    wrapped, optimizer = (accelerator.prepare(module, optimizer) if accelerator else (module, optimizer))
    bar = tqdm(total=config.steps, initial=step, disable=not progress or rank != 0, desc="train")
    while step < config.steps:
        optimizer.zero_grad(set_to_none=True)
        totals = {"loss": 0.0, "nll": 0.0, "kl": 0.0, "acc": 0.0}
        for micro in range(config.grad_accum):
            indices = order.next()[rank * config.batch_size:(rank + 1) * config.batch_size]
            batch = collate([examples[i] for i in indices])
            last = micro == config.grad_accum - 1
            # Gradients are all-reduced only in the last micro-step's backward (DDP no_sync before).
            with (accelerator.no_sync(wrapped) if accelerator and not last else contextlib.nullcontext()):
                terms = wrapped(batch, len(examples))
                loss = terms["loss"] / config.grad_accum
                _check_finite(step + 1, accelerator, loss=terms["loss"], kl=terms["kl"])
                (accelerator.backward(loss) if accelerator else loss.backward())
            _accumulate(totals, terms, batch["labels"], config.grad_accum)
        if config.max_grad_norm:
            (accelerator.clip_grad_norm_ if accelerator else torch.nn.utils.clip_grad_norm_)(
                module.parameters(), config.max_grad_norm)
        optimizer.step()
        step += 1
        # Synchronised gradients keep the parameters identical on every rank: a local check suffices.
        _check_finite(step, None, **{name: p for name, p in module.named_parameters() if p.requires_grad})
        if world > 1:  # the step's loss on the global batch: the mean of the per-process values
            means = accelerator.reduce(torch.tensor(list(totals.values()), device=accelerator.device), "mean")
            totals = dict(zip(totals, means.tolist()))
        record = {"step": step, **totals}
        history.append(record)
        bar.update(1)
        bar.set_postfix(loss=f"{totals['loss']:.3g}", kl=f"{totals['kl']:.3g}", acc=f"{totals['acc']:.2f}")
        if log_file is not None and rank == 0:
            with open(log_file, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        if run_dir is not None and (step == config.steps or (config.checkpoint_every
                                                              and step % config.checkpoint_every == 0)):
            if rank == 0:
                save_training_state(run_dir, step, model, guide, optimizer, order,
                                    extra={"train_config": asdict(config), "num_processes": world})
            if accelerator:  # nobody runs ahead of (or reads) a checkpoint being written
                wait_for_everyone(accelerator)
    bar.close()
    return history


def _truncate_log(log_file: Path, step: int) -> None:
    """Keep the log records up to ``step`` (those after the checkpoint are trained again)."""
    if not log_file.is_file():
        return
    lines = log_file.read_text(encoding="utf-8").splitlines()
    kept = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):  # a line torn by a crash
            pass
    if len(kept) != len(lines):
        atomic_write_text(log_file, "".join(line + "\n" for line in kept))


def _accumulate(totals: dict, terms: dict, labels: torch.Tensor, grad_accum: int) -> None:
    totals["loss"] += terms["loss"].item() / grad_accum
    totals["nll"] += terms["nll"].item() / grad_accum
    totals["kl"] += float(terms["kl"].detach()) / grad_accum
    if terms["probs"] is not None:
        totals["acc"] += (terms["probs"].argmax(-1) == labels).float().mean().item() / grad_accum


def _check_finite(step: int, accelerator=None, **tensors) -> None:
    """Raise :class:`NumericalError` on a NaN/inf; with several processes the verdict is collective
    (one all-reduce), so all ranks stop together instead of leaving the others in a collective."""
    tensors = {name: value.detach() for name, value in tensors.items() if isinstance(value, torch.Tensor)}
    finite = torch.stack([value.isfinite().all() for value in tensors.values()])
    if accelerator is not None and accelerator.num_processes > 1:
        bad_anywhere = accelerator.reduce((~finite).float().to(accelerator.device), "sum")
        if not bad_anywhere.any():
            return
    elif finite.all():  # one sync
        return
    bad = [name for name, ok in zip(tensors, finite.tolist()) if not ok]
    where = f"non-finite values in {', '.join(bad)}" if bad else "non-finite values on another process"
    raise NumericalError(f"step {step}: {where}; training stopped, the last complete checkpoint is kept")


@torch.no_grad()
def evaluate(predict: Callable[[Batch], torch.Tensor], examples: Sequence, collate: Callable[[list], Batch],
             batch_size: int = 16, accelerator=None, progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``predict(batch) -> probs (batch, K)`` over ``examples``; returns ``(probs (N, K), labels (N,))``.

    Under ``accelerate`` each process scores a shard and the results are gathered, in order and
    without the padding, before metrics are computed. ``accelerator`` as in :func:`train` (``None``:
    the launched one, if any; ``False``: none). Every process must call it.
    """
    accelerator = (launched_accelerator() if accelerator is None else accelerator) or None
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
