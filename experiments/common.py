"""Shared code of the letter-scored experiments ``ood`` and ``memory``: profiles, data, base models, one
run of a method, and the outputs. (The in-distribution table is now ``experiments.comparison``, a grid
of CLI runs; ``ood`` still scores lettered prompts here and has not been moved to the grid.)

Every experiment is one command::

    python -m experiments.<name> --profile cpu-small|paper [--methods ...] [--datasets ...] [--seeds ...]
                                 [--data-dir ../shared/data] [--out results/...]

and writes, atomically, ``<out>.json`` (every number, the predictive probabilities included), ``<out>.md``
(tables of mean +- std over seeds, best per column in bold) and reliability diagrams ``<out>_<dataset>.png``.
An interrupted run is continued with ``--resume`` (finished (dataset, method, seed) runs are kept).
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import random
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from melora_pyro import data
from melora_pyro._atomic import atomic_write_text
from melora_pyro.config import MeLoRAConfig
from melora_pyro.methods import METHODS, build_method
from melora_pyro.metrics import summarize
from melora_pyro.models import default_cache_dir, load_base_model
from melora_pyro.plots import reliability_diagram
from melora_pyro.prefix_cache import PrefixCachedLM, cache_path
from melora_pyro.train import TrainConfig, evaluate

METRICS = (("acc", "ACC (%) ↑", 100, max), ("ece", "ECE (%) ↓", 100, min),
           ("nll", "NLL ↓", 1, min), ("brier", "Brier ↓", 1, min))


@dataclass(frozen=True)
class Profile:
    """Everything that sizes an experiment.

    ``top_layers``: adapt only the q_proj / v_proj of the top ``top_layers`` decoder layers (plus
    ``lm_head`` if listed in ``extra_targets``) and cache the frozen layers below them per prompt
    (:class:`PrefixCachedLM`); ``None`` adapts every layer and caches nothing. ``schedule`` holds the
    ``(field, value)`` pairs of ``TrainConfig``, the optimisation recipe (``lr_schedule``, ``warmup_ratio``,
    ``adam_eps``, ``whole_epochs``); empty: the ``TrainConfig`` defaults (constant learning rate).
    """

    name: str
    model: str
    rank: int
    alpha: float
    lr: float
    batch_size: int
    steps: int
    eval_samples: int
    seeds: tuple[int, ...]
    train_limit: int | None
    test_limit: int | None
    max_length: int
    top_layers: int | None
    extra_targets: tuple[str, ...] = ("lm_head",)
    prior_std: float = 0.2
    eval_batch_size: int = 16
    fisher_examples: int | None = None
    device: str = "cpu"
    dtype: str = "float32"
    notes: str = ""
    schedule: tuple[tuple[str, object], ...] = ()

    def describe(self) -> str:
        layers = f"top {self.top_layers} layers" if self.top_layers else "all layers"
        return (f"profile `{self.name}`: model {self.model}, r={self.rank}, alpha={self.alpha:g}, "
                f"q_proj+v_proj of {layers} + {'+'.join(self.extra_targets) or 'nothing else'}, "
                f"lr {self.lr:g}, batch {self.batch_size}, {self.steps} steps, "
                f"{self.eval_samples} eval samples, seeds {list(self.seeds)}, "
                f"train/test limits {self.train_limit}/{self.test_limit}, max_length {self.max_length}"
                + (f", Laplace curvature on {self.fisher_examples} training examples" if self.fisher_examples else "")
                + (f", {', '.join(f'{k} {v}' for k, v in self.schedule)}" if self.schedule else "")
                + (f". {self.notes}" if self.notes else ""))


PAPER_SCHEDULE = (("lr_schedule", "linear"), ("warmup_ratio", 0.06), ("adam_eps", 1e-6), ("whole_epochs", True))

PROFILES = {
    "cpu-small": Profile(
        name="cpu-small", model="smollm2-135m", rank=8, alpha=16, lr=1e-3, batch_size=4, steps=50,
        eval_samples=4, seeds=(1,), train_limit=200, test_limit=150, max_length=256, top_layers=1,
        fisher_examples=64,
        notes="Sized for 2 shared CPU cores (about 50 min for 10 methods x 2 datasets): SmolLM2-135M-Instruct "
              "with adapters on the last of its 30 decoder layers and lm_head (the frozen layers below are "
              "computed once per prompt and cached), seeded subsets of the splits (one epoch of training), "
              "lr raised from BLoB's 1e-4 to 1e-3 for the 50-step budget."),
    "paper": Profile(
        name="paper", model="smollm2-135m", rank=8, alpha=16, lr=1e-4, batch_size=8, steps=2500,
        eval_samples=10, seeds=(1, 2, 3), train_limit=None, test_limit=None, max_length=512, top_layers=None,
        device="cuda", schedule=PAPER_SCHEDULE,
        notes="BLoB's protocol (DESIGN.md section 5, docs/baselines.md) for GPU users: its scripts' "
              "--max-train-steps 5000 --batch-size 4 on 2 processes are 2500 optimiser steps of 8 examples "
              "(accelerate steps the scheduler once per process), 6% warmup then linear decay, Adam eps 1e-6, "
              "whole epochs; BLoB used LLaMA2-7B (pass --model with a local checkpoint or hub id, "
              "--dtype bfloat16)."),
}


# ---------------------------------------------------------------------------------------------------
# Base models


def adapter_config(profile: Profile, num_layers: int) -> MeLoRAConfig:
    """The ``MeLoRAConfig`` of a profile for a base model with ``num_layers`` decoder layers."""
    if profile.top_layers:
        targets = [f"model.layers.{i}.self_attn.{p}" for i in range(num_layers - profile.top_layers, num_layers)
                   for p in ("q_proj", "v_proj")]
    else:
        targets = ["q_proj", "v_proj"]
    return MeLoRAConfig(rank=profile.rank, alpha=profile.alpha, prior_std=profile.prior_std,
                        target_modules=tuple(targets) + tuple(profile.extra_targets))


@dataclass
class Bases:
    """Fresh base models for the methods of one experiment, and their shared prefix cache.

    ``factory()`` loads a fresh base model (a :class:`PrefixCachedLM` sharing ``cache`` when the profile
    adapts only the top layers). ``warm(examples, collate)`` fills the cache in large length-sorted
    batches and saves it to ``cache_file`` (under the model cache), so reruns skip the frozen layers.
    """

    factory: Callable[[], nn.Module]
    tokenizer: object
    num_layers: int
    cache: dict = field(default_factory=dict)
    cache_file: Path | None = None

    def warm(self, examples: Sequence, collate: Callable[[list], dict], batch_size: int = 32, log=print) -> None:
        if self.cache_file is None:
            return
        base = self.factory()
        order = sorted(range(len(examples)), key=lambda i: len(data.render_prompt(examples[i])))
        before, start = len(self.cache), time.time()
        for i in range(0, len(order), batch_size):
            batch = collate([examples[j] for j in order[i:i + batch_size]])
            base.prefix_states(batch["input_ids"], batch["attention_mask"])
        if len(self.cache) > before:
            base.save(self.cache_file)
            log(f"prefix cache: {len(self.cache) - before} prompts added in {time.time() - start:.0f}s "
                f"({len(self.cache)} in {self.cache_file})")


def base_factory(profile: Profile) -> Bases:
    """The :class:`Bases` of a profile (the prefix cache loaded from disk when present)."""
    dtype = getattr(torch, profile.dtype)
    probe, tokenizer = load_base_model(profile.model, dtype=dtype)
    num_layers = probe.config.num_hidden_layers
    bases = Bases(None, tokenizer, num_layers)
    if profile.top_layers:
        split = num_layers - profile.top_layers
        bases.cache_file = cache_path(default_cache_dir(), profile.model, profile.dtype, split)
        PrefixCachedLM(probe, split, bases.cache).load(bases.cache_file)

    def factory() -> nn.Module:
        lm, _ = load_base_model(profile.model, dtype=dtype)
        lm = lm.to(profile.device)
        return PrefixCachedLM(lm, num_layers - profile.top_layers, bases.cache) if profile.top_layers else lm

    bases.factory = factory
    return bases


# ---------------------------------------------------------------------------------------------------
# Data


def load_split(dataset: str, split: str, data_dir, limit: int | None) -> list[data.Example]:
    """The split, or a seeded (seed 0, the same for every method and training seed) subset of ``limit``."""
    examples = data.load_examples(dataset, split, data_dir)
    if limit is not None and limit < len(examples):
        examples = random.Random(0).sample(examples, limit)
    return examples


def make_collate(tokenizer, num_labels: int, max_length: int, device="cpu") -> Callable[[list], dict]:
    """``collate(examples)``: the batch dict of the shared entry point.

    ``input_ids`` / ``attention_mask`` ``(b, T)`` left-padded, ``labels`` ``(b,)`` and ``choice_mask``
    ``(b, num_labels)`` (True for the labels a question offers), so questions with different numbers of
    choices (ARC's 3 to 5) share a batch. Each prompt is encoded by ``melora_pyro.data.encode``.
    """
    pad = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)

    def collate(examples: list) -> dict:
        rows = [data.encode(tokenizer, [ex], max_length)["input_ids"][0] for ex in examples]
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        choice_mask = torch.zeros((len(rows), num_labels), dtype=torch.bool)
        for i, (row, ex) in enumerate(zip(rows, examples)):
            input_ids[i, width - len(row):] = row
            attention_mask[i, width - len(row):] = 1
            choice_mask[i, :len(ex.choices)] = True
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "choice_mask": choice_mask,
                 "labels": torch.tensor([ex.label for ex in examples], dtype=torch.long)}
        return {k: v.to(device) for k, v in batch.items()}

    return collate


# ---------------------------------------------------------------------------------------------------
# One run


def task_collate(tokenizer, profile: Profile, example_sets: Sequence[Sequence]) -> tuple[Callable, list[int]]:
    """``(collate, label_token_ids)`` for examples with up to K choices, K the most in ``example_sets``."""
    num_labels = max(len(ex.choices) for examples in example_sets for ex in examples)
    return (make_collate(tokenizer, num_labels, profile.max_length, profile.device),
            data.label_token_ids(tokenizer, num_labels))


def method_options(name: str, profile: Profile, seed: int) -> dict:
    options = {"seed": seed}
    if name == "laplace" and profile.fisher_examples:
        options["max_fisher_examples"] = profile.fisher_examples
    return options


def run_method(name: str, train: Sequence, tests: dict[str, Sequence], profile: Profile, seed: int,
               bases: Bases, log=print, options: dict | None = None) -> dict:
    """Build ``name`` (with extra ``build_method`` ``options``) on fresh base models, train it on
    ``train`` and evaluate it on every test set.

    Returns ``{"adapter_state", "train_seconds", "final_train" (last logged step), "laplace_prior_precision"
    (laplace only), "tests": {test: {"metrics", "eval_seconds", "probs", "labels"}}}``.
    """
    collate, ids = task_collate(bases.tokenizer, profile, [train, *tests.values()])
    config = adapter_config(profile, bases.num_layers)
    method = build_method(name, bases.factory, config, ids, **method_options(name, profile, seed), **(options or {}))
    train_config = TrainConfig(steps=profile.steps, batch_size=profile.batch_size, lr=profile.lr, seed=seed,
                               log_every=max(profile.steps // 10, 1), **dict(profile.schedule))
    start = time.time()
    history = method.fit(train, collate, train_config)
    record = {"adapter_state": method.adapter_state(), "train_seconds": time.time() - start,
              "final_train": _mean_tail(history), "tests": {}}
    if hasattr(method, "prior_precision"):
        record["laplace_prior_precision"] = method.prior_precision
    log(f"  {name} seed {seed}: trained in {record['train_seconds']:.0f}s, last steps {record['final_train']}")
    for test_name, examples in tests.items():
        start = time.time()
        probs, labels = evaluate(lambda batch: method.predict(batch, profile.eval_samples), examples, collate,
                                 batch_size=profile.eval_batch_size, progress=False)
        metrics = summarize(probs, labels)
        record["tests"][test_name] = {"metrics": metrics, "eval_seconds": time.time() - start,
                                      "probs": probs.tolist(), "labels": labels.tolist()}
        log(f"  {name} seed {seed} on {test_name}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
            + f" ({record['tests'][test_name]['eval_seconds']:.0f}s)")
    del method
    gc.collect()
    return record


def _mean_tail(history: list[dict], tail: int = 10) -> dict:
    rows = [r for r in history[-tail:]]
    keys = ("loss", "nll", "kl", "acc")
    return {k: sum(r[k] for r in rows) / len(rows) for k in keys} if rows else {}


# ---------------------------------------------------------------------------------------------------
# Command line, results file, tables and figures


def parser(description: str, methods: Sequence[str], datasets: Sequence[str], out: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--profile", choices=sorted(PROFILES), default="cpu-small")
    p.add_argument("--methods", nargs="+", default=list(methods), choices=list(METHODS), metavar="METHOD")
    p.add_argument("--datasets", nargs="+", default=list(datasets), metavar="DATASET")
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="default: the profile's seeds")
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--out", default=None, help=f"output stem (default results/{out}_<profile>)")
    p.add_argument("--model", default=None, help="override the profile's base model (path or hub id)")
    p.add_argument("--device", default=None, help="override the profile's device")
    p.add_argument("--dtype", default=None, help="override the profile's dtype (float32, bfloat16)")
    p.add_argument("--resume", action="store_true", help="keep finished runs of an existing output file")
    p.add_argument("--method-option", action="append", default=[], metavar="KEY=VALUE", type=_option,
                   help="extra build_method option for every method (repeatable), e.g. init_scale=0.1")
    return p


def _option(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def profile_from_args(args) -> Profile:
    profile = PROFILES[args.profile]
    overrides = {k: v for k, v in (("model", args.model), ("device", args.device), ("dtype", args.dtype)) if v}
    if args.seeds:
        overrides["seeds"] = tuple(args.seeds)
    if profile.device == "cuda" and "device" not in overrides and not torch.cuda.is_available():
        overrides["device"] = "cpu"
    return dataclasses.replace(profile, **overrides)


def command_line(module: str) -> str:
    return "python -m " + module + (" " + shlex.join(sys.argv[1:]) if len(sys.argv) > 1 else "")


class Results:
    """The JSON results file of one experiment, rewritten atomically after every finished run."""

    def __init__(self, stem: str | Path, experiment: str, profile: Profile, command: str, resume: bool):
        self.stem = Path(stem)
        self.stem.parent.mkdir(parents=True, exist_ok=True)
        self.json_path = self.stem.with_suffix(".json")
        self.doc = {"experiment": experiment, "profile": dataclasses.asdict(profile),
                    "profile_description": profile.describe(), "command": command, "runs": {}}
        if resume and self.json_path.exists():
            old = json.loads(self.json_path.read_text(encoding="utf-8"))
            if old.get("profile") == self.doc["profile"]:
                self.doc["runs"] = old.get("runs", {})

    def has(self, key: str) -> bool:
        return key in self.doc["runs"]

    def add(self, key: str, record: dict) -> None:
        self.doc["runs"][key] = record
        self.save()

    def save(self) -> None:
        atomic_write_text(self.json_path, json.dumps(self.doc, indent=1))


def collect(runs: dict, train_name: str, method: str, test: str) -> list[dict]:
    """The metric dicts of every seed of (train set, method) on ``test``."""
    return [r["tests"][test]["metrics"] for key, r in runs.items()
            if key.split("/")[0] == train_name and key.split("/")[1] == method and test in r["tests"]]


def metric_table(rows: dict[str, list[dict]]) -> list[str]:
    """Markdown table: one row per method (``rows[method]`` = the seeds' metric dicts), mean +- std
    over seeds, the best mean per column in bold."""
    means = {m: {k: sum(d[k] for d in ds) / len(ds) for k, *_ in METRICS} for m, ds in rows.items() if ds}
    best = {k: pick(means[m][k] for m in means) for k, _, _, pick in METRICS} if means else {}
    lines = ["| method | " + " | ".join(title for _, title, _, _ in METRICS) + " | seeds |",
             "|---|" + "---|" * (len(METRICS) + 1)]
    for m, ds in rows.items():
        if not ds:
            continue
        cells = []
        for k, _, scale, _ in METRICS:
            values = [d[k] * scale for d in ds]
            mean = sum(values) / len(values)
            std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else None
            text = f"{mean:.2f}" if scale != 1 else f"{mean:.4f}"
            if std is not None:
                text += f" ± {std:.2f}" if scale != 1 else f" ± {std:.4f}"
            cells.append(f"**{text}**" if means[m][k] == best[k] else text)
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {len(ds)} |")
    return lines


def markdown_header(title: str, results: Results) -> list[str]:
    doc = results.doc
    return [f"# {title}", "", f"Profile: {doc['profile_description']}", "",
            f"Command: `{doc['command']}`", "",
            "All numbers are ours (this repository, the profile above). BLoB's published LLaMA2-7B numbers "
            "are not quoted: they could not be checked offline, and model and budget differ, so no "
            "'published' column is given.", ""]


def boolq_note(datasets: Sequence[str]) -> list[str]:
    return [f"Note: {data.BOOLQ_OFFLINE_NOTE}", ""] if "boolq" in datasets else []


def reliability_figures(results: Results, train_name: str, test: str, methods: Sequence[str], suffix: str) -> str | None:
    """One reliability diagram per test set (methods side by side, seeds pooled); returns its file name."""
    panels = {}
    for method in methods:
        runs = [r for key, r in results.doc["runs"].items()
                if key.split("/")[:2] == [train_name, method] and test in r["tests"]]
        if runs:
            probs = torch.cat([torch.tensor(r["tests"][test]["probs"]) for r in runs])
            labels = torch.cat([torch.tensor(r["tests"][test]["labels"]) for r in runs])
            panels[method] = (probs, labels)
    if not panels:
        return None
    path = Path(f"{results.stem}_{suffix}.png")
    reliability_diagram(panels, path, title=f"{suffix} ({results.doc['profile']['name']})")
    return path.name


def write_markdown(results: Results, lines: list[str]) -> Path:
    path = results.stem.with_suffix(".md")
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def timing_lines(results: Results) -> list[str]:
    runs = results.doc["runs"]
    train = sum(r["train_seconds"] for r in runs.values())
    evals = sum(t["eval_seconds"] for r in runs.values() for t in r["tests"].values())
    return [f"Wall clock: {train / 60:.1f} min training, {evals / 60:.1f} min evaluation over {len(runs)} runs.", ""]


def setup(args, name: str) -> tuple[Profile, Results, Bases]:
    """The profile (printed), the results file and the base models of experiment ``name``."""
    profile = profile_from_args(args)
    print(profile.describe(), flush=True)
    results = Results(args.out or f"results/{name}_{profile.name}", name, profile,
                      command_line(f"experiments.{name}"), args.resume)
    return profile, results, base_factory(profile)
