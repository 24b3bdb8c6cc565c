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
import logging
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

logger = logging.getLogger(__name__)
Batch = dict  # input_ids, attention_mask, labels, choice_mask: tensors with a leading batch axis


@dataclass
class TrainConfig:
    """Optimisation settings, all AdamW learning rates per parameter group (:func:`make_optimizer`):

    - ``lr``: the adapters (A, B) and any guide parameter without a role (BLoB's A, a ``DeltaGuide``);
    - ``guide_lr``: the location M of a variational guide over C (its ``param_roles()["loc"]``);
    - ``guide_scale_lr``: its log scale, log Omega (``param_roles()["scale"]``).

    The guide's rates do not follow ``lr``: Adam moves a parameter by about its learning rate per
    step, so log Omega at lr 1e-4 never leaves its initial value (DESIGN.md section 3). ``0``
    freezes a group. ``weight_decay`` acts on A and B only (the MAP reading of a Gaussian prior on
    them); the global batch is ``batch_size * grad_accum * num_processes`` examples per step
    (``batch_size`` per process and micro-step). Every ``log_every`` steps one line goes to the
    ``melora_pyro.train`` logger; every ``checkpoint_every`` steps (0: only at the end) and at the end a
    checkpoint is saved.

    ``lr_schedule``: ``"constant"`` (default) or ``"linear"``: the learning rates rise linearly from 0
    over the first ``warmup_ratio * steps`` steps, then fall linearly to 0 at ``steps`` (the reference
    code's ``get_linear_schedule_with_warmup``: step k, 1-based, uses the factor at k - 1).
    ``adam_eps``: AdamW's epsilon (the reference code: 1e-6). ``whole_epochs``: train on to the end of
    the epoch in which ``steps`` falls (the reference rounds up to whole epochs; the schedule still ends
    at ``steps``, so with ``"linear"`` the extra steps have learning rate 0)."""

    steps: int = 300
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 1e-4
    guide_lr: float = 1e-2
    guide_scale_lr: float = 5e-2
    weight_decay: float = 0.0
    max_grad_norm: float | None = None
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 100
    lr_schedule: str = "constant"
    warmup_ratio: float = 0.0
    adam_eps: float = 1e-8
    whole_epochs: bool = False

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
    the guide and the KL stay float32 (see :func:`train`). Without ``elbo``: ``FullWeightELBO(antithetic=True)``,
    each draw of C with its mirror (``melora_pyro.antithetic``: the guide's scale then reaches its optimum;
    a guide without random sites runs once).
    """

    def __init__(self, model: nn.Module, guide: nn.Module, elbo: FullWeightELBO | None = None):
        super().__init__()
        self.model, self.guide = model, guide
        self.elbo = elbo or FullWeightELBO(antithetic=True)

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
    """One AdamW over all trainable adapter and guide parameters, in up to four groups: adapters
    (``lr``, ``weight_decay``), the guide's location (``guide_lr``) and log scale (``guide_scale_lr``),
    as the guide names them in ``param_roles()``, and its other parameters (``lr``). No weight decay
    on the guide: its prior is in the ELBO."""
    roles = guide.param_roles() if hasattr(guide, "param_roles") else {}
    rates = {"loc": config.guide_lr, "scale": config.guide_scale_lr}
    unknown = sorted(set(roles) - set(rates))
    if unknown:
        raise ValueError(f"{type(guide).__name__}.param_roles() names unknown roles {unknown}; known: {sorted(rates)}")
    with_role = {id(p) for params in roles.values() for p in params}
    groups = [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": config.weight_decay},
              {"params": [p for p in guide.parameters() if p.requires_grad and id(p) not in with_role],
               "weight_decay": 0.0}]
    groups += [{"params": [p for p in params if p.requires_grad], "weight_decay": 0.0, "lr": rates[role]}
               for role, params in roles.items()]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr, eps=config.adam_eps, foreach=True)


def lr_factor(step: int, config: TrainConfig) -> float:
    """The schedule's multiplier of the base learning rates for the step after ``step`` completed ones."""
    if config.lr_schedule == "constant":
        return 1.0
    warmup = config.steps * config.warmup_ratio
    if step < warmup:
        return step / max(1.0, warmup)
    return max(0.0, (config.steps - step) / max(1.0, config.steps - warmup))


