"""``PrefixCachedLM``: a LLaMA-style causal LM whose lowest decoder layers are frozen and cached.

With adapters on the top k of L decoder layers (plus ``lm_head``), the hidden states entering layer
``split = L - k`` depend only on the input row, never on the adapters. They are computed once per
distinct row (without gradients) and reused by every training step and every posterior sample, so
N samples cost about ``1 + N k / L`` forwards. A row is keyed by what its states depend on: its
tokens, and for packed cloze rows their segments (positions and the block mask follow from them);
a left-padded (letter) row by its tokens alone, since rotary attention sees only position
differences. Padding never enters a key, so a row is found again in any batch.

The cache is a dict ``{sha1 of the key: (len, hidden) tensor}``; :meth:`PrefixCachedLM.save` /
:meth:`load` keep it on disk as safetensors, in a file named by model, dtype and split
(:func:`cache_path`). :meth:`warm` fills it eagerly from batches (length-sorted by the caller).
"""
from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import load_file, save
from torch import nn

from ._atomic import atomic_write_bytes
from .errors import ConfigError
from .layers import MeLoRALinear
from .readouts import block_attention_mask


class PrefixCachedLM(nn.Module):
    """``lm`` with decoder layers ``0..split-1`` computed once per row and cached.

    Attribute paths mirror ``LlamaForCausalLM`` (``model.layers.i...``, ``lm_head``) so adapter targets
    match; adapters below ``split`` are refused. ``hidden_states(input_ids, attention_mask,
    position_ids, segment_ids)`` returns ``(b, T, hidden)`` (what :func:`readouts.hidden_states`
    asks for); ``forward`` adds ``lm_head`` on the last ``logits_to_keep`` positions.
    """

    def __init__(self, lm: nn.Module, split: int, cache: dict | None = None):
        super().__init__()
        layers = len(lm.model.layers)
        if not 0 < split < layers:
            raise ConfigError(f"the prefix cache split must lie in 1..{layers - 1} (decoder layers below the "
                              f"adapted ones), got {split}")
        self.model, self.lm_head, self.config = lm.model, lm.lm_head, lm.config
        self.split = split
        self.cache = {} if cache is None else cache

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, logits_to_keep: int = 0, use_cache: bool = False,
                segment_ids: torch.Tensor | None = None):
        from transformers.modeling_outputs import CausalLMOutputWithPast

        states = self.hidden_states(input_ids, attention_mask, position_ids, segment_ids)
        states = states[:, -logits_to_keep:] if logits_to_keep else states
        return CausalLMOutputWithPast(logits=self.lm_head(states))

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      position_ids: torch.Tensor | None = None, segment_ids: torch.Tensor | None = None
                      ) -> torch.Tensor:
        """Final hidden states ``(b, T, hidden)``: cached bottom layers, then the top ones.

        Packed cloze rows pass ``segment_ids`` (and their 4-D mask and position ids); left-padded
        rows a ``(b, T)`` mask.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.prefix_states(input_ids, attention_mask, position_ids, segment_ids)
        top = nn.ModuleList(list(self.model.layers)[self.split:])
        with _swapped(self.model, layers=top):
            out = self.model(inputs_embeds=hidden, attention_mask=attention_mask, position_ids=position_ids,
                             use_cache=False)
        return out.last_hidden_state

    @torch.no_grad()
    def prefix_states(self, input_ids, attention_mask, position_ids=None, segment_ids=None) -> torch.Tensor:
        """Hidden states ``(b, T, hidden)`` entering layer ``split`` (zeros at padding), from the cache."""
        bottom = nn.ModuleList(list(self.model.layers)[:self.split])
        if any(isinstance(m, MeLoRALinear) for m in bottom.modules()):
            raise ConfigError(f"PrefixCachedLM: adapters below layer {self.split} cannot be cached")
        packed = segment_ids is not None
        lengths = (segment_ids >= 0).sum(1) if packed else attention_mask.sum(1)
        keys = [_key(row, seg, int(n), packed) for row, seg, n in
                zip(input_ids, segment_ids if packed else input_ids, lengths)]
        missing = [i for i, key in enumerate(keys) if key not in self.cache]
        if missing:
            index = torch.tensor(missing, device=input_ids.device)
            if packed:
                mask = block_attention_mask(segment_ids[index], self.model.embed_tokens.weight.dtype)
            else:
                mask = attention_mask[index]
            with _swapped(self.model, layers=bottom, norm=nn.Identity()):
                states = self.model(input_ids=input_ids[index], attention_mask=mask,
                                    position_ids=None if position_ids is None else position_ids[index],
                                    use_cache=False).last_hidden_state
            for row, i in enumerate(missing):
                self.cache[keys[i]] = _strip(states[row], int(lengths[i]), packed).clone()
        width = input_ids.shape[1]
        hidden = torch.zeros(len(keys), width, self.config.hidden_size, dtype=self.model.embed_tokens.weight.dtype,
                             device=input_ids.device)
        for i, key in enumerate(keys):
            n = int(lengths[i])
            if packed:  # right padding: the row is the first n positions
                hidden[i, :n] = self.cache[key]
            else:       # left padding: the last n
                hidden[i, width - n:] = self.cache[key]
        return hidden

    def warm(self, batches: Iterable[dict]) -> int:
        """Fill the cache from ``batches`` (dicts with ``input_ids``, ``attention_mask`` and, packed,
        ``position_ids`` / ``segment_ids``); returns how many rows were added."""
        before = len(self.cache)
        for batch in batches:
            self.prefix_states(batch["input_ids"], batch["attention_mask"], batch.get("position_ids"),
                               batch.get("segment_ids"))
        return len(self.cache) - before

    def save(self, path) -> None:
        """Write the cache to ``path`` (safetensors, atomically)."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(Path(path), save({k: v.contiguous() for k, v in self.cache.items()},
                                            metadata={"split": str(self.split)}))

    def load(self, path) -> int:
        """Add the rows saved at ``path`` (if the file exists); returns how many were read."""
        path = Path(path)
        if not path.is_file():
            return 0
        tensors = load_file(path)
        dtype = self.model.embed_tokens.weight.dtype
        device = self.model.embed_tokens.weight.device
        self.cache.update({k: v.to(device=device, dtype=dtype) for k, v in tensors.items()})
        return len(tensors)


