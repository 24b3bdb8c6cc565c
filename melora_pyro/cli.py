"""The ``melora-pyro`` command: ``train``, ``evaluate``, ``predict``, ``export`` and the ``demo`` main job.

Every field of ``RunSettings``, ``MeLoRAConfig``, ``TrainConfig`` and ``MethodOptions`` is a flag of the
same name (``--prior-std``, ``--batch-size``, ``--prior-precision``, ...); ``--config FILE.toml`` supplies
them as a file (top-level run keys plus ``[adapter]``, ``[train]`` and ``[options]`` tables), flags
override the file.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shlex
import signal
import sys
import threading
import time
import traceback
import types
import typing
from pathlib import Path

from . import rundir
from .config import MeLoRAConfig, MethodOptions
from .errors import MeLoRAError
from .runs import RunError, RunSettings, check_run_dir, load_settings, open_run_dir, read_toml, resume_changes
from .train import NumericalError, TrainConfig

_SECTIONS = {"adapter": MeLoRAConfig, "train": TrainConfig, "options": MethodOptions}
# The main job (README): the embedded ARC-Easy slice, cloze scoring, adapters on the top 2 decoder
# layers + lm_head over the prefix cache, 2 epochs of its 300 training questions; fixed before any
# test metric of the slice was seen, sized for under ten minutes on 2 CPU cores.
DEMO = dict(dataset="arc-e-slice", scoring="cloze", adapt_top_layers=2, eval_samples=8)
DEMO_TRAIN = dict(steps=75, batch_size=8, lr=3e-4, log_every=25)
DEMO_TARGETS = ("q_proj", "v_proj", "lm_head")  # BLoB's recipe (DESIGN.md section 5)
DEMO_METHODS = ("zero-shot", "map", "map-ts", "melora")
DEMO_PAIRS = (("melora", "map"), ("melora", "map-ts"), ("map", "zero-shot"))
_EVALUATE_FIELDS = ("data_dir", "eval_split", "eval_dataset", "eval_limit", "eval_samples", "eval_batch_size",
                    "device", "trust_remote_code")
_EVALUATE_OPTIONS = ("predictive", "posterior_scale", "glm_samples")  # how a trained posterior predicts
_PATH_FIELDS = ("model", "data_dir")  # stored absolute: a run directory is read from anywhere
_PEFT_SHAPE = ("adapter.rank", "adapter.alpha", "adapter.target_modules", "adapter.dropout")


def main(argv: list[str] | None = None) -> int:
    from tqdm.contrib.logging import logging_redirect_tqdm

    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    previous = _handle_sigterm()
    try:
        with logging_redirect_tqdm():  # log lines (--log-every) above the progress bar, not through it
            return args.handler(args) or 0
    except KeyboardInterrupt as e:
        _close_progress_bars()
        print(f"melora-pyro: interrupted{f' ({e})' if str(e) else ''}{_resume_hint(args)}", file=sys.stderr)
        return 130
    except NumericalError as e:
        _close_progress_bars()
        if args.debug:
            traceback.print_exc()
        print(f"melora-pyro: numerical error: {_one_line(e)}", file=sys.stderr)
        return 3
    except (MeLoRAError, ValueError, OSError, ImportError) as e:  # user errors: one line, no traceback
        _close_progress_bars()
        if args.debug:
            traceback.print_exc()
        print(f"melora-pyro: error: {_one_line(e)}", file=sys.stderr)
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _handle_sigterm():
    """SIGTERM (a scheduler's, ``kill``'s) stops the command as Ctrl-C does; returns the old handler
    (None where signals cannot be set: not the main thread)."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt("SIGTERM")

    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, interrupt)


def _resume_hint(args) -> str:
    if args.handler is not _train:
        return ""
    return (f"; the last complete checkpoint is kept, continue with: melora-pyro train --resume "
            f"--run-dir {shlex.quote(str(args.run_dir))}")