def total_steps(config: TrainConfig, num_examples: int, num_processes: int) -> int:
    """``config.steps``, or with ``whole_epochs`` rounded up to a whole number of epochs of
    ``ceil(num_examples / global batch)`` steps."""
    if not config.whole_epochs:
        return config.steps
    per_epoch = math.ceil(num_examples / (config.batch_size * config.grad_accum * num_processes))
    return math.ceil(config.steps / per_epoch) * per_epoch


class UpdateRule:
    """The optimiser of a run and how a step applies the accumulated gradients.

    :func:`train` calls ``make_optimizer`` once (that optimiser is the one checkpointed and prepared by
    ``accelerate``) and ``step`` once per step, after the loss's backward pass(es) and with the
    learning rates already scheduled. A method with another update (BLoB's second optimiser on the
    KL, ``baselines.blob``) overrides these two methods; anything else it keeps must be a function of
    ``step`` so that ``resume`` stays exact.
    """

    def make_optimizer(self, model: nn.Module, guide: nn.Module, config: TrainConfig, num_data: int,
                       num_processes: int) -> torch.optim.Optimizer:
        return make_optimizer(model, guide, config)

    def step(self, optimizer: torch.optim.Optimizer, step: int, lr_factor: float) -> None:
        """Apply step ``step`` (1-based); ``lr_factor``: the schedule's multiplier for it."""
        optimizer.step()


def _schedule(optimizer: torch.optim.Optimizer, factor: float) -> None:
    """Set every group's learning rate to its base rate (``initial_lr``) times ``factor``."""
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * factor


