"""One run end to end: data, base model, method, training, evaluation and the written results."""
from __future__ import annotations

import dataclasses
import json
import random
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import data
from .cloze import ClozeTemplate, template_for
from .packing import PackedExample, pack_batch, pack_example
from .readouts import ClozeReadout, LetterReadout
from ._atomic import atomic_write_text
from .checkpoint import find_latest_checkpoint
from .metrics import summarize
from .models import default_cache_dir, load_base_model
from .prefix_cache import PrefixCachedLM, cache_path, top_layer_targets
from .plots import reliability_diagram
from .runs import RunError, RunSettings, resolve_device, save_settings
from .train import evaluate, launched_accelerator, wait_for_everyone


PREFIX_CACHE_BATCH = 32  # rows per batch when filling the prefix cache


@dataclass
class Task:
    """The examples of a run and how to batch them for one tokenizer and readout.

    ``scoring`` ``"letter"``: left-padded lettered prompts (``data.encode``); ``"cloze"``: packed
    (context, continuation) rows (``packing.pack_batch``), each example packed once and kept.
    """

    train: list
    eval: list
    tokenizer: object
    num_labels: int
    max_length: int
    device: torch.device
    scoring: str = "letter"
    normalization: str = "token"
    template: ClozeTemplate | None = None
    _packed: dict = field(default_factory=dict, repr=False)

    def collate(self, examples: list) -> dict:
        """A batch of tensors on the run's device."""
        if self.scoring == "letter":
            batch = data.encode(self.tokenizer, examples, self.max_length, num_labels=self.num_labels)
        else:
            batch = pack_batch([self.pack(ex) for ex in examples], self.num_labels, _pad_id(self.tokenizer))
        return {key: value.to(self.device) for key, value in batch.items()}

    def pack(self, example) -> PackedExample:
        """``example`` packed for cloze scoring (DatasetError naming it if it cannot be)."""
        if example not in self._packed:
            self._packed[example] = pack_example(self.tokenizer, example, self.template or ClozeTemplate(),
                                                 self.max_length)
        return self._packed[example]

    @property
    def readout(self):
        if self.scoring == "letter":
            return LetterReadout(data.label_token_ids(self.tokenizer, self.num_labels))
        return ClozeReadout(self.normalization)

    @property
    def label_token_ids(self) -> list[int]:
        return data.label_token_ids(self.tokenizer, self.num_labels)

    def length_sorted_batches(self, examples: list, batch_size: int):
        """``collate``d batches of ``examples`` from shortest to longest (little padding)."""
        def length(ex):
            return len(self.pack(ex).tokens) if self.scoring == "cloze" else len(data.render_prompt(ex))
        ordered = sorted(examples, key=length)
        for start in range(0, len(ordered), batch_size):
            yield self.collate(ordered[start:start + batch_size])


def load_task(settings: RunSettings, tokenizer, log=print) -> Task:
    """Load the train and evaluation splits (seeded subsets if limits are set), checked to fit.

    Under cloze scoring a repeated *wrong* choice (OpenBookQA's train file has three) would be scored
    twice; its repeats are dropped, and the number of such examples is printed.
    """
    seed = settings.train.seed
    train = _subset(data.load_examples(settings.dataset, "train", settings.data_dir, seed), settings.train_limit, seed)
    evals = _subset(data.load_examples(settings.dataset, settings.eval_split, settings.data_dir, seed),
                    settings.eval_limit, seed)
    num_labels = max(len(ex.choices) for ex in train + evals)
    task = Task(train, evals, tokenizer, num_labels, settings.max_length, resolve_device(settings.device),
                settings.scoring, settings.normalization)
    if settings.scoring == "cloze":
        task.template = template_for(settings.dataset)
        for split, examples in (("train", train), (settings.eval_split, evals)):
            deduplicated = [data.without_repeated_choices(ex) for ex in examples]
            changed = sum(a is not b for a, b in zip(examples, deduplicated))
            if changed:
                log(f"{settings.dataset} {split}: {changed} example(s) repeat a wrong choice; under cloze "
                    f"scoring the repeats are dropped")
            examples[:] = deduplicated
            for ex in examples:  # every row packed now: a bad one fails before training
                task.pack(ex)
    else:
        for split, examples in (("train", train), (settings.eval_split, evals)):
            _check_prompts_fit(examples, tokenizer, settings.max_length, f"{settings.dataset} {split}")
    return task


def _pad_id(tokenizer) -> int:
    return next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)


