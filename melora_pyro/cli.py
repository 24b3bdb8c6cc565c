"""The ``melora-pyro`` command: ``train``, ``evaluate``, ``predict``, ``export`` and the ``demo`` main job.

Every field of ``RunSettings``, ``MeLoRAConfig`` and ``TrainConfig`` is a flag of the same name
(``--prior-std``, ``--batch-size``, ...); ``--config FILE.toml`` supplies them as a file
(top-level run keys plus ``[adapter]`` and ``[train]`` tables), flags override the file.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shlex
import sys
import time
import traceback
import types
import typing
from pathlib import Path

from .config import MeLoRAConfig
from .errors import MeLoRAError
from .runs import RunError, RunSettings, load_settings, prepare_run_dir, read_toml
from .train import NumericalError, TrainConfig

_SECTIONS = {"adapter": MeLoRAConfig, "train": TrainConfig}
# The demo's budget: about ten minutes for both methods on 2 CPU cores (README).
DEMO_TRAIN = dict(steps=100, batch_size=8, lr=1e-3, log_every=10)
DEMO_TARGETS = ("q_proj", "v_proj", "lm_head")  # BLoB's recipe (DESIGN.md section 5)
_PEFT_SHAPE = ("adapter.rank", "adapter.alpha", "adapter.target_modules", "adapter.dropout")
_EVALUATE_FIELDS = ("data_dir", "eval_split", "eval_limit", "eval_samples", "eval_batch_size")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return args.handler(args) or 0
    except KeyboardInterrupt:
        print("melora-pyro: interrupted", file=sys.stderr)
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


def _close_progress_bars() -> None:
    """End the progress bars an error left open, so the message starts a line of its own."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def _one_line(error: BaseException) -> str:
    """The error's message on one line (library messages are one already; some from transformers are not)."""
    return " ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="melora-pyro", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="fine-tune a base model with a method into a run directory")
    _add_settings_flags(train)
    train.add_argument("--run-dir", required=True, help="where checkpoints, logs and results go")
    train.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint")
    train.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    train.add_argument("--no-eval", action="store_true", help="skip the evaluation after training")
    train.set_defaults(handler=_train)

    evaluate = commands.add_parser("evaluate", help="score a trained run on its evaluation split")
    evaluate.add_argument("--run-dir", required=True)
    for f in dataclasses.fields(RunSettings):
        if f.name in _EVALUATE_FIELDS:
            _add_field_flag(evaluate, RunSettings, f)
    evaluate.set_defaults(handler=_evaluate)

    predict = commands.add_parser("predict", help="answer multiple-choice questions with a trained run")
    predict.add_argument("--run-dir", required=True)
    predict.add_argument("--question", help="the question text")
    predict.add_argument("--choices", nargs="+", help="the answer options, in order")
    predict.add_argument("--context", default="", help="an optional passage")
    predict.add_argument("--input", help="a JSONL file of {question, choices, context?} rows instead")
    predict.add_argument("--eval-samples", type=int, help="posterior samples (0: posterior mean)")
    predict.set_defaults(handler=_predict)

    export = commands.add_parser("export", help="write a trained run as a peft adapter or a merged checkpoint")
    export.add_argument("--run-dir", required=True)
    export.add_argument("--format", required=True, choices=("peft", "merged"),
                        help="peft: adapter directory of the posterior mean (+ the full posterior for "
                             "melora_pyro.load_adapters); merged: transformers checkpoint with W0 + s B M A")
    export.add_argument("--out", required=True, help="a new (or empty) directory, written atomically")
    export.set_defaults(handler=_export)

    demo = commands.add_parser("demo", help="the main job: MAP LoRA vs Me-LoRA on the embedded toy task")
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
    if typing.get_origin(hint) in (typing.Union, types.UnionType):  # X | None: the flag takes an X
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    kind = typing.get_origin(hint) or hint  # tuple[str, ...] -> tuple
    kwargs = dict(dest=dest or f.name, default=argparse.SUPPRESS, metavar=f.name.upper(), help=f"(default: {f.default!r})"
                  if f.default is not dataclasses.MISSING else None)
    if kind is tuple:
        parser.add_argument(f"--{f.name.replace('_', '-')}", nargs="+", **kwargs)
    elif kind is bool:
        del kwargs["metavar"]
        parser.add_argument(f"--{f.name.replace('_', '-')}", action="store_true", **kwargs)
    else:
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=kind if kind in (int, float) else str, **kwargs)


