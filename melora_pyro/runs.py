"""Run settings and run directories: what a CLI run reads, and what it leaves behind.

A run directory holds ``settings.json`` (everything needed to rebuild the run), ``train_log.jsonl``,
``checkpoints/``, and after evaluation ``metrics.json``, ``summary.md`` and ``reliability.png``.
"""
from __future__ import annotations

import dataclasses
import json
import re
import shutil
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ._atomic import atomic_write_text
from .config import MeLoRAConfig
from .data import DATASETS
from .errors import MeLoRAError
from .readouts import NORMALIZATIONS, SCORINGS
from .train import TrainConfig


class RunError(MeLoRAError):
    """A user error about a run: bad settings, a run directory that exists or is not a run."""


@dataclass
class RunSettings:
    """Everything a run needs besides the data files.

    ``train_limit`` / ``eval_limit`` cap the number of examples (a seeded subset), for quick runs.
    ``dtype`` is the base model's (adapters and guide stay float32); ``device`` ``"auto"`` takes
    CUDA when available. ``scoring`` is the readout (``"cloze"``: each choice's text scored as a
    continuation, lm-evaluation-harness's way, normalised by ``normalization``; ``"letter"``: the next
    token over lettered choices, BLoB's way). ``adapt_top_layers`` N keeps the adapters of decoder
    layers to the top N (plus ``lm_head`` if targeted) and caches the frozen layers below, on disk. ``trust_remote_code`` lets ``transformers`` run Python code shipped with a
    hub model; it is off unless asked for (``--trust-remote-code``). ``init_from_peft`` starts A and B
    from a peft LoRA adapter directory (its rank, alpha, targets and dropout replace ``adapter``'s; C's
    mean starts at the identity, so the run starts as that adapter); ``freeze_ab`` keeps A and B fixed
    and trains the guide alone (q(C) post hoc).
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
    scoring: str = "cloze"
    normalization: str = "token"
    adapt_top_layers: int | None = None
    dtype: str = "float32"
    device: str = "auto"
    trust_remote_code: bool = False
    init_from_peft: str | None = None
    freeze_ab: bool = False
    adapter: MeLoRAConfig = field(default_factory=MeLoRAConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        def positive(x):
            return isinstance(x, int) and not isinstance(x, bool) and x >= 1

        def text(x):
            return isinstance(x, str) and x.strip() != ""

        checks = [
            ("model", text(self.model), "a model directory, hub id or 'smollm2-135m'"),
            ("dataset", isinstance(self.dataset, str) and self.dataset in DATASETS, f"one of {sorted(DATASETS)}"),
            ("data_dir", self.data_dir is None or text(self.data_dir), "a directory or None (the hub)"),
            ("method", text(self.method), "a method name"),
            ("max_length", positive(self.max_length), "a positive integer"),
            ("train_limit", self.train_limit is None or positive(self.train_limit), "None or a positive integer"),
            ("eval_limit", self.eval_limit is None or positive(self.eval_limit), "None or a positive integer"),
            ("eval_samples", isinstance(self.eval_samples, int) and not isinstance(self.eval_samples, bool)
             and self.eval_samples >= 0, "an integer >= 0"),
            ("eval_batch_size", positive(self.eval_batch_size), "a positive integer"),
            ("scoring", self.scoring in SCORINGS, f"one of {SCORINGS}"),
            ("normalization", self.normalization in NORMALIZATIONS, f"one of {NORMALIZATIONS}"),
            ("adapt_top_layers", self.adapt_top_layers is None or positive(self.adapt_top_layers),
             "None or a positive integer"),
            ("dtype", self.dtype in ("float32", "bfloat16"), "'float32' or 'bfloat16'"),
            ("device", isinstance(self.device, str) and re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device),
             "'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"),
            ("trust_remote_code", isinstance(self.trust_remote_code, bool), "true or false"),
            ("init_from_peft", self.init_from_peft is None or text(self.init_from_peft),
             "a peft adapter directory or None"),
            ("freeze_ab", isinstance(self.freeze_ab, bool), "true or false"),
            ("adapter", isinstance(self.adapter, MeLoRAConfig), "a MeLoRAConfig"),
            ("train", isinstance(self.train, TrainConfig), "a TrainConfig"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise RunError(f"setting {name} must be {expected}, got {getattr(self, name)!r:.80}")
        splits = DATASETS[self.dataset].splits
        if self.eval_split not in splits:
            raise RunError(f"setting eval_split must be one of {list(splits)} for dataset {self.dataset!r}, "
                           f"got {self.eval_split!r:.80}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["adapter"] = self.adapter.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "RunSettings":
        """Build from nested dicts (JSON or TOML: top-level keys plus ``[adapter]`` and ``[train]``).

        Unknown keys and bad values raise ``RunError`` (or ``ConfigError`` for ``[adapter]`` / ``[train]``
        values), both ``MeLoRAError``.
        """
        if not isinstance(d, dict):
            raise RunError(f"settings must be a table of keys, got {type(d).__name__}")
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(map(str, set(d) - known))
        if unknown:
            raise RunError(f"unknown settings {unknown}; known: {sorted(known)}")
        for section in ("adapter", "train"):
            if not isinstance(d.get(section, {}), dict):
                raise RunError(f"[{section}] must be a table of keys, got {type(d[section]).__name__}")
        try:
            adapter = MeLoRAConfig.from_dict(d.pop("adapter", {}))
            train_table = d.pop("train", {})
            train_known = {f.name for f in dataclasses.fields(TrainConfig)}
            if set(train_table) - train_known:
                raise RunError(f"unknown [train] keys {sorted(map(str, set(train_table) - train_known))}; "
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


RUN_ENTRIES = frozenset({"settings.json", "train_log.jsonl", "checkpoints", "metrics.json", "summary.md",
                         "reliability.png"})


def prepare_run_dir(run_dir, overwrite: bool = False, resume: bool = False) -> Path:
    """Create ``run_dir``; an existing non-empty one is an error unless ``overwrite`` or ``resume``.

    ``overwrite`` deletes only what a run writes: a directory holding anything else (``--run-dir .``
    by mistake) is refused, never deleted.
    """
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunError(f"run directory {run_dir} exists and is not a directory")
    if run_dir.exists() and any(run_dir.iterdir()) and not resume:
        if not overwrite:
            raise RunError(f"run directory {run_dir} exists and is not empty; pass --overwrite to replace "
                           f"it or --resume to continue it")
        strangers = _non_run_entries(run_dir)
        if strangers:
            raise RunError(f"refusing to overwrite {run_dir}: it holds files a run does not write "
                           f"({', '.join(strangers[:3])}); delete it yourself or choose another --run-dir")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def _non_run_entries(directory: Path, depth: int = 0) -> list[str]:
    """Names under ``directory`` that no run writes (a run or a demo: run directories one level down)."""
    strangers = []
    for entry in sorted(directory.iterdir()):
        if entry.name in RUN_ENTRIES:
            continue
        if depth == 0 and entry.is_dir() and not entry.is_symlink():
            strangers += [f"{entry.name}/{name}" for name in _non_run_entries(entry, 1)]
        else:
            strangers.append(entry.name)
    return strangers


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
