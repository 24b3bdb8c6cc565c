"""Training checkpoints that survive crashes: written whole or not at all, resumed bit for bit.

A checkpoint is a directory ``run_dir/checkpoints/step-NNNNNNNN`` holding the adapters and guide
(``adapters.safetensors`` + ``melora.json``), the optimiser moments and the RNG and data-order
states (``state.safetensors``) and the rest (``trainer.json``). It is assembled in a temporary
directory, every file fsynced, then renamed into place: a directory with the final name is complete.
A crash (even SIGKILL) at any moment leaves the previous checkpoints intact; its ``.tmp-step-*``
leftovers are ignored by :func:`find_latest_checkpoint` and removed by the next save. Directories
leave the final names only by an atomic rename to a temporary name, so none is ever half deleted.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save

from ._atomic import _fsync_dir, atomic_write_bytes, atomic_write_text
from .io import CheckpointError, load_adapter_tensors, save_adapters

STATE_FILE, TRAINER_FILE = "state.safetensors", "trainer.json"
KEEP_LAST = 2
_FINAL_NAME = re.compile(r"step-(\d{8,})")
_TMP_PREFIX = ".tmp-step-"


def checkpoint_root(run_dir) -> Path:
    return Path(run_dir) / "checkpoints"


def save_training_state(run_dir, step: int, model, guide, optimizer, order, extra: dict | None = None) -> Path:
    """Write the checkpoint of ``step`` atomically and keep only the last ``KEEP_LAST``."""
    root = checkpoint_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    for leftover in root.glob(f"{_TMP_PREFIX}*"):  # of a crashed save (one writer per run: rank 0)
        shutil.rmtree(leftover, ignore_errors=True)
    final = root / f"step-{step:08d}"
    tmp = root / f"{_TMP_PREFIX}{step:08d}-{os.getpid()}"
    tmp.mkdir()
    save_adapters(tmp, model, guide)
    optim_state = optimizer.state_dict()
    tensors = {f"optim.{index}.{name}": value.detach().cpu().contiguous()
               for index, state in optim_state["state"].items() for name, value in state.items()}
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # This process's device only: under DDP every rank's generator is in the same state, and
        # rank r restores it on its own device (the other devices' generators were never used here).
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    order_state = order.state_dict()
    tensors["order.generator"], tensors["order.indices"] = order_state["generator"], order_state["order"]
    atomic_write_bytes(tmp / STATE_FILE, save(tensors))
    np_state = np.random.get_state()
    trainer = {
        "step": step,
        "optimizer_param_groups": optim_state["param_groups"],
        "order_position": order_state["position"],
        "rng_python": _jsonable(random.getstate()),
        "rng_numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        **(extra or {}),
    }
    atomic_write_text(tmp / TRAINER_FILE, json.dumps(trainer))
    _fsync_dir(tmp)
    if final.exists():  # the same step saved again: move the old one out of the way atomically
        _discard(final, root)
    os.rename(tmp, final)
    _fsync_dir(root)
    for old in _complete_checkpoints(root)[:-KEEP_LAST]:
        _discard(old, root)
    return final


def _discard(directory: Path, root: Path) -> None:
    """Rename ``directory`` to a temporary name (atomic), then delete it: never half deleted in view."""
    doomed = root / f"{_TMP_PREFIX}discard-{directory.name}-{os.getpid()}"
    os.rename(directory, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _complete_checkpoints(root: Path) -> list[Path]:
    """The ``step-NNNNNNNN`` directories under ``root``, oldest first."""
    found = [(int(m.group(1)), path) for path in root.glob("step-*")
             if (m := _FINAL_NAME.fullmatch(path.name)) and path.is_dir()]
    return [path for _, path in sorted(found)]


def find_latest_checkpoint(run_dir) -> Path | None:
    """The newest complete checkpoint directory (temporary leftovers of a crash are ignored)."""
    done = _complete_checkpoints(checkpoint_root(run_dir))
    return done[-1] if done else None


def load_training_state(checkpoint, model, guide, optimizer, order) -> int:
    """Restore parameters, optimiser, RNGs and data order from ``checkpoint``; returns its step."""
    checkpoint = Path(checkpoint)
    try:
        trainer = json.loads((checkpoint / TRAINER_FILE).read_text(encoding="utf-8"))
        tensors = load_file(checkpoint / STATE_FILE)
    except Exception as e:
        raise CheckpointError(f"{checkpoint}: damaged training checkpoint: {e}") from e
    load_adapter_tensors(checkpoint, model, guide)
    try:
        return _restore(trainer, tensors, optimizer, order)
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:  # valid JSON, wrong structure
        raise CheckpointError(f"{checkpoint}: damaged training checkpoint: {type(e).__name__} {e}") from e


def _restore(trainer: dict, tensors: dict, optimizer, order) -> int:
    """Load the optimiser, RNG and data-order states of a checkpoint; returns its step."""
    state = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": trainer["optimizer_param_groups"]})
    torch.set_rng_state(tensors["rng.torch"])
    cuda_state = tensors.get("rng.cuda", tensors.get("rng.cuda.0"))  # rng.cuda.N: older checkpoints
    if cuda_state is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda_state)
    random.setstate(_python_rng_state(trainer["rng_python"]))
    name, keys, *rest = trainer["rng_numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    order.load_state_dict({"generator": tensors["order.generator"], "order": tensors["order.indices"],
                           "position": trainer["order_position"]})
    return int(trainer["step"])


def _jsonable(state):
    return [_jsonable(x) for x in state] if isinstance(state, tuple) else state


def _python_rng_state(state):
    version, internal, gauss = state
    return version, tuple(internal), gauss