def _close_progress_bars() -> None:
    """End the progress bars an error left open, so the message starts a line of its own."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def _one_line(error: BaseException) -> str:
    """The error's message on one line (library messages are one already; some from transformers are not)."""
    return " ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's, without breaking names such as ``melora-elementwise`` at their hyphen."""

    def _split_lines(self, text, width):
        import textwrap
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="melora-pyro", description=__doc__.split("\n")[0],
                                     formatter_class=_HelpFormatter)
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    train = commands.add_parser("train", formatter_class=_HelpFormatter, help="fine-tune a base model with a method into a run directory")
    _add_settings_flags(train)
    train.add_argument("--run-dir", required=True, help="where checkpoints, logs and results go")
    train.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint")
    train.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    train.add_argument("--no-eval", action="store_true", help="skip the evaluation after training")
    train.set_defaults(handler=_train)

    evaluate = commands.add_parser("evaluate", formatter_class=_HelpFormatter, help="score a trained run on its evaluation split")
    evaluate.add_argument("--run-dir", required=True)
    for f in dataclasses.fields(RunSettings):
        if f.name in _EVALUATE_FIELDS:
            _add_field_flag(evaluate, RunSettings, f)
    for f in dataclasses.fields(MethodOptions):
        if f.name in _EVALUATE_OPTIONS:
            _add_field_flag(evaluate, MethodOptions, f, dest=f"options.{f.name}")
    evaluate.add_argument("--temperature-scale", action="store_true",
                          help="first fit one temperature by NLL on the dataset's validation split (never the "
                               "evaluated split) and score with it: temperature scaling on top of any method")
    evaluate.set_defaults(handler=_evaluate)

    predict = commands.add_parser("predict", formatter_class=_HelpFormatter, help="answer multiple-choice questions with a trained run")
    predict.add_argument("--run-dir", required=True)
    predict.add_argument("--question", help="the question text")
    predict.add_argument("--choices", nargs="+", help="the answer options, in order")
    predict.add_argument("--context", default="", help="an optional passage")
    predict.add_argument("--input", help="a JSONL file of {question, choices, context?} rows instead")
    for f in dataclasses.fields(RunSettings):
        if f.name in ("eval_samples", "device", "trust_remote_code"):
            _add_field_flag(predict, RunSettings, f)
    predict.set_defaults(handler=_predict)

    export = commands.add_parser("export", formatter_class=_HelpFormatter, help="write a trained run as a peft adapter or a merged checkpoint")
    export.add_argument("--run-dir", required=True)
    export.add_argument("--format", required=True, choices=("peft", "merged"),
                        help="peft: adapter directory of the posterior mean (+ the full posterior for "
                             "melora_pyro.load_adapters); merged: transformers checkpoint with W0 + s B M A")
    export.add_argument("--out", required=True, help="a new (or empty) directory, written atomically")
    export.set_defaults(handler=_export)

    demo = commands.add_parser("demo", formatter_class=_HelpFormatter, help="the main job: zero-shot, MAP, MAP + TS and Me-LoRA on the embedded "
                                            "ARC-Easy slice")
    _add_settings_flags(demo)
    demo.add_argument("--run-dir", help="default: runs/demo-<time>")
    demo.add_argument("--overwrite", action="store_true")
    demo.set_defaults(handler=_demo)

    for sub in (train, evaluate, predict, export, demo):
        sub.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    return parser


def _add_settings_flags(parser) -> None:
    parser.add_argument("--config", help="a TOML file of settings (flags override it)")
    for f in dataclasses.fields(RunSettings):
        if f.name not in _SECTIONS:
            _add_field_flag(parser, RunSettings, f)
    for section, cls in _SECTIONS.items():
        group = parser.add_argument_group(f"[{section}] settings ({cls.__name__})")
        for f in dataclasses.fields(cls):
            _add_field_flag(group, cls, f, dest=f"{section}.{f.name}")


