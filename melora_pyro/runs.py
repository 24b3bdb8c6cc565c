"""Run settings and run directories: what a CLI run reads, and what it leaves behind.

A run directory holds ``settings.json`` (everything needed to rebuild the run), ``train_log.jsonl``,
``checkpoints/``, and after evaluation ``metrics.json``, ``summary.md`` and ``reliability.png``
(``evaluate`` adds ``eval-<split>-<time>.json``); ``melora-run.json`` marks it as a run and
``melora-run.lock`` names the process writing into it (see ``rundir``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import rundir
from ._atomic import atomic_write_text
from .config import MeLoRAConfig, MethodOptions
from .data import DATASETS
from .errors import MeLoRAError
from .methods import METHODS, check_options, method_settings
from .readouts import NORMALIZATIONS, SCORINGS
from .train import TrainConfig


class RunError(MeLoRAError):
    """A user error about a run: bad settings, a run directory that exists or is not a run."""


@dataclass
class RunSettings:
    """Everything a run needs besides the data files.

    ``train_limit`` / ``eval_limit`` cap the number of examples (a seeded subset), for quick runs.
    ``eval_dataset`` scores the ``eval_split`` of another dataset (out-of-distribution evaluation; its
    own cloze template); None: the run's ``dataset``, which alone supplies train and validation data.
    ``dtype`` is the base model's (adapters and guide stay float32); ``device`` ``"auto"`` takes
    CUDA when available. ``scoring`` is the readout (``"cloze"``: each choice's text scored as a
    continuation, lm-evaluation-harness's way, normalised by ``normalization``; ``"letter"``: the next
    token over lettered choices, BLoB's way). ``adapt_top_layers`` N keeps the adapters of decoder
    layers to the top N (plus ``lm_head`` if targeted) and caches the frozen layers below, on disk.
    ``trust_remote_code`` lets ``transformers`` run Python code shipped with a hub model; it is off
    unless asked for (``--trust-remote-code``), and ``load_settings`` never reads it from a run directory.
    ``init_from_peft`` starts A and B from a peft LoRA adapter directory (its rank, alpha, targets and
    dropout replace ``adapter``'s; C's mean starts at the identity, so the run starts as that adapter);
    ``freeze_ab`` keeps A and B fixed and trains the guide alone (q(C) post hoc). ``options`` holds the
    knobs of single methods (``config.MethodOptions``: Laplace's prior precision and predictive, the
    ensemble's size, BLoB's KL step); one the method does not take is refused.
    """

    model: str = "smollm2-135m"
    dataset: str = "toy"
    data_dir: str | None = None
    method: str = "melora"
    max_length: int = 256
    train_limit: int | None = None
    eval_split: str = "test"
    eval_dataset: str | None = None
    eval_limit: int | None = None
    eval_samples: int = 10
    eval_batch_size: int = 16
    scoring: str = "cloze"
    normalization: str = "sum"
    adapt_top_layers: int | None = None
    dtype: str = "float32"
    device: str = "auto"
    trust_remote_code: bool = False
    init_from_peft: str | None = None
    freeze_ab: bool = False
    adapter: MeLoRAConfig = field(default_factory=MeLoRAConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    options: MethodOptions = field(default_factory=MethodOptions)

    def __post_init__(self):
        def positive(x):
            return isinstance(x, int) and not isinstance(x, bool) and x >= 1

        def text(x):
            return isinstance(x, str) and x.strip() != ""

        checks = [
            ("model", text(self.model), "a model directory, hub id or 'smollm2-135m'"),
            ("dataset", isinstance(self.dataset, str) and self.dataset in DATASETS, f"one of {sorted(DATASETS)}"),
            ("eval_dataset", self.eval_dataset is None or (isinstance(self.eval_dataset, str)
                                                           and self.eval_dataset in DATASETS),
             f"None or one of {sorted(DATASETS)}"),
            ("data_dir", self.data_dir is None or text(self.data_dir), "a directory or None (the hub)"),
            ("method", self.method in METHODS, f"one of {list(METHODS)}"),
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
            ("options", isinstance(self.options, MethodOptions), "a MethodOptions"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise RunError(f"setting {name} must be {expected}, got {getattr(self, name)!r:.80}")
        try:
            check_options(self.method, self.options.given())
        except ValueError as e:
            raise RunError(f"[options] {e}") from None
        splits = DATASETS[self.scored_dataset].splits
        if self.eval_split not in splits:
            raise RunError(f"setting eval_split must be one of {list(splits)} for dataset {self.scored_dataset!r}, "
                           f"got {self.eval_split!r:.80}")

    @property
    def scored_dataset(self) -> str:
        """The dataset whose ``eval_split`` is scored: ``eval_dataset``, else ``dataset``."""
        return self.eval_dataset or self.dataset

    def for_method(self, given: set[str] | None = None) -> "RunSettings":
        """These settings as ``method`` runs them (``methods.method_settings``): the values the method is
        defined by and its defaults in place, ``given`` fields (None: non-default values) kept; a given
        value that contradicts the method raises ``ConfigError``."""
        adapter, train = method_settings(self.method, self.adapter, self.train, given)
        return dataclasses.replace(self, adapter=adapter, train=train)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["adapter"] = self.adapter.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "RunSettings":
        """Build from nested dicts (JSON or TOML: top-level keys plus ``[adapter]``, ``[train]`` and ``[options]``).

        Unknown keys and bad values raise ``RunError`` (or ``ConfigError`` for ``[adapter]`` / ``[train]`` /
        ``[options]`` values), both ``MeLoRAError``.
        """
        if not isinstance(d, dict):
            raise RunError(f"settings must be a table of keys, got {type(d).__name__}")
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(map(str, set(d) - known))
        if unknown:
            raise RunError(f"unknown settings {unknown}; known: {sorted(known)}")
        for section in ("adapter", "train", "options"):
            if not isinstance(d.get(section, {}), dict):
                raise RunError(f"[{section}] must be a table of keys, got {type(d[section]).__name__}")
        try:
            adapter = MeLoRAConfig.from_dict(d.pop("adapter", {}))
            train_table = d.pop("train", {})
            train_known = {f.name for f in dataclasses.fields(TrainConfig)}
            if set(train_table) - train_known:
                raise RunError(f"unknown [train] keys {sorted(map(str, set(train_table) - train_known))}; "
                               f"known: {sorted(train_known)}")
            options_table = d.pop("options", {})
            options_known = {f.name for f in dataclasses.fields(MethodOptions)}
            if set(options_table) - options_known:
                raise RunError(f"unknown [options] keys {sorted(map(str, set(options_table) - options_known))}; "
                               f"known: {sorted(options_known)}")
            return cls(adapter=adapter, train=TrainConfig(**train_table), options=MethodOptions(**options_table), **d)
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
    """The device of setting ``device``; ``RunError`` for one this torch does not have."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise RunError(f"setting device {name!r}: this torch has no CUDA device {device.index or 0} "
                       f"(torch {torch.__version__}, {torch.cuda.device_count()} CUDA devices); use --device cpu or auto")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise RunError(f"setting device {name!r}: MPS is not available here; use --device cpu or auto")
    return device


