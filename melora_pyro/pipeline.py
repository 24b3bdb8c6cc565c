"""One run end to end: data, base model, method, training, evaluation and the written results."""
from __future__ import annotations

import dataclasses
import json
import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import data, rundir
from .cloze import ClozeTemplate, template_for
from .packing import PackedExample, pack_batch, pack_example
from .readouts import ClozeReadout, LetterReadout
from ._atomic import atomic_write_text
from .checkpoint import find_latest_checkpoint
from .metrics import METRICS, bootstrap_ci, summarize
from .models import default_cache_dir, load_base_model
from .prefix_cache import PrefixCachedLM, cache_path, top_layer_targets
from .plots import reliability_diagram
from .checkpoint import checkpoint_root, find_latest_checkpoint
from .runs import RunError, RunSettings, load_settings, open_run_dir, resolve_device, save_settings
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
    normalization: str = "sum"
    template: ClozeTemplate | None = None
    dataset: str = ""
    _packed: dict = field(default_factory=dict, repr=False)

    def collate(self, examples: list) -> dict:
        """A batch of tensors on the run's device."""
        if self.scoring == "letter":
            batch = data.encode(self.tokenizer, examples, self.max_length, num_labels=self.num_labels)
        else:
            batch = pack_batch([self.pack(ex) for ex in examples], self.num_labels, _pad_id(self.tokenizer))
        return {key: value.to(self.device) for key, value in batch.items()}

    def pack(self, example, template: ClozeTemplate | None = None) -> PackedExample:
        """``example`` packed for cloze scoring with ``template`` (default the task's), once: later calls
        return that packing (DatasetError naming the example if it cannot be packed)."""
        if example not in self._packed:
            self._packed[example] = pack_example(self.tokenizer, example, template or self.template or ClozeTemplate(),
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

    def prepare(self, examples: list, split: str, log=print, dataset: str | None = None) -> list:
        """``examples`` (of ``dataset``, default the task's) checked to fit (a bad one fails now, before
        training) and, under cloze scoring, packed with that dataset's template. A repeated *wrong*
        choice (OpenBookQA's train file has three) would be scored twice: its repeats are dropped, and
        the number of such examples is printed."""
        where = f"{dataset or self.dataset} {split}"
        if self.scoring == "letter":
            _check_prompts_fit(examples, self.tokenizer, self.max_length, where)
            return examples
        deduplicated = [data.without_repeated_choices(ex) for ex in examples]
        changed = sum(a is not b for a, b in zip(examples, deduplicated))
        if changed:
            log(f"{where}: {changed} example(s) repeat a wrong choice; under cloze scoring the repeats are dropped")
        template = template_for(dataset) if dataset else None
        for ex in deduplicated:
            self.pack(ex, template)
        return deduplicated

    def length_sorted_batches(self, examples: list, batch_size: int):
        """``collate``d batches of ``examples`` from shortest to longest (little padding)."""
        def length(ex):
            return len(self.pack(ex).tokens) if self.scoring == "cloze" else len(data.render_prompt(ex))
        ordered = sorted(examples, key=length)
        for start in range(0, len(ordered), batch_size):
            yield self.collate(ordered[start:start + batch_size])


def load_task(settings: RunSettings, tokenizer, log=print) -> Task:
    """Load the train split of ``settings.dataset`` and the evaluation split of ``settings.scored_dataset``
    (seeded subsets if limits are set), checked to fit (``Task.prepare``)."""
    seed = settings.train.seed
    if settings.data_dir is not None and not Path(settings.data_dir).is_dir():
        raise RunError(f"setting data_dir: {settings.data_dir} is not a directory")
    train = _subset(data.load_examples(settings.dataset, "train", settings.data_dir, seed), settings.train_limit, seed)
    scored = settings.scored_dataset
    evals = _subset(data.load_examples(scored, settings.eval_split, settings.data_dir, seed), settings.eval_limit, seed)
    for name, split, examples in ((settings.dataset, "train", train), (scored, settings.eval_split, evals)):
        if not examples:
            raise data.DatasetError(f"{name} {split}: no examples (check --data-dir and the split's file)")
    num_labels = max(len(ex.choices) for ex in train + evals)
    task = Task(train, evals, tokenizer, num_labels, settings.max_length, resolve_device(settings.device),
                settings.scoring, settings.normalization, dataset=settings.dataset)
    if settings.scoring == "cloze":
        task.template = template_for(settings.dataset)
    task.train = task.prepare(train, "train", log)
    task.eval = task.prepare(evals, settings.eval_split, log, dataset=scored)
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


def build_run(settings: RunSettings, progress: bool = True):
    """``(method, task)``: the base model, the data and the untrained method of ``settings`` (as the
    method runs them: ``RunSettings.for_method``), every setting checked (rank and targets against
    the model, non-empty splits); nothing is written anywhere but the prefix cache of
    ``adapt_top_layers`` (under the model cache).

    Under ``accelerate launch`` (several processes) every process runs this and the training:
    training is data parallel (``train.launched_accelerator``) and rank 0 alone writes into the run.
    """
    from .methods import build_method, method_options

    accelerator = launched_accelerator()  # first: it binds this process to its device
    run_settings = settings
    if accelerator and settings.device == "auto":
        device = accelerator.device
        run_settings = dataclasses.replace(settings, device="cpu" if device.type == "cpu" else str(device))
    base, tokenizer = load_base(run_settings)
    task = load_task(run_settings, tokenizer)
    world = accelerator.num_processes if accelerator else 1
    if len(task.train) < settings.train.batch_size * world:
        raise data.DatasetError(f"{settings.dataset} train: {len(task.train)} examples, fewer than one batch of "
                                f"{settings.train.batch_size * world}; lower --batch-size or raise --train-limit")
    options = validation_options(settings, task)
    adapter, wrap = settings.adapter, (lambda lm: lm)
    if settings.adapt_top_layers:
        adapter, wrap = _prefix_cached(run_settings, base, task.train + task.eval + options.get("val_examples", []),
                                       task, progress)
    spare = [wrap(base)]

    def base_factory():  # the loaded base first, fresh copies for methods that need several
        return spare.pop() if spare else wrap(load_base(run_settings)[0])

    method = build_method(settings.method, base_factory, adapter, task.readout, seed=settings.train.seed,
                          **method_options(settings.method, settings.adapter, settings.train),
                          **settings.options.given(), **options)
    peft = settings.init_from_peft
    start_from_peft(method, settings, load=bool(peft) and Path(peft).is_dir())  # on resume the checkpoint wins
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


def _prefix_cached(settings: RunSettings, base, examples: list, task: Task, progress: bool):
    """``(adapter config, wrap)`` for ``adapt_top_layers``: the targets restricted to the top layers, and
    ``wrap(lm)`` -> a ``PrefixCachedLM`` sharing one cache, filled now for every one of ``examples``
    (length-sorted batches) and kept on disk under the model cache."""
    layers = base.config.num_hidden_layers
    targets = top_layer_targets(settings.adapter.target_modules, layers, settings.adapt_top_layers)
    split, cache = layers - settings.adapt_top_layers, {}
    first = PrefixCachedLM(base, split, cache)
    path = cache_path(default_cache_dir(), settings.model, settings.dtype, split)
    first.load(path)
    batches = task.length_sorted_batches(examples, PREFIX_CACHE_BATCH)
    added = first.warm(tqdm(batches, total=-(-len(examples) // PREFIX_CACHE_BATCH), desc="prefix cache",
                            disable=not progress, leave=False))
    if added:
        first.save(path)
    wrapped = {id(base): first}
    return (dataclasses.replace(settings.adapter, target_modules=targets),
            lambda lm: wrapped.pop(id(lm), None) or PrefixCachedLM(lm, split, cache))


def validation_options(settings: RunSettings, task: Task) -> dict:
    """``{"val_examples", "validation"}`` for a method that fits on validation data
    (``methods.VALIDATION_METHODS``; ``{"val_examples"}`` for ``laplace`` with
    ``prior_precision="validation"`` and a Me-LoRA GLM predictive with ``posterior_scale="validation"``): the dataset's validation split, else a seeded hold-out of
    ``task.train``, which is then removed from it (``data.train_and_validation``). ``{}`` otherwise."""
    from .methods import VALIDATION_METHODS

    laplace_search = (settings.method == "laplace" and settings.options.prior_precision == "validation"
                      or settings.options.posterior_scale == "validation")  # or the Me-LoRA GLM predictive's scale
    if settings.method not in VALIDATION_METHODS and not laplace_search:
        return {}
    task.train, val, where = data.train_and_validation(settings.dataset, task.train, settings.data_dir,
                                                       settings.train.seed)
    val = task.prepare(val, "validation")
    return {"val_examples": val} if laplace_search else {"val_examples": val, "validation": where}


def is_writer() -> bool:
    """Whether this process writes into the run directory (rank 0, or the only process)."""
    accelerator = launched_accelerator()
    return not accelerator or accelerator.is_main_process


def fit_run(settings: RunSettings, method, task: Task, run_dir, resume: bool = False, progress: bool = True):
    """Train ``method`` into the run directory ``run_dir`` (created by ``runs.open_run_dir``, whose lock
    the caller holds); rank 0 writes ``settings.json`` and marks the run finished at the end."""
    accelerator = launched_accelerator()
    if accelerator:
        wait_for_everyone(accelerator)  # rank 0 has prepared run_dir
    run_dir = Path(run_dir)
    if is_writer():
        save_settings(run_dir, settings)
        rundir.record_written(run_dir, "settings.json", *_fit_entries(method, run_dir))
        rundir.update_marker(run_dir, finished=False)
    method.fit(task.train, task.collate, settings.train, run_dir=run_dir, resume=resume, progress=progress)
    if is_writer():
        rundir.update_marker(run_dir, finished=True)
    return method


def _fit_entries(method, run_dir: Path) -> list[str]:
    """The top-level entries of ``run_dir`` that training ``method`` writes (logs and checkpoints)."""
    return sorted({path.relative_to(run_dir).parts[0] if path != run_dir else name
                   for path in method.unit_dirs(run_dir) for name in ("train_log.jsonl", "checkpoints")})


def train_run(settings: RunSettings, run_dir, resume: bool = False, progress: bool = True):
    """Train ``settings.method`` into the run directory ``run_dir`` (created and locked here); returns
    ``(method, task)``."""
    settings = settings.for_method()
    if settings.init_from_peft and find_latest_checkpoint(run_dir) is None:
        settings = with_peft_adapter(settings)
    method, task = build_run(settings)
    with open_run_dir(run_dir, writer=is_writer()):
        fit_run(settings, method, task, run_dir, resume=resume, progress=progress)
    return method, task


def load_run(settings: RunSettings, run_dir):
    """``(method, task)`` of a finished run, loaded from its last checkpoints: it never trains and writes
    nothing. ``RunError`` for a run that is unfinished (killed, or ``settings.json`` asks for more steps
    than were trained) or has lost its checkpoints."""
    run_dir = Path(run_dir)
    hint = f"continue it with: melora-pyro train --resume --run-dir {run_dir}"
    if not rundir.read_marker(run_dir).get("finished"):
        raise RunError(f"run {run_dir} is unfinished (its training was stopped); {hint}")
    method, task = build_run(settings)
    for unit_dir in method.unit_dirs(run_dir):
        latest = find_latest_checkpoint(unit_dir)
        if latest is None:
            raise RunError(f"run {run_dir}: no checkpoint in {checkpoint_root(unit_dir)}; train it again")
        step = int(latest.name.split("-")[1])
        if step != settings.train.steps:
            raise RunError(f"run {run_dir} is unfinished: its checkpoint {latest.name} is at step {step}, "
                           f"settings.json asks for {settings.train.steps}; {hint}")
    method.fit(task.train, task.collate, settings.train, run_dir=run_dir, resume=True, progress=False)
    return method, task


def score(settings: RunSettings, method, task: Task, progress: bool = True,
          base_predictions: tuple | None = None) -> tuple[dict, tuple]:
    """Score ``task.eval``: ``(metrics, (probs (N, K), labels (N,)))``; writes nothing.

    ``base_predictions``: for a temperature-scaled ``method``, its base's own ``(probs, labels, file
    name)`` of ``task.eval`` (``stored_predictions``), rescaled instead of scored again (the same
    posterior samples).
    """
    if base_predictions is None:
        probs, labels = evaluate(lambda batch: method.predict(batch, settings.eval_samples), task.eval,
                                 task.collate, settings.eval_batch_size, progress=progress)
    else:
        probs, labels = method.rescale(base_predictions[0]), base_predictions[1]
    metrics = {**summarize(probs, labels), "n": len(labels), "method": settings.method,
               "dataset": settings.scored_dataset, "split": settings.eval_split,
               "eval_samples": settings.eval_samples, "scoring": settings.scoring,
               "normalization": settings.normalization, "adapter_state": method.adapter_state()}
    if settings.scored_dataset != settings.dataset:
        metrics["trained_on"] = settings.dataset
    if base_predictions is not None:
        metrics["rescaled"] = base_predictions[2]
    if getattr(method, "temperature", None) is not None:
        metrics.update(temperature=method.temperature, validation=method.validation)
    if getattr(method, "prior_precision", None) is not None:  # laplace: the lambda its rule chose
        metrics["prior_precision"] = method.prior_precision
    if getattr(method, "posterior_scale", None) is not None:  # Me-LoRA's GLM predictive: its scale
        metrics.update(predictive="glm", posterior_scale=method.posterior_scale)
        if method.selection:  # chosen on validation: the NLL of every candidate scale
            metrics["validation_nll_by_scale"] = {f"{s:g}": v for s, v in method.selection.items()}
    return metrics, (probs, labels)


def evaluate_run(settings: RunSettings, method, task: Task, run_dir, progress: bool = True):
    """Score ``task.eval``; write ``metrics.json``, ``predictions.safetensors`` (``write_predictions``),
    ``summary.md`` and ``reliability.png`` (the results ``train`` leaves in its run directory).
    Returns ``(metrics, (probs (N, K), labels (N,)))``.
    """
    metrics, (probs, labels) = score(settings, method, task, progress=progress)
    if not is_writer():  # evaluate() gathered every process's shard
        return metrics, (probs, labels)
    run_dir = Path(run_dir)
    rundir.record_written(run_dir, "metrics.json", "predictions.safetensors", "reliability.png", "summary.md")
    write_predictions(run_dir / "predictions.safetensors", probs, labels)
    atomic_write_text(run_dir / "metrics.json", json.dumps(metrics, indent=2))
    reliability_diagram({settings.method: (probs, labels)}, run_dir / "reliability.png",
                        title=f"{settings.scored_dataset} ({settings.eval_split})")
    atomic_write_text(run_dir / "summary.md", summary_markdown({settings.method: metrics}, settings))
    return metrics, (probs, labels)


def write_evaluation(metrics: dict, run_dir, predictions: tuple | None = None) -> Path:
    """Write ``metrics`` of an ``evaluate`` to ``run_dir/eval-<split>-<time>.json`` (a new file; what
    ``train`` wrote stays as it was) and ``predictions`` ``(probs, labels)`` beside it as
    ``eval-<split>-<time>.safetensors``; returns the JSON file's path."""
    run_dir = Path(run_dir)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path, n = run_dir / f"eval-{metrics['split']}-{stamp}.json", 1
    while path.exists():
        n += 1
        path = run_dir / f"eval-{metrics['split']}-{stamp}-{n}.json"
    rundir.record_written(run_dir, path.name, *([path.with_suffix(".safetensors").name] if predictions else []))
    if predictions:
        write_predictions(path.with_suffix(".safetensors"), *predictions)
    atomic_write_text(path, json.dumps(metrics, indent=2))
    return path


def write_predictions(path, probs: torch.Tensor, labels: torch.Tensor) -> None:
    """``probs`` (N, K) float32 and ``labels`` (N,) int64 of the evaluated questions, in their order,
    as safetensors (``read_predictions``), for paired comparisons without scoring again."""
    from safetensors.torch import save

    blob = save({"probs": probs.detach().float().cpu().contiguous(), "labels": labels.long().cpu().contiguous()})
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    tmp.write_bytes(blob)
    tmp.replace(path)


def read_predictions(path) -> tuple[torch.Tensor, torch.Tensor]:
    """``(probs (N, K), labels (N,))`` written by ``write_predictions``."""
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    return tensors["probs"], tensors["labels"]


def stored_predictions(settings: RunSettings, run_dir, task: Task) -> tuple | None:
    """``(probs (N, K), labels (N,), file name)``: predictions already in ``run_dir`` (``train``'s, then
    the newest ``evaluate``'s first) that score what ``settings`` asks, unscaled: the same dataset, split,
    questions, posterior samples and cloze normalisation. None if there are none."""
    run_dir = Path(run_dir)
    saved = load_settings(run_dir)  # what a result written before it recorded its normalisation used
    candidates = [run_dir / "metrics.json", *sorted(run_dir.glob("eval-*.json"), key=lambda p: p.name, reverse=True)]
    wanted = {"dataset": settings.scored_dataset, "split": settings.eval_split, "eval_samples": settings.eval_samples,
              "n": len(task.eval), "normalization": settings.normalization}
    for metrics_file in candidates:
        predictions_file = metrics_file.with_suffix(".safetensors") if metrics_file.name != "metrics.json" \
            else run_dir / "predictions.safetensors"
        if not (metrics_file.is_file() and predictions_file.is_file()):
            continue
        metrics = {"normalization": saved.normalization, **json.loads(metrics_file.read_text())}
        if any(metrics.get(k) != v for k, v in wanted.items()) or "temperature" in metrics:
            continue
        probs, labels = read_predictions(predictions_file)
        if torch.equal(labels, torch.tensor([e.label for e in task.eval])):
            return probs, labels, predictions_file.name
    return None


def check_temperature_scaling(settings: RunSettings) -> None:
    """``RunError`` unless ``settings.dataset`` has a validation split other than the evaluated one."""
    evaluates_validation = settings.eval_split == "validation" and settings.scored_dataset == settings.dataset
    if "validation" not in data.DATASETS[settings.dataset].splits or evaluates_validation:
        raise RunError(f"temperature scaling a trained run needs a validation split other than the evaluated "
                       f"one; dataset {settings.dataset!r} evaluated on {settings.eval_split!r} has none "
                       f"(train with --method map-ts to hold out part of train instead)")


def temperature_scaled(settings: RunSettings, method, task: Task, progress: bool = True):
    """``method`` (trained) followed by one temperature fitted by NLL on the dataset's validation split
    (``baselines.TemperatureScaledMethod``), scored with ``settings.eval_samples`` like the test split.
    ``RunError`` where there is no such split apart from the evaluated one: a hold-out of train would
    be data the method was trained on."""
    from .baselines import TemperatureScaledMethod

    check_temperature_scaling(settings)
    val = data.load_examples(settings.dataset, "validation", settings.data_dir, settings.train.seed)
    scaled = TemperatureScaledMethod(method, task.prepare(val, "validation"),
                                     validation=f"{settings.dataset} validation split ({len(val)})",
                                     val_samples=settings.eval_samples, name=f"{settings.method}+ts")
    scaled.calibrate(task.collate, progress=progress)
    return scaled


def paired_markdown(predictions: dict[str, tuple], pairs, num_resamples: int = 1000) -> str:
    """A Markdown table of ``a - b`` for each ``(a, b)`` of ``pairs``: the difference of ACC / ECE / NLL /
    Brier on the same questions and its 95% paired-bootstrap CI (``metrics.bootstrap_ci``).
    ``predictions``: ``{method: (probs (N, K), labels (N,))}``."""
    lines = ["Differences on the same questions, 95% paired-bootstrap CIs (1,000 resamples); a CI that "
             "excludes 0 resolves the difference.", "",
             "| difference | " + " | ".join(f"Δ {k.upper()}" for k in METRICS) + " |",
             "|---|" + "---|" * len(METRICS)]
    for a, b in pairs:
        if a not in predictions or b not in predictions:
            continue
        (pa, labels), (pb, _) = predictions[a], predictions[b]
        cells = []
        for metric in METRICS.values():
            lo, hi = bootstrap_ci(metric, pa, labels, pb, num_resamples=num_resamples)
            cells.append(f"{metric(pa, labels) - metric(pb, labels):+.4f} [{lo:+.4f}, {hi:+.4f}]")
        lines.append(f"| {a} - {b} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def summary_markdown(results: dict[str, dict], settings: RunSettings, command: str | None = None) -> str:
    """A Markdown table of ACC / ECE / NLL / Brier per method, with the run's settings."""
    trained = f" (trained on {settings.dataset})" if settings.scored_dataset != settings.dataset else ""
    lines = [f"# {settings.scored_dataset}: {settings.eval_split} split{trained}", ""]
    if command:
        lines += ["Command:", "", f"    {command}", ""]
    if "boolq" in (settings.dataset, settings.scored_dataset) and settings.data_dir:
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
    fitted = [f"{name}: T = {m['temperature']:.3f} fitted on the {m['validation']}"
              for name, m in results.items() if "temperature" in m]
    if fitted:
        lines += ["", "Temperature scaling (never fitted on the test split): " + "; ".join(fitted) + "."]
    return "\n".join(lines) + "\n"
