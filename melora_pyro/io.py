"""Saving, loading and exporting adapters: safetensors + JSON only, never pickle."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save
from torch import nn

from ._atomic import atomic_write_bytes, atomic_write_text
from .config import MeLoRAConfig
from .errors import MeLoRAError
from .layers import MeLoRALinear
from .model import MeLoRAModel
from .readouts import readout_from_dict

TENSORS_FILE = "adapters.safetensors"
META_FILE = "melora.json"
FORMAT_VERSION = 1


class CheckpointError(MeLoRAError):
    """An adapter checkpoint that is missing, malformed or does not fit the base model."""


def save_adapters(directory, model: MeLoRAModel, guide: nn.Module | None = None) -> Path:
    """Write ``adapters.safetensors`` (A, B and the guide's tensors) and ``melora.json``.

    The tensors file is written first and the JSON last, each atomically, so a directory with a
    ``melora.json`` always holds a complete checkpoint.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.detach().contiguous().cpu() for k, v in model.adapter_state_dict().items()}
    if guide is not None:
        tensors.update({f"guide.{k}": v.detach().contiguous().cpu() for k, v in guide.state_dict().items()})
    meta = {
        "format_version": FORMAT_VERSION,
        "config": model.config.to_dict(),
        "label_token_ids": model.label_token_ids,
        "readout": model.readout.to_dict(),
        "layer_names": model.layer_names,
        "guide": type(guide).__name__ if guide is not None else None,
    }
    atomic_write_bytes(directory / TENSORS_FILE, save(tensors))
    atomic_write_text(directory / META_FILE, json.dumps(meta, indent=2))
    return directory


def load_adapters(directory, base_model: nn.Module, guide_cls=None):
    """Rebuild ``(model, guide)`` on a fresh ``base_model`` from :func:`save_adapters` output.

    ``guide_cls`` defaults to the class named in the checkpoint (one of ``guides.__all__``; no other
    name is looked up, so a checkpoint cannot make this call anything else). Raises
    :class:`CheckpointError` if the files are missing or malformed, or if the layer names or tensor
    shapes do not match the base model.
    """
    import guides

    directory = Path(directory)
    meta = _read_meta(directory)
    try:
        config = MeLoRAConfig.from_dict(meta["config"])
        model = MeLoRAModel(base_model, config, _saved_readout(meta))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{directory / META_FILE}: checkpoint does not fit the base model: {e}") from e
    if model.layer_names != meta.get("layer_names"):
        raise CheckpointError(f"{directory}: adapted layers differ: checkpoint has {meta.get('layer_names')!r:.120}, "
                              f"base model gives {model.layer_names[:3]}...")
    guide = None
    if guide_cls is None and meta.get("guide"):
        if meta["guide"] not in guides.__all__:
            raise CheckpointError(f"{directory / META_FILE}: unknown guide class {meta['guide']!r:.80}; "
                                  f"expected one of {guides.__all__}")
        guide_cls = getattr(guides, meta["guide"])
    if guide_cls is not None:
        guide = guide_cls(model)
    load_adapter_tensors(directory, model, guide)
    return model, guide