def _add_field_flag(parser, cls, f: dataclasses.Field, dest: str | None = None) -> None:
    """``--field-name`` for field ``f`` of dataclass ``cls``; an absent flag leaves the setting alone."""
    hint = typing.get_type_hints(cls)[f.name]
    kinds = [a for a in typing.get_args(hint) if a is not type(None)] \
        if typing.get_origin(hint) in (typing.Union, types.UnionType) else [hint]  # X | None: the flag takes an X
    kind = _word_or_number if kinds == [str, float] else typing.get_origin(kinds[0]) or kinds[0]  # tuple[str, ...] -> tuple
    if kind is bool and f.default is None:  # unset means the method's default: the flag takes true / false
        kind = _true_or_false
    kwargs = dict(dest=dest or f.name, default=argparse.SUPPRESS, metavar=f.name.upper(), help=f"(default: {f.default!r})"
                  if f.default is not dataclasses.MISSING else None)
    if cls is RunSettings and f.name in _choices():
        kwargs["help"] = f"one of {', '.join(_choices()[f.name])} {kwargs['help']}"
    if cls is MethodOptions:
        from .methods import methods_taking

        kwargs["help"] = f"for {', '.join(methods_taking(f.name))} (default: the method's)"
    if kind is tuple:
        parser.add_argument(f"--{f.name.replace('_', '-')}", nargs="+", **kwargs)
    elif kind is bool:
        del kwargs["metavar"]
        parser.add_argument(f"--{f.name.replace('_', '-')}", action="store_true", **kwargs)
    else:
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=kind if kind in (int, float, _word_or_number,
                                                                            _true_or_false) else str, **kwargs)


def _word_or_number(text: str) -> str | float:
    """A flag value that is a number or a word (``--prior-precision 0.5`` / ``marglik``)."""
    try:
        return float(text)
    except ValueError:
        return text


def _true_or_false(text: str) -> bool:
    if text.lower() not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() == "true"


def _choices() -> dict:
    from .data import DATASETS
    from .methods import METHODS

    return {"method": METHODS, "dataset": sorted(DATASETS), "eval_dataset": sorted(DATASETS)}


def _settings(args, base: RunSettings | None = None, method: str | None = None, saved: bool = False) -> RunSettings:
    """Settings from the defaults (or ``base``), then the TOML file, then the flags (paths made
    absolute), then ``method`` if given; as the method runs them (``RunSettings.for_method``: the
    method's defaults fill what was not given, or, for the ``saved`` settings of a run, nothing)."""
    merged = (base or RunSettings()).to_dict()
    layers = [read_toml(args.config)] if getattr(args, "config", None) else []
    layers.append({})
    for key, value in vars(args).items():
        section, _, name = key.partition(".")
        if section in _SECTIONS:
            layers[-1].setdefault(section, {})[name] = value
        elif key in merged:
            layers[-1][key] = value
    given = {f.name for cls in (RunSettings, *_SECTIONS.values()) for f in dataclasses.fields(cls)} if saved else set()
    for layer in layers:
        for key, value in layer.items():
            if key in _SECTIONS:
                merged[key].update(value)
                given |= set(value)
            else:
                merged[key] = _absolute(key, value)
                given.add(key)
    if method is not None:
        merged["method"] = method
    return RunSettings.from_dict(merged).for_method(given)


def _absolute(key: str, value):
    """``value`` of setting ``key``, an absolute path if it names a path (a model directory, the data)."""
    if key not in _PATH_FIELDS or not isinstance(value, str) or (key == "model" and not Path(value).is_dir()):
        return value
    return str(Path(value).expanduser().absolute())


