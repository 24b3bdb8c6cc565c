"""Exporting a trained Me-LoRA model for other tools: a peft adapter or a merged transformers checkpoint.

    export_peft(model, guide, "out/peft")        # PeftModel.from_pretrained(base, "out/peft")
    export_merged(model, guide, "out/merged")    # AutoModelForCausalLM.from_pretrained("out/merged")
    export_run("runs/arc", "peft", "out/peft")   # the same from a CLI run directory

Both write the posterior mean (C = M, the guide's mean). A peft directory also holds this library's
own checkpoint of the whole posterior (``melora.json`` + ``adapters.safetensors``: A, B and the guide's
mean and scales, which peft has no place for), so ``load_adapters(out, base)`` gives back the model and
guide. The output directory is built in a temporary sibling and renamed into place: it is complete or
absent, and an existing non-empty directory is refused, never overwritten.
"""
from __future__ import annotations

from pathlib import Path

from torch import nn

from ._atomic import atomic_directory
from .errors import MeLoRAError
from .io import merge_adapters, save_adapters
from .model import MeLoRAModel
from .peft_format import peft_adapter_files

FORMATS = ("peft", "merged")


class ExportError(MeLoRAError):
    """An export that cannot be written: the output directory is in use, or the method has no single
    posterior-mean LoRA (an ensemble, a Laplace approximation)."""


def export_peft(model: MeLoRAModel, guide: nn.Module, out, base_model_name: str | None = None) -> Path:
    """Write a peft LoRA adapter directory of the posterior mean, plus the full posterior for ``load_adapters``.

    Each adapted layer gets ``lora_A = A_l`` ``(r, n)`` and ``lora_B = B_l M_l`` ``(m, r)`` with
    ``LoraConfig(r=rank, lora_alpha=alpha, target_modules=...)``. ``base_model_name`` is recorded as
    the adapter's ``base_model_name_or_path``. Returns ``out``.
    """
    files = peft_adapter_files(model.posterior_mean_layers(guide), model.config, base_model_name)
    with _new_directory(out) as tmp:
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        save_adapters(tmp, model, guide)
    return Path(out)


def export_merged(model: MeLoRAModel, guide: nn.Module, out, tokenizer=None, into: nn.Module | None = None) -> Path:
    """Write a plain transformers checkpoint (``save_pretrained``) with ``W0 + s B M A`` folded in, and
    ``tokenizer`` beside it if given. Works in place (``model`` is unusable afterwards) unless ``into``,
    a fresh copy of the base model, receives the weights instead (``merge_adapters``). Returns ``out``."""
    with _new_directory(out) as tmp:
        merge_adapters(model, guide, into=into).save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out)


def export_run(run_dir, format: str, out) -> Path:
    """Export a finished CLI run (``melora-pyro train --run-dir run_dir``) as ``format`` (``FORMATS``)."""
    from .pipeline import load_base, load_run
    from .runs import load_settings

    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}; expected one of {list(FORMATS)}")
    _check_free(out)
    settings = load_settings(run_dir)
    method, task = load_run(settings, run_dir)  # a finished run: loads, never trains or writes
    model, guide = getattr(method, "model", None), getattr(method, "guide", None)
    if not isinstance(model, MeLoRAModel) or guide is None or not hasattr(guide, "posterior_mean"):
        raise ExportError(f"method {settings.method!r} has no single posterior-mean LoRA to export "
                          f"(ensembles and Laplace keep several or a curvature); export a member's run instead")
    if format == "peft":
        return export_peft(model, guide, out, base_model_name=_base_model_name(settings.model))
    # A prefix-cached base (adapt_top_layers) is no transformers model: fold into a fresh copy instead.
    into = None if hasattr(model.base, "save_pretrained") else load_base(settings)[0]
    return export_merged(model, guide, out, tokenizer=task.tokenizer, into=into)


def _base_model_name(model: str) -> str:
    """What peft should read the base from: the converted checkpoint for the SmolLM2 alias."""
    from .models import SMOLLM2_ALIAS, default_cache_dir

    return str(default_cache_dir() / SMOLLM2_ALIAS) if model == SMOLLM2_ALIAS else model


def _check_free(out) -> None:
    out = Path(out)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise ExportError(f"output directory {out} exists and is not empty; choose a new --out")


def _new_directory(out):
    _check_free(out)
    return atomic_directory(out)
