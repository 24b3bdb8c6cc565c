"""The peft LoRA adapter format, both ways: Me-LoRA at its posterior mean out, a trained LoRA in.

A peft adapter directory holds ``adapter_config.json`` (``LoraConfig``) and
``adapter_model.safetensors`` with, for each adapted linear at module path ``P`` of the base model,
``base_model.model.P.lora_A.weight`` ``(r, n)`` and ``base_model.model.P.lora_B.weight`` ``(m, r)``;
peft computes ``W0 x + (lora_alpha / r) B A x``. Me-LoRA's ``W0 x + s B C A x`` at ``C = M`` is that
with ``lora_A = A`` and ``lora_B = B M``; a peft adapter read in gives ``A``, ``B`` and ``C``'s mean
at the identity, so the first forward is the adapter's own. Neither direction needs peft installed.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from .config import MeLoRAConfig
from .errors import ConfigError
from .io import CheckpointError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."
# LoraConfig fields that change what the adapter computes, with the value Me-LoRA's layer matches.
_PLAIN_LORA = {"peft_type": "LORA", "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
               "use_dora": False, "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None,
               "layers_to_transform": None, "lora_bias": False, "target_parameters": None,
               "trainable_token_indices": None}


def lora_key(path: str, which: str) -> str:
    """The safetensors key of ``which`` (``"A"`` or ``"B"``) of the linear at module path ``path``."""
    return f"{_PREFIX}{path}.lora_{which}.weight"


def peft_adapter_files(layers: dict[str, tuple[torch.Tensor, torch.Tensor]], config: MeLoRAConfig,
                       base_model_name: str | None = None) -> dict[str, bytes]:
    """``{file name: bytes}`` of a peft adapter directory.

    Args:
        layers: ``{module path: (lora_A (r, n), lora_B (m, r))}``, e.g. ``(A_l, B_l @ M_l)``.
        config: the adapter shape (rank, alpha, target modules, dropout).
        base_model_name: recorded as ``base_model_name_or_path`` (peft reads the base from it when asked).
    """
    lora_config = {**_PLAIN_LORA, "task_type": "CAUSAL_LM", "r": config.rank, "lora_alpha": config.alpha,
                   "target_modules": list(config.target_modules), "lora_dropout": config.dropout,
                   "init_lora_weights": True, "inference_mode": True,
                   "base_model_name_or_path": base_model_name}
    tensors = {}
    for path, (a, b) in layers.items():
        tensors[lora_key(path, "A")] = a.detach().float().contiguous().cpu()
        tensors[lora_key(path, "B")] = b.detach().float().contiguous().cpu()
    return {ADAPTER_CONFIG: json.dumps(lora_config, indent=2).encode("utf-8"), ADAPTER_WEIGHTS: save(tensors)}


def read_peft_config(adapter_dir, **config_fields) -> MeLoRAConfig:
    """The ``MeLoRAConfig`` of a peft LoRA adapter directory: its rank, alpha, target modules and
    dropout, and ``config_fields`` (prior, KL, ...) for the rest.

    Raises :class:`CheckpointError` for a missing or malformed directory, or an adapter that is not a
    plain LoRA (DoRA, rsLoRA, per-layer ranks, biases, extra trained modules: Me-LoRA's layer cannot
    compute them); ``ConfigError`` for ``config_fields`` that would change the adapter's shape.
    """
    adapter_dir = Path(adapter_dir)
    path = adapter_dir / ADAPTER_CONFIG
    if not path.is_file() or not (adapter_dir / ADAPTER_WEIGHTS).is_file():
        raise CheckpointError(f"{adapter_dir}: not a peft adapter directory (needs {ADAPTER_CONFIG} and "
                              f"{ADAPTER_WEIGHTS})")
    try:
        lora = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(lora, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(lora).__name__}")
    unsupported = [f"{k}={lora[k]!r:.40}" for k, plain in _PLAIN_LORA.items()
                   if k in lora and lora[k] != plain and not (plain is None and lora[k] in ([], {}))]
    if unsupported:
        raise CheckpointError(f"{path}: not a plain LoRA adapter, Me-LoRA cannot import {', '.join(unsupported)}")
    fixed = sorted(set(config_fields) & {"rank", "alpha", "target_modules", "dropout"})
    if fixed:
        raise ConfigError(f"{fixed} come from the peft adapter {adapter_dir}, they cannot be set as well")
    targets = lora.get("target_modules")
    if isinstance(targets, str):  # a regular expression: the adapted paths are read from the weights
        targets = [key[len(_PREFIX):-len(".lora_A.weight")] for key in _read_weights(adapter_dir)
                   if key.endswith(".lora_A.weight")]
    try:
        return MeLoRAConfig(rank=lora["r"], alpha=float(lora["lora_alpha"]), target_modules=tuple(sorted(targets)),
                            dropout=float(lora.get("lora_dropout", 0.0)), **config_fields)
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: not a usable LoRA config: {e!r}") from e


@torch.no_grad()
def load_peft_adapter(model, adapter_dir) -> None:
    """Copy a peft adapter's ``lora_A``, ``lora_B`` into ``model``'s A and B (a ``MeLoRAModel`` built
    with :func:`read_peft_config`'s config on the adapter's base model).

    Frozen base weights that peft saves beside the adapter (the embedding of a tied ``lm_head``) must
    equal the model's: anything else means the adapter was trained on another base. Raises
    :class:`CheckpointError` for missing, extra, misshapen or unsupported tensors.
    """
    adapter_dir = Path(adapter_dir)
    where = adapter_dir / ADAPTER_WEIGHTS
    own = model.lora_layers()
    found, unknown = {}, []
    for key, value in _read_weights(adapter_dir).items():
        name = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
        if name.endswith((".lora_A.weight", ".lora_B.weight")):
            found.setdefault(name[:-len(".lora_A.weight")], {})[name[-8]] = value
        elif name.endswith(".base_layer.weight"):
            _check_base_weight(model.base, name[:-len(".base_layer.weight")], value, where)
        else:
            unknown.append(name)
    if unknown:
        raise CheckpointError(f"{where}: tensors Me-LoRA cannot import: {unknown[:3]}")
    if sorted(found) != sorted(own):
        raise CheckpointError(f"{adapter_dir}: the adapter adapts {sorted(found)[:3]}..., the model's adapted "
                              f"layers are {sorted(own)[:3]}... ({len(found)} vs {len(own)})")
    for path, (a, b) in own.items():
        if set(found[path]) != {"A", "B"}:
            raise CheckpointError(f"{where}: {path} lacks lora_A or lora_B")
        for target, value, which in ((a, found[path]["A"], "A"), (b, found[path]["B"], "B")):
            if value.shape != target.shape:
                raise CheckpointError(f"{where}: {path} lora_{which} has shape {tuple(value.shape)}, "
                                      f"the model needs {tuple(target.shape)}")
            target.copy_(value)


def _check_base_weight(base_model, path: str, value: torch.Tensor, where: Path) -> None:
    try:
        module = base_model.get_submodule(path)
    except AttributeError:
        raise CheckpointError(f"{where}: {path}.base_layer.weight names no module of the base model") from None
    weight = getattr(module, "base", module).weight  # inside a MeLoRALinear: the frozen linear it wraps
    if value.shape != weight.shape or not torch.allclose(value.to(weight), weight):
        raise CheckpointError(f"{where}: {path}.base_layer.weight differs from the base model's: "
                              f"the adapter was trained on another base model")


def _read_weights(adapter_dir: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(adapter_dir / ADAPTER_WEIGHTS)
    except Exception as e:  # safetensors raises its own error types for a damaged file
        raise CheckpointError(f"{adapter_dir / ADAPTER_WEIGHTS}: unreadable safetensors file: {e}") from e