def _train(args) -> int:
    """Check everything, then create (or continue) the run directory, holding its lock, and train."""
    from .checkpoint import find_latest_checkpoint
    from .pipeline import build_run, evaluate_run, fit_run, is_writer, with_peft_adapter

    if args.resume and args.overwrite:
        raise RunError("--resume continues a run and --overwrite replaces it: give one of them")
    run_dir = check_run_dir(args.run_dir, overwrite=args.overwrite, resume=args.resume)
    saved = load_settings(run_dir) if args.resume and (run_dir / "settings.json").is_file() else None
    settings = _settings(args, base=saved, saved=saved is not None)
    if saved is None and settings.init_from_peft:
        shape_flags = [f"--{k[8:].replace('_', '-')}" for k in vars(args) if k in _PEFT_SHAPE]
        if shape_flags:
            raise RunError(f"{', '.join(shape_flags)}: the adapter shape comes from --init-from-peft's adapter")
        settings = with_peft_adapter(settings)
    method, task = build_run(settings)  # model, data and method checked before anything is written
    changes = {}
    if saved is not None:
        steps = [find_latest_checkpoint(d) for d in method.unit_dirs(run_dir)]
        step = min(int(c.name.split("-")[1]) if c else 0 for c in steps)
        changes = resume_changes(saved, settings, step)
    with open_run_dir(run_dir, overwrite=args.overwrite, writer=is_writer()):
        if changes and is_writer():
            rundir.record_change(run_dir, step, changes)
        fit_run(settings, method, task, run_dir, resume=args.resume)
        if not args.no_eval:
            _print_metrics(evaluate_run(settings, method, task, run_dir)[0])
    print(f"run directory: {run_dir}")
    return 0


def _trained(args, check=None, **overrides):
    """``(settings, method, task)`` of the finished run ``args.run_dir``, loaded, never trained; code shipped
    with its model runs only if this command line says ``--trust-remote-code``. ``check(settings)``, if
    given, runs before anything is loaded."""
    from .pipeline import load_run

    fields = {f.name for f in dataclasses.fields(RunSettings)}
    given = {k: v for k, v in vars(args).items() if k in fields}
    saved = load_settings(args.run_dir)
    options = {k.partition(".")[2]: v for k, v in vars(args).items() if k.startswith("options.")}
    if options:  # evaluate's prediction-time options (_EVALUATE_OPTIONS) over the run's own
        given["options"] = dataclasses.replace(saved.options, **options)
    settings = dataclasses.replace(saved, **{**given, **overrides})
    if check is not None:
        check(settings)
    method, task = load_run(settings, args.run_dir)
    return settings, method, task


def _evaluate(args) -> int:
    from .pipeline import check_temperature_scaling, score, stored_predictions, temperature_scaled, write_evaluation

    rundir.check_unlocked(args.run_dir)
    settings, method, task = _trained(args, check=check_temperature_scaling if args.temperature_scale else None,
                                      **{k: _absolute(k, v) for k, v in vars(args).items() if k == "data_dir"})
    stored = None
    if args.temperature_scale:  # the run's own test predictions, rescaled: only the validation split is scored
        method, stored = temperature_scaled(settings, method, task), stored_predictions(settings, args.run_dir, task)
    metrics, predictions = score(settings, method, task, base_predictions=stored)
    with rundir.lock_run_dir(args.run_dir):
        path = write_evaluation(metrics, args.run_dir, predictions)
    _print_metrics(metrics)
    print(f"results: {path}")
    return 0


def _export(args) -> int:
    from .export import export_run

    print(f"exported: {export_run(args.run_dir, args.format, args.out)}")
    return 0


def _predict(args) -> int:
    import torch

    from .data import Example

    if args.input:
        rows = _read_predict_input(args.input)
    elif args.question is not None and args.choices:
        rows = [{"question": args.question, "choices": args.choices, "context": args.context}]
        if _predict_row_problem(rows[0]):
            raise RunError(f"--question / --choices / --context: {_predict_row_problem(rows[0])}")
    else:
        raise RunError("give --question and --choices, or --input FILE.jsonl")
    settings, method, task = _trained(args)
    examples = [Example(question=r["question"], choices=tuple(r["choices"]), label=0,
                        context=r.get("context", ""), uid=f"input-{i}") for i, r in enumerate(rows)]
    for ex in examples:
        if len(ex.choices) > task.num_labels:
            raise RunError(f"{ex.uid}: {len(ex.choices)} choices, the run was trained with {task.num_labels}")
    with torch.no_grad():
        probs = method.predict(task.collate(examples), settings.eval_samples)
    for ex, p in zip(examples, probs):
        print(json.dumps({"question": ex.question, "probs": dict(zip(ex.choices, [round(float(x), 4) for x in p])),
                          "answer": ex.choices[int(p[:len(ex.choices)].argmax())]}))
    return 0


