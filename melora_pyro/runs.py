"""Run settings and run directories: what a CLI run reads, and what it leaves behind.

A run directory holds ``settings.json`` (everything needed to rebuild the run), ``train_log.jsonl``,
``checkpoints/``, and after evaluation ``metrics.json``, ``summary.md`` and ``reliability.png``.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ._atomic import atomic_write_text
from .config import MeLoRAConfig
from .train import TrainConfig


class RunError(ValueError):
    """A user error about a run: bad settings, a run directory that exists or is not a run."""


@dataclass
class RunSettings:
    """Everything a run needs besides the data files.

    ``train_limit`` / ``eval_limit`` cap the number of examples (a seeded subset), for quick runs.
    ``dtype`` is the base model's (adapters and guide stay float32); ``device`` ``"auto"`` takes
    CUDA when available.
    """

    model: str = "smollm2-135m"
    dataset: str = "toy"
    data_dir: str | None = None
    method: str = "melora"
    max_length: int = 256
    train_limit: int | None = None
    eval_split: str = "test"
    eval_limit: int | None = None
    eval_samples: int = 10
    eval_batch_size: int = 16
    dtype: str = "float32"
    device: str = "auto"
    adapter: MeLoRAConfig = field(default_factory=MeLoRAConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        if self.device != "auto" and self.device.split(":")[0] not in ("cpu", "cuda", "mps"):
            raise RunError(f"device must be 'auto', 'cpu', 'cuda[:N]' or 'mps', got {self.device!r}")
        if self.dtype not in ("float32", "bfloat16"):
            raise RunError(f"dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")
        for name in ("max_length", "eval_batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise RunError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not isinstance(self.eval_samples, int) or self.eval_samples < 0:
            raise RunError(f"eval_samples must be an integer >= 0, got {self.eval_samples!r}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["adapter"] = self.adapter.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "RunSettings":
        """Build from nested dicts (JSON or TOML: top-level keys plus ``[adapter]`` and ``[train]``)."""
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise RunError(f"unknown settings {unknown}; known: {sorted(known)}")
        try:
            adapter = MeLoRAConfig.from_dict(d.pop("adapter", {}))
            train_table = d.pop("train", {})
            train_known = {f.name for f in dataclasses.fields(TrainConfig)}
            if set(train_table) - train_known:
                raise ValueError(f"unknown [train] keys {sorted(set(train_table) - train_known)}; "
                                 f"known: {sorted(train_known)}")
            return cls(adapter=adapter, train=TrainConfig(**train_table), **d)
        except TypeError as e:
            raise RunError(f"invalid settings: {e}") from e



def read_toml(path) -> dict:
    """The settings table of a TOML file, checked (unknown keys, bad values raise ``RunError``)."""
    try:
        table = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise RunError(f"{path}: cannot read the TOML config: {e}") from e
    try:
        RunSettings.from_dict(table)
    except ValueError as e:
        raise RunError(f"{path}: {e}") from e
    return table


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def prepare_run_dir(run_dir, overwrite: bool = False, resume: bool = False) -> Path:
    """Create ``run_dir``; an existing non-empty one is an error unless ``overwrite`` or ``resume``."""
    run_dir = Path(run_dir)
    if run_dir.exists() and any(run_dir.iterdir()) and not resume:
        if not overwrite:
            raise RunError(f"run directory {run_dir} exists and is not empty; pass --overwrite to replace "
                           f"it or --resume to continue it")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def save_settings(run_dir, settings: RunSettings) -> None:
    atomic_write_text(Path(run_dir) / "settings.json", json.dumps(settings.to_dict(), indent=2))


def load_settings(run_dir) -> RunSettings:
    path = Path(run_dir) / "settings.json"
    if not path.is_file():
        raise RunError(f"{run_dir} is not a run directory (no settings.json); train into it first")
    try:
        return RunSettings.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RunError(f"{path}: not valid JSON: {e}") from e