def cache_path(cache_dir, model_name: str, dtype: str, split: int) -> Path:
    """Where the prefix cache of (model, dtype, split) lives under ``cache_dir``: the file name holds
    the model's name and a digest of its full path or hub id, so two models never share a file."""
    local = Path(str(model_name))
    ident = str(local.resolve()) if local.exists() else str(model_name)
    digest = hashlib.sha1(ident.encode()).hexdigest()[:10]
    return Path(cache_dir) / "prefix-cache" / f"{local.name or 'model'}-{digest}-{dtype}-split{split}.safetensors"


def _key(tokens: torch.Tensor, segments: torch.Tensor, n: int, packed: bool) -> str:
    if packed:
        data = torch.stack([tokens[:n], segments[:n]]).cpu().numpy().tobytes()
    else:
        data = tokens[tokens.shape[0] - n:].cpu().numpy().tobytes()
    return hashlib.sha1(data + (b"p" if packed else b"l")).hexdigest()


def _strip(states: torch.Tensor, n: int, packed: bool) -> torch.Tensor:
    return states[:n] if packed else states[states.shape[0] - n:]


@contextlib.contextmanager
def _swapped(module: nn.Module, **children: nn.Module):
    """Temporarily replace child modules of ``module``."""
    saved = {name: getattr(module, name) for name in children}
    for name, child in children.items():
        setattr(module, name, child)
    try:
        yield module
    finally:
        for name, child in saved.items():
            setattr(module, name, child)


def top_layer_targets(target_modules, num_layers: int, top: int) -> tuple[str, ...]:
    """``target_modules`` restricted to decoder layers ``num_layers - top .. num_layers - 1``.

    A name such as ``"q_proj"`` becomes the paths ``model.layers.i.self_attn.q_proj`` of the top
    layers (found by suffix when the model is injected); ``lm_head`` and other non-layer names stay.
    """
    if not 1 <= top < num_layers:
        raise ConfigError(f"adapt_top_layers must lie in 1..{num_layers - 1} for a model with {num_layers} "
                          f"decoder layers, got {top}")
    paths = []
    for target in target_modules:
        if target.startswith("model.layers."):
            layer = int(target.split(".")[2])
            if layer < num_layers - top:
                raise ConfigError(f"target {target!r} lies below the top {top} layers (adapt_top_layers)")
            paths.append(target)
        elif target in ("lm_head", "model.norm", "model.embed_tokens"):
            paths.append(target)
        else:
            paths += [f"model.layers.{i}.{_SUBMODULE.get(target, '')}{target}"
                      for i in range(num_layers - top, num_layers)]
    return tuple(paths)


_SUBMODULE = {"q_proj": "self_attn.", "k_proj": "self_attn.", "v_proj": "self_attn.", "o_proj": "self_attn.",
              "gate_proj": "mlp.", "up_proj": "mlp.", "down_proj": "mlp."}