def check_run_dir(run_dir, overwrite: bool = False, resume: bool = False) -> Path:
    """Check that a run may write into ``run_dir``, writing nothing; returns it as an absolute path.

    An existing non-empty directory is an error unless ``resume`` (it must then be a run directory
    this library created, see ``rundir``) or ``overwrite`` (it must be one, holding nothing but what
    its runs wrote). A directory another live process writes into (its lock) is an error.
    """
    run_dir = Path(run_dir).absolute()
    if run_dir.exists() and not run_dir.is_dir():
        raise RunError(f"run directory {run_dir} exists and is not a directory")
    if not run_dir.is_dir() or not any(run_dir.iterdir()):
        return run_dir
    if resume:
        rundir.read_marker(run_dir)
    elif not overwrite:
        raise RunError(f"run directory {run_dir} exists and is not empty; pass --overwrite to replace "
                       f"it or --resume to continue it")
    else:
        rundir.check_overwrite(run_dir)
    rundir.check_unlocked(run_dir)
    return run_dir


@contextlib.contextmanager
def open_run_dir(run_dir, overwrite: bool = False, writer: bool = True):
    """Create (or, with ``overwrite``, empty) the run directory ``run_dir`` and hold its lock for the body.

    ``writer`` False (a process of a distributed run other than rank 0): nothing is created or locked.
    What a run wrote goes only with ``overwrite``, and only after the lock is taken (``rundir``).
    """
    run_dir = Path(run_dir)
    if not writer:
        yield run_dir
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    with rundir.lock_run_dir(run_dir):
        if overwrite and rundir.is_owned(run_dir):
            rundir.remove_run(run_dir)
        if not rundir.is_owned(run_dir):
            rundir.create_marker(run_dir)
        yield run_dir


# Settings a --resume may change: those that do not alter the trained run, and those recorded with
# the step they took effect at (in the run's marker, rundir.MARKER).
RESUME_FREE = frozenset({"eval_split", "eval_limit", "eval_samples", "eval_batch_size", "device",
                         "trust_remote_code", "train.log_every", "train.checkpoint_every"})
RESUME_RECORDED = frozenset({"train.lr", "train.guide_lr", "train.steps"})


def resume_changes(saved: RunSettings, new: RunSettings, step: int) -> dict:
    """The recorded changes ``{"train.lr": [old, new], ...}`` of a ``--resume`` at ``step``.

    Raises ``RunError`` for a change that alters the run (another dataset, limit, model, method,
    adapter...) or fewer steps than already trained.
    """
    old, now = _flat(saved.to_dict()), _flat(new.to_dict())
    changed = {key: [old.get(key), now.get(key)] for key in sorted(set(old) | set(now)) if old.get(key) != now.get(key)}
    altering = [key for key in changed if key not in RESUME_FREE | RESUME_RECORDED]
    if altering:
        raise RunError("--resume would change the run: " + ", ".join(
            f"{key} {changed[key][0]!r:.40} -> {changed[key][1]!r:.40}" for key in altering)
            + "; train into another --run-dir for a different run")
    if new.train.steps < step:
        raise RunError(f"--resume --steps {new.train.steps}: the run is already at step {step}")
    return {key: value for key, value in changed.items() if key in RESUME_RECORDED}


def _flat(d: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in d.items():
        if key in ("adapter", "train", "options") and not prefix:
            flat.update(_flat(value, f"{key}."))
        else:
            flat[prefix + key] = value
    return flat


def save_settings(run_dir, settings: RunSettings) -> None:
    atomic_write_text(Path(run_dir) / "settings.json", json.dumps(settings.to_dict(), indent=2))


def load_settings(run_dir) -> RunSettings:
    """The settings ``train`` wrote into ``run_dir``, with ``trust_remote_code`` off: whether code shipped
    with a model may run is the caller's to say (``--trust-remote-code``), never a file's in the run."""
    path = Path(run_dir) / "settings.json"
    if not path.is_file():
        raise RunError(f"{run_dir} is not a run directory (no settings.json); train into it first")
    try:
        settings = RunSettings.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RunError(f"{path}: not valid JSON: {e}") from e
    return dataclasses.replace(settings, trust_remote_code=False)