def _settings(args, base: RunSettings | None = None) -> RunSettings:
    """Settings from the defaults (or ``base``), then the TOML file, then the flags."""
    merged = (base or RunSettings()).to_dict()
    layers = [read_toml(args.config)] if getattr(args, "config", None) else []
    layers.append({})
    for key, value in vars(args).items():
        section, _, name = key.partition(".")
        if section in _SECTIONS:
            layers[-1].setdefault(section, {})[name] = value
        elif key in merged:
            layers[-1][key] = value
    for layer in layers:
        for key, value in layer.items():
            if key in _SECTIONS:
                merged[key].update(value)
            else:
                merged[key] = value
    return RunSettings.from_dict(merged)


def _train(args) -> int:
    from .pipeline import evaluate_run, train_run

    settings = _settings(args)
    shape_flags = [f"--{k[8:].replace('_', '-')}" for k in vars(args) if k in _PEFT_SHAPE]
    if settings.init_from_peft and shape_flags:
        raise RunError(f"{', '.join(shape_flags)}: the adapter shape comes from --init-from-peft's adapter")
    run_dir = prepare_run_dir(args.run_dir, overwrite=args.overwrite, resume=args.resume)
    method, task = train_run(settings, run_dir, resume=args.resume)
    if not args.no_eval:
        _print_metrics(evaluate_run(settings, method, task, run_dir)[0])
    print(f"run directory: {run_dir}")
    return 0


def _evaluate(args) -> int:
    from .pipeline import evaluate_run, train_run

    overrides = {k: v for k, v in vars(args).items() if k in {f.name for f in dataclasses.fields(RunSettings)}}
    settings = dataclasses.replace(load_settings(args.run_dir), **overrides)
    method, task = train_run(settings, args.run_dir, resume=True, progress=False)  # a finished run: loads only
    _print_metrics(evaluate_run(settings, method, task, args.run_dir)[0])
    return 0


def _export(args) -> int:
    from .export import export_run

    print(f"exported: {export_run(args.run_dir, args.format, args.out)}")
    return 0


def _predict(args) -> int:
    import torch

    from .data import Example
    from .pipeline import train_run

    if args.input:
        rows = _read_predict_input(args.input)
    elif args.question and args.choices:
        rows = [{"question": args.question, "choices": args.choices, "context": args.context}]
        if _predict_row_problem(rows[0]):
            raise RunError(f"--question / --choices / --context: {_predict_row_problem(rows[0])}")
    else:
        raise RunError("give --question and --choices, or --input FILE.jsonl")
    settings = load_settings(args.run_dir)
    if args.eval_samples is not None:
        settings = dataclasses.replace(settings, eval_samples=args.eval_samples)
    method, task = train_run(settings, args.run_dir, resume=True, progress=False)
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
    """Main job: MAP LoRA and Me-LoRA trained on the same data and evaluated side by side."""
    from ._atomic import atomic_write_text
    from .pipeline import evaluate_run, summary_markdown, train_run
    from .plots import reliability_diagram

    defaults = RunSettings(adapter=MeLoRAConfig(target_modules=DEMO_TARGETS), train=TrainConfig(**DEMO_TRAIN))
    settings = _settings(args, base=defaults)
    run_dir = prepare_run_dir(args.run_dir or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}",
                              overwrite=args.overwrite)
    metrics, predictions = {}, {}
    for method in ("map", "melora"):
        method_settings = dataclasses.replace(settings, method=method)
        trained, task = train_run(method_settings, prepare_run_dir(run_dir / method))
        metrics[method], predictions[method] = evaluate_run(method_settings, trained, task, run_dir / method)
    command = "melora-pyro " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    summary = summary_markdown(metrics, settings, command=command)
    atomic_write_text(run_dir / "summary.md", summary)
    atomic_write_text(run_dir / "metrics.json", json.dumps(metrics, indent=2))
    reliability_diagram(predictions, run_dir / "reliability.png", title=f"{settings.dataset}: MAP vs Me-LoRA")
    print("\n" + summary)
    print(f"results: {run_dir}/summary.md, {run_dir}/metrics.json, {run_dir}/reliability.png")
    return 0


def _print_metrics(metrics: dict) -> None:
    print(" ".join(f"{k.upper()} {metrics[k]:.4f}" for k in ("acc", "ece", "nll", "brier")) + f"  (n={metrics['n']})")


if __name__ == "__main__":
    sys.exit(main())