def _check_prompts_fit(examples: list, tokenizer, max_length: int, where: str) -> None:
    """DatasetError now, rather than at the batch that holds it mid-training, for an example whose
    prompt cannot fit ``max_length`` tokens even with its passage and question cut away entirely
    (what ``data.encode`` would refuse)."""
    if not examples:
        return
    bos = len(data._bos_prefix(tokenizer))
    bare = [data.render_prompt(replace(ex, context="", question="")) for ex in examples]
    lengths = [bos + len(ids) for ids in tokenizer(bare, add_special_tokens=False)["input_ids"]]
    worst = max(range(len(examples)), key=lengths.__getitem__)
    if lengths[worst] > max_length:
        too_long = sum(n > max_length for n in lengths)
        raise data.DatasetError(
            f"{where}: {too_long} example(s) cannot fit max_length={max_length} tokens even without passage and "
            f"question, e.g. {examples[worst].uid!r}, whose choices and 'Answer:' alone take {lengths[worst]}; "
            f"raise --max-length to at least {lengths[worst]}", where)


def _subset(examples: list, limit: int | None, seed: int) -> list:
    if limit is None or limit >= len(examples):
        return examples
    return random.Random(seed).sample(examples, limit)


def load_base(settings: RunSettings):
    """``(model, tokenizer)``, the model on the run's device in the run's dtype."""
    dtype = torch.bfloat16 if settings.dtype == "bfloat16" else torch.float32
    model, tokenizer = load_base_model(settings.model, dtype=dtype, trust_remote_code=settings.trust_remote_code)
    return model.to(resolve_device(settings.device)), tokenizer


def train_run(settings: RunSettings, run_dir, resume: bool = False, progress: bool = True):
    """Train ``settings.method`` into ``run_dir``; returns ``(method, task)``.

    Under ``accelerate launch`` (several processes) every process runs this: training is data
    parallel (``train.launched_accelerator``) and rank 0 alone writes into ``run_dir``.
    """
    from .methods import build_method

    accelerator = launched_accelerator()  # first: it binds this process to its device
    started = find_latest_checkpoint(run_dir) is not None
    if settings.init_from_peft and (Path(settings.init_from_peft).is_dir() or not started):
        settings = with_peft_adapter(settings)
    run_settings = settings
    if accelerator and settings.device == "auto":
        device = accelerator.device
        run_settings = dataclasses.replace(settings, device="cpu" if device.type == "cpu" else str(device))
    base, tokenizer = load_base(run_settings)
    task = load_task(run_settings, tokenizer)
    if accelerator:
        wait_for_everyone(accelerator)  # every process has checked run_dir before rank 0 writes
    if not accelerator or accelerator.is_main_process:
        save_settings(run_dir, settings)
    adapter, wrap = settings.adapter, (lambda lm: lm)
    if settings.adapt_top_layers:
        adapter, wrap = _prefix_cached(run_settings, base, task, progress)
    spare = [wrap(base)]

    def base_factory():  # the loaded base first, fresh copies for methods that need several
        return spare.pop() if spare else wrap(load_base(run_settings)[0])

    method = build_method(settings.method, base_factory, adapter, task.readout, seed=settings.train.seed)
    start_from_peft(method, settings, load=not started)
    method.fit(task.train, task.collate, settings.train, run_dir=run_dir, resume=resume, progress=progress)
    return method, task


def with_peft_adapter(settings: RunSettings) -> RunSettings:
    """``settings`` with the adapter shape (rank, alpha, targets, dropout) of its ``init_from_peft``
    adapter, the other adapter settings kept."""
    from .peft_format import read_peft_config

    kept = {k: v for k, v in settings.adapter.to_dict().items()
            if k not in ("rank", "alpha", "target_modules", "dropout")}
    return dataclasses.replace(settings, adapter=read_peft_config(settings.init_from_peft, **kept))


def start_from_peft(method, settings: RunSettings, load: bool = True) -> None:
    """Set every adapter set of ``method`` to the ``init_from_peft`` LoRA (if ``load``) and freeze its A
    and B under ``freeze_ab``. Raises ``RunError`` for a method whose A is not a parameter (``blob``) or
    that would have nothing left to train."""
    from .peft_format import load_peft_adapter

    if not (settings.init_from_peft or settings.freeze_ab):
        return
    for unit in method.units:
        if len(unit.model.lora_A) == 0:
            raise RunError(f"method {settings.method!r} has no point-estimated A to start from a peft adapter "
                           f"or to freeze; use a Me-LoRA or LoRA method")
        if settings.init_from_peft and load:
            load_peft_adapter(unit.model, settings.init_from_peft)
        if settings.freeze_ab:
            unit.model.lora_A.requires_grad_(False)
            unit.model.lora_B.requires_grad_(False)
    if settings.freeze_ab and method.adapter_state() == 0:
        raise RunError(f"freeze_ab with method {settings.method!r} leaves nothing to train (C is fixed); "
                       f"use a method with a learned q(C), e.g. melora")