class BatchOrder:
    """Shuffled epochs of example indices from a private generator, so the order is checkpointable."""

    def __init__(self, num_examples: int, batch_size: int, seed: int):
        if num_examples < 1:
            raise ValueError("the training set is empty")
        if batch_size > num_examples:
            raise ValueError(f"a batch of {batch_size} examples from a training set of {num_examples}: "
                             f"lower the batch size")
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
          elbo: FullWeightELBO | None = None, accelerator=None, progress: bool = True,
          update: UpdateRule | None = None) -> list[dict]:
    """Maximise the ELBO of ``model`` / ``guide`` on ``examples`` for ``config.steps`` steps (rounded up
    to whole epochs with ``config.whole_epochs``).

    Args:
        examples: the training set (any sequence); ``collate(list_of_examples)`` makes a batch.
        run_dir: if given, metrics go to ``run_dir/train_log.jsonl`` (one JSON object per step)
            and checkpoints to ``run_dir/checkpoints`` every ``checkpoint_every`` steps and at the end.
        resume: continue from the last complete checkpoint in ``run_dir`` (the log is cut back to it).
        elbo: the objective; default ``FullWeightELBO(antithetic=True)`` (draws of C in mirrored pairs).
        accelerator: an ``accelerate.Accelerator``; ``None`` (default) takes :func:`launched_accelerator`
            (so a launched script needs no change), ``False`` forces single-process training.
            Every process draws the same global batch order and takes its ``batch_size`` slice;
            DDP averages the gradients, so a step equals a single-process step on the global batch
            (the processes share the RNG seed, hence draw the same C). ``grad_accum`` micro-steps run
            under ``no_sync`` but the last. With ``mixed_precision`` bf16/fp16 the frozen base is cast
            to it; adapters, guide, KL and optimiser stay float32. Rank 0 alone writes files.
    """
    accelerator = _resolve_accelerator(accelerator)
    # All three RNGs the checkpoints restore, seeded alike in every process (so ranks draw the same C).
    random.seed(config.seed)
    np.random.seed(config.seed)
    torch.manual_seed(config.seed)
    if accelerator:
        _apply_mixed_precision(model, guide, accelerator)
    module = ELBOModule(model, guide, elbo)
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    update = update or UpdateRule()
    optimizer = update.make_optimizer(model, guide, config, len(examples), world)
    last_step = total_steps(config, len(examples), world)
    order = BatchOrder(len(examples), config.batch_size * world, config.seed)
    step, history = 0, []
    log_file = Path(run_dir) / "train_log.jsonl" if run_dir is not None else None
    if log_file is not None and rank == 0:
        log_file.parent.mkdir(parents=True, exist_ok=True)
    if run_dir is not None and resume:
        checkpoint = find_latest_checkpoint(run_dir)
        if checkpoint is not None:
            step = load_training_state(checkpoint, model, guide, optimizer, order)
            for group, fresh in zip(optimizer.param_groups, make_optimizer(model, guide, config).param_groups):
                group["lr"] = fresh["lr"]  # this config's lr from here on (a --resume with a new --lr)
        if rank == 0:
            _truncate_log(log_file, step)
    for group in optimizer.param_groups:  # the schedule's base rates (a checkpoint restores its own)
        group.setdefault("initial_lr", group["lr"])
    wrapped, optimizer = (accelerator.prepare(module, optimizer) if accelerator else (module, optimizer))
    bar = tqdm(total=last_step, initial=step, disable=not progress or rank != 0, desc="train")
    while step < last_step:
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
        factor = lr_factor(step, config)
        if config.lr_schedule != "constant":
            _schedule(optimizer, factor)
        update.step(optimizer, step + 1, factor)
        step += 1
        # Synchronised gradients keep the parameters identical on every rank: a local check suffices.
        _check_finite(step, None, **{name: p for name, p in module.named_parameters() if p.requires_grad})
        if world > 1:  # the step's loss on the global batch: the mean of the per-process values
            means = accelerator.reduce(torch.tensor(list(totals.values()), device=accelerator.device), "mean")
            totals = dict(zip(totals, means.tolist()))
        record = {"step": step, **totals, **scale_statistics(guide)}
        history.append(record)
        bar.update(1)
        bar.set_postfix(loss=f"{totals['loss']:.3g}", kl=f"{totals['kl']:.3g}", acc=f"{totals['acc']:.2f}",
                        **{k: f"{v:.3g}" for k, v in record.items() if k.startswith("omega")})
        if log_file is not None and rank == 0:
            with open(log_file, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        if rank == 0 and (step % config.log_every == 0 or step == last_step):
            logger.info("step %d/%d loss %.4g nll %.4g kl %.4g acc %.3f", step, last_step, totals["loss"],
                        totals["nll"], totals["kl"], totals["acc"])
        if run_dir is not None and (step == last_step or (config.checkpoint_every
                                                              and step % config.checkpoint_every == 0)):
            if rank == 0:
                save_training_state(run_dir, step, model, guide, optimizer, order,
                                    extra={"train_config": asdict(config), "num_processes": world})
            if accelerator:  # nobody runs ahead of (or reads) a checkpoint being written
                wait_for_everyone(accelerator)
    bar.close()
    return history


@torch.no_grad()
def scale_statistics(guide: nn.Module) -> dict[str, float]:
    """The 10%, 50% and 90% quantiles of the guide's posterior std Omega over all its entries
    (``exp`` of its ``param_roles()["scale"]``), as ``{"omega_q10", "omega_median", "omega_q90"}``;
    ``{}`` for a guide without a scale."""
    scales = guide.param_roles().get("scale", []) if hasattr(guide, "param_roles") else []
    if not scales:
        return {}
    omega = torch.cat([p.detach().flatten() for p in scales]).float().exp()
    q10, median, q90 = torch.quantile(omega.cpu(), torch.tensor([0.1, 0.5, 0.9])).tolist()
    return {"omega_q10": q10, "omega_median": median, "omega_q90": q90}


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