def load_adapter_tensors(directory, model: MeLoRAModel, guide: nn.Module | None = None) -> None:
    """Copy the saved tensors into an existing ``model`` (and ``guide``), checking names and shapes.

    The checkpoint's ``melora.json`` must describe ``model``: the same adapted layers in the same
    order, label tokens and adapter config (tensors of equal shape in other layers would otherwise
    load silently). Raises :class:`CheckpointError`.
    """
    directory = Path(directory)
    _check_fits(_read_meta(directory), model, directory)
    try:
        tensors = load_file(directory / TENSORS_FILE)
    except Exception as e:  # safetensors raises its own error types for a damaged file
        raise CheckpointError(f"{directory / TENSORS_FILE}: unreadable safetensors file: {e}") from e
    _load_into(model, {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, directory, "model")
    if guide is not None:
        _load_into(guide, {k[6:]: v for k, v in tensors.items() if k.startswith("guide.")}, directory, "guide")


def _check_fits(meta: dict, model: MeLoRAModel, directory: Path) -> None:
    """``meta`` (a checkpoint's ``melora.json``) describes ``model``, else CheckpointError."""
    saved = meta.get("config")
    own = model.config.to_dict()
    if not isinstance(saved, dict):
        raise CheckpointError(f"{directory / META_FILE}: 'config' should be a table, got {saved!r:.60}")
    differ = [f"{k}={saved.get(k)!r:.40} (checkpoint) vs {v!r:.40} (model)" for k, v in own.items()
              if saved.get(k) != v]
    if differ or set(saved) - set(own):
        raise CheckpointError(f"{directory / META_FILE}: the checkpoint's adapter config does not match the "
                              f"model: {'; '.join(differ) or sorted(map(str, set(saved) - set(own)))}")
    if _saved_readout(meta).to_dict() != model.readout.to_dict():
        raise CheckpointError(f"{directory / META_FILE}: readouts differ: checkpoint has "
                              f"{_saved_readout(meta).to_dict()!r:.120}, the model has {model.readout.to_dict()!r:.120}")
    for key in ("layer_names",):
        if meta.get(key) != list(getattr(model, key)):
            raise CheckpointError(f"{directory / META_FILE}: {key} differ: checkpoint has {meta.get(key)!r:.120}, "
                                  f"the model has {list(getattr(model, key))!r:.120}")


def _saved_readout(meta: dict):
    """The readout a checkpoint was trained with (checkpoints before readouts existed: letter)."""
    saved = meta.get("readout") or {"kind": "letter", "label_token_ids": meta.get("label_token_ids")}
    try:
        return readout_from_dict(saved)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{META_FILE}: bad readout: {e}") from e


def _read_meta(directory: Path) -> dict:
    if not (directory / META_FILE).is_file() or not (directory / TENSORS_FILE).is_file():
        raise CheckpointError(f"{directory}: not an adapter checkpoint (needs {META_FILE} and {TENSORS_FILE})")
    try:
        meta = json.loads((directory / META_FILE).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{directory / META_FILE}: not valid JSON: {e}") from e
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{directory / META_FILE}: unsupported format (expected format_version {FORMAT_VERSION})")
    return meta


def _load_into(module: nn.Module, tensors: dict, directory: Path, what: str) -> None:
    own = module.adapter_state_dict() if isinstance(module, MeLoRAModel) else module.state_dict()
    if set(own) != set(tensors):
        raise CheckpointError(f"{directory / TENSORS_FILE}: {what} tensors {sorted(tensors)} do not match "
                              f"the expected {sorted(own)}")
    for key, value in tensors.items():
        if own[key].shape != value.shape:
            raise CheckpointError(f"{directory / TENSORS_FILE}: {what} tensor {key} has shape "
                                  f"{tuple(value.shape)}, the base model needs {tuple(own[key].shape)}")
        if value.is_floating_point() and not value.isfinite().all():
            raise CheckpointError(f"{directory / TENSORS_FILE}: {what} tensor {key} holds non-finite values "
                                  f"(NaN or inf); the checkpoint is damaged")
    with torch.no_grad():
        for key, value in tensors.items():
            own[key].copy_(value)


@torch.no_grad()
def merge_adapters(model: MeLoRAModel, guide: nn.Module, into: nn.Module | None = None) -> nn.Module:
    """Fold ``W0 + s B M A`` (M = the guide's posterior mean of C) into plain ``nn.Linear`` layers.

    Returns the base transformers model, ready for ``save_pretrained`` or generation. It works in
    place: ``model`` is unusable afterwards. ``into``: a fresh copy of the base model to fold into
    instead (``model`` stays usable; needed when ``model.base`` is a ``PrefixCachedLM``). An adapted
    ``lm_head`` tied to the input embedding is untied first so the embedding keeps its original weights.
    """
    target = model.base if into is None else into
    for path, (a, bc) in model.posterior_mean_layers(guide).items():
        module = target.get_submodule(path)
        linear = module.base if isinstance(module, MeLoRALinear) else module
        if linear.weight is target.get_input_embeddings().weight:
            linear.weight = nn.Parameter(linear.weight.detach().clone())
            target.config.tie_word_embeddings = False
        linear.weight.add_((model.config.scaling * (bc @ a)).to(linear.weight.dtype))
        parent_name, _, child = path.rpartition(".")
        setattr(target.get_submodule(parent_name) if parent_name else target, child, linear)
    return target