def _prefix_cached(settings: RunSettings, base, task: Task, progress: bool):
    """``(adapter config, wrap)`` for ``adapt_top_layers``: the targets restricted to the top layers, and
    ``wrap(lm)`` -> a ``PrefixCachedLM`` sharing one cache, filled now for every example of the task
    (length-sorted batches) and kept on disk under the model cache."""
    layers = base.config.num_hidden_layers
    targets = top_layer_targets(settings.adapter.target_modules, layers, settings.adapt_top_layers)
    split, cache = layers - settings.adapt_top_layers, {}
    first = PrefixCachedLM(base, split, cache)
    path = cache_path(default_cache_dir(), settings.model, settings.dtype, split)
    first.load(path)
    examples = task.train + task.eval
    batches = task.length_sorted_batches(examples, PREFIX_CACHE_BATCH)
    added = first.warm(tqdm(batches, total=-(-len(examples) // PREFIX_CACHE_BATCH), desc="prefix cache",
                            disable=not progress, leave=False))
    if added:
        first.save(path)
    wrapped = {id(base): first}
    return (dataclasses.replace(settings.adapter, target_modules=targets),
            lambda lm: wrapped.pop(id(lm), None) or PrefixCachedLM(lm, split, cache))


def evaluate_run(settings: RunSettings, method, task: Task, run_dir, progress: bool = True):
    """Score ``task.eval``; write ``metrics.json``, ``summary.md`` and ``reliability.png``.

    Returns ``(metrics, (probs (N, K), labels (N,)))``.
    """
    probs, labels = evaluate(lambda batch: method.predict(batch, settings.eval_samples), task.eval,
                             task.collate, settings.eval_batch_size, progress=progress)
    metrics = {**summarize(probs, labels), "n": len(labels), "method": settings.method,
               "dataset": settings.dataset, "split": settings.eval_split,
               "eval_samples": settings.eval_samples, "adapter_state": method.adapter_state()}
    accelerator = launched_accelerator()  # evaluate() gathered every process's shard
    if accelerator and not accelerator.is_main_process:
        return metrics, (probs, labels)
    run_dir = Path(run_dir)
    atomic_write_text(run_dir / "metrics.json", json.dumps(metrics, indent=2))
    reliability_diagram({settings.method: (probs, labels)}, run_dir / "reliability.png",
                        title=f"{settings.dataset} ({settings.eval_split})")
    atomic_write_text(run_dir / "summary.md", summary_markdown({settings.method: metrics}, settings))
    return metrics, (probs, labels)


def summary_markdown(results: dict[str, dict], settings: RunSettings, command: str | None = None) -> str:
    """A Markdown table of ACC / ECE / NLL / Brier per method, with the run's settings."""
    lines = [f"# {settings.dataset}: {settings.eval_split} split", ""]
    if command:
        lines += ["Command:", "", f"    {command}", ""]
    if settings.dataset == "boolq" and settings.data_dir:
        lines += [data.BOOLQ_OFFLINE_NOTE, ""]
    lines += [f"Model `{settings.model}`, rank {settings.adapter.rank}, alpha {settings.adapter.alpha}, "
              f"targets {', '.join(settings.adapter.target_modules)}, {settings.train.steps} steps of batch "
              f"{settings.train.batch_size * settings.train.grad_accum}, lr {settings.train.lr}, "
              f"{settings.eval_samples} evaluation samples, seed {settings.train.seed}.", "",
              "| method | n | ACC ↑ | ECE ↓ | NLL ↓ | Brier ↓ | adapter state |",
              "|---|---|---|---|---|---|---|"]
    for name, m in results.items():
        lines.append(f"| {name} | {m['n']} | {m['acc']:.4f} | {m['ece']:.4f} | {m['nll']:.4f} | "
                     f"{m['brier']:.4f} | {m['adapter_state']:,} |")
    return "\n".join(lines) + "\n"