def _read_predict_input(path) -> list[dict]:
    """The rows of a ``predict --input`` JSONL file, checked: RunError naming the line otherwise."""
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise RunError(f"{path}: invalid UTF-8 ({e.reason} at byte {e.start})") from None
    rows = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (ValueError, RecursionError) as e:
            raise RunError(f"{path} line {number}: invalid JSON ({e})") from None
        problem = _predict_row_problem(row)
        if problem:
            raise RunError(f"{path} line {number}: {problem}")
        rows.append(row)
    if not rows:
        raise RunError(f"{path}: empty file, expected JSON rows {{\"question\": ..., \"choices\": [...]}}")
    return rows


def _predict_row_problem(row) -> str | None:
    """What is wrong with a ``{question, choices, context?}`` row, or None."""
    from .data import LABEL_LETTERS

    if not isinstance(row, dict):
        return f"expected a JSON object, got {type(row).__name__}"
    unknown = sorted(set(row) - {"question", "choices", "context"})
    if unknown:
        return f"unknown fields {unknown}; expected question, choices and optionally context"
    if not isinstance(row.get("question"), str) or not row["question"].strip():
        return "field 'question' should be a non-empty string"
    if not isinstance(row.get("context", ""), str):
        return "field 'context' should be a string"
    choices = row.get("choices")
    if not isinstance(choices, list) or not all(isinstance(c, str) and c.strip() for c in choices):
        return "field 'choices' should be a list of non-empty strings"
    if not 2 <= len(choices) <= len(LABEL_LETTERS):
        return f"{len(choices)} choices, expected 2 to {len(LABEL_LETTERS)}"
    if len({c.strip() for c in choices}) != len(choices):
        return f"duplicate choices {choices}"
    try:
        "".join([row["question"], row.get("context", ""), *choices]).encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate, from a JSON escape
        return f"invalid text ({e.reason})"
    return None


def _demo(args) -> int:
    """Main job: zero-shot, MAP, MAP + temperature scaling and Me-LoRA on the same data, side by side."""
    from ._atomic import atomic_write_text
    from .pipeline import build_run, evaluate_run, fit_run, paired_markdown, summary_markdown
    from .plots import reliability_diagram

    defaults = RunSettings(**DEMO, adapter=MeLoRAConfig(target_modules=DEMO_TARGETS), train=TrainConfig(**DEMO_TRAIN))
    run_dir = check_run_dir(args.run_dir or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}", overwrite=args.overwrite)
    settings = {method: _settings(args, base=defaults, method=method) for method in DEMO_METHODS}
    built = {method: build_run(s) for method, s in settings.items()}  # every setting checked first
    metrics, predictions = {}, {}
    with open_run_dir(run_dir, overwrite=args.overwrite):
        for method, (trained, task) in built.items():
            rundir.record_written(run_dir, method)
            with open_run_dir(run_dir / method):
                fit_run(settings[method], trained, task, run_dir / method)
                metrics[method], predictions[method] = evaluate_run(settings[method], trained, task, run_dir / method)
        command = "melora-pyro " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        summary = (summary_markdown(metrics, settings["melora"], command=command)
                   + "\n" + paired_markdown(predictions, DEMO_PAIRS))
        rundir.record_written(run_dir, "summary.md", "metrics.json", "reliability.png")
        atomic_write_text(run_dir / "summary.md", summary)
        atomic_write_text(run_dir / "metrics.json", json.dumps(metrics, indent=2))
        reliability_diagram(predictions, run_dir / "reliability.png",
                            title=f"{settings['melora'].dataset} ({settings['melora'].eval_split})")
        rundir.update_marker(run_dir, finished=True)
    print("\n" + summary)
    print(f"results: {run_dir}/summary.md, {run_dir}/metrics.json, {run_dir}/reliability.png")
    return 0


def _print_metrics(metrics: dict) -> None:
    print(" ".join(f"{k.upper()} {metrics[k]:.4f}" for k in ("acc", "ece", "nll", "brier")) + f"  (n={metrics['n']})")


if __name__ == "__main__":
    sys.exit(main())
