"""Readouts: how the K answer scores ``(batch, K)`` are read from a causal LM.

A readout is a small callable ``readout(lm, input_ids, attention_mask, **inputs) -> (batch, K)``
whose result is turned into ``probs = softmax(scores)`` by the model. It sees the language model only
through its forward (``logits_to_keep``), :func:`hidden_states` and ``lm.get_output_embeddings()``, so
the same readout serves a plain transformers model, one carrying Me-LoRA adapters, and a
:class:`melora_pyro.prefix_cache.PrefixCachedLM`.

- :class:`LetterReadout` (BLoB's protocol): the prompt lists lettered choices and ends with
  ``"Answer:"``; scores are the next-token logits of the K label tokens (``" A"``, ``" B"``, ...).
- :class:`ClozeReadout` (lm-evaluation-harness's multiple choice): each choice's text is a
  continuation of a context; scores are log p(continuation | context), normalised by ``sum`` (the
  harness's ``acc``), ``char`` (per character of the choice, its ``acc_norm``) or ``token`` (per token).
  The batch is packed (``melora_pyro.packing``): a question's shared context once, its K continuations
  after it, a block attention mask, and only the positions that predict continuation tokens go
  through ``lm_head``.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

NORMALIZATIONS = ("sum", "char", "token")
SCORINGS = ("letter", "cloze")


def hidden_states(lm: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                  position_ids: torch.Tensor | None = None, segment_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Final hidden states ``(b, T, hidden)`` of a causal LM (after its last norm, before ``lm_head``).

    ``attention_mask`` is ``(b, T)`` (1 on tokens) or an additive ``(b, 1, T, T)`` float mask (then
    ``segment_ids`` ``(b, T)`` say which packed segment each token is in). A model with its own
    ``hidden_states`` method (the prefix cache, which keys rows by segments) is asked directly.
    """
    own = getattr(lm, "hidden_states", None)
    if callable(own):
        return own(input_ids, attention_mask, position_ids, segment_ids)
    out = lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                           use_cache=False)
    return out.last_hidden_state


class LetterReadout:
    """Next-token logits of the K label tokens at the last position: ``(b, K)``.

    Inputs are left-padded prompts (``melora_pyro.data.encode``). ``label_token_ids``: K distinct ids.
    """

    kind = "letter"

    def __init__(self, label_token_ids: Sequence[int]):
        self.label_token_ids = [int(i) for i in label_token_ids]
        self._index: dict[torch.device, torch.Tensor] = {}  # device copies, made once

    @property
    def num_labels(self) -> int:
        return len(self.label_token_ids)

    def __call__(self, lm: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 **_) -> torch.Tensor:
        logits = lm(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=1, use_cache=False).logits[:, -1]
        device = logits.device
        if device not in self._index:
            self._index[device] = torch.tensor(self.label_token_ids, device=device)
        return logits.index_select(-1, self._index[device]).float()

    def to_dict(self) -> dict:
        return {"kind": self.kind, "label_token_ids": self.label_token_ids}


class ClozeReadout:
    """Normalised log-likelihood of each choice's continuation: ``(b, K)``, ``-inf`` for absent choices.

    Inputs (``melora_pyro.packing.pack_batch``): ``input_ids`` / ``segment_ids`` / ``position_ids``
    ``(b, T)`` (segment -1 padding, 0 the shared context, k + 1 choice k's own tokens),
    ``score_positions`` / ``score_targets`` / ``score_choice`` ``(b, P)`` (the position whose output
    predicts target token ``score_targets``, its choice, -1 for padding) and ``choice_tokens`` /
    ``choice_chars`` ``(b, K)`` (the normalisers).
    """

    kind = "cloze"

    def __init__(self, normalization: str = "token"):
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
        self.normalization = normalization

    def __call__(self, lm: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 segment_ids: torch.Tensor, position_ids: torch.Tensor, score_positions: torch.Tensor,
                 score_targets: torch.Tensor, score_choice: torch.Tensor, choice_tokens: torch.Tensor,
                 choice_chars: torch.Tensor, **_) -> torch.Tensor:
        dtype = next(lm.get_output_embeddings().parameters()).dtype
        mask = block_attention_mask(segment_ids, dtype)
        states = hidden_states(lm, input_ids, mask, position_ids, segment_ids)
        picked = states.gather(1, score_positions.clamp(min=0)[..., None].expand(-1, -1, states.shape[-1]))
        token_logp = lm.get_output_embeddings()(picked).float().log_softmax(-1)
        token_logp = token_logp.gather(-1, score_targets[..., None])[..., 0]          # (b, P)
        valid = score_choice >= 0
        total = torch.zeros(choice_tokens.shape, dtype=token_logp.dtype, device=token_logp.device)
        total = total.scatter_add(1, score_choice.clamp(min=0), token_logp * valid)
        return self.normalize(total, choice_tokens, choice_chars)

    def normalize(self, total: torch.Tensor, choice_tokens: torch.Tensor, choice_chars: torch.Tensor) -> torch.Tensor:
        """``total`` log-likelihoods ``(b, K)`` divided as ``self.normalization`` says; absent choices -inf."""
        present = choice_tokens > 0
        if self.normalization == "char":
            total = total / choice_chars.clamp(min=1)
        elif self.normalization == "token":
            total = total / choice_tokens.clamp(min=1)
        return total.masked_fill(~present, float("-inf"))

    def to_dict(self) -> dict:
        return {"kind": self.kind, "normalization": self.normalization}


def block_attention_mask(segment_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask ``(b, 1, T, T)`` of a packed row: position i sees j <= i when j is in the shared
    context (segment 0) or in i's own segment; padding (segment -1) is seen by nobody."""
    seg_i, seg_j = segment_ids[:, :, None], segment_ids[:, None, :]
    T = segment_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=segment_ids.device).tril()
    allowed = causal & (seg_j >= 0) & ((seg_j == 0) | (seg_j == seg_i))
    allowed = allowed | torch.eye(T, dtype=torch.bool, device=segment_ids.device)  # no empty row
    mask = torch.zeros(allowed.shape, dtype=dtype, device=segment_ids.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def readout_from_dict(d: dict):
    """Rebuild a readout from its ``to_dict()`` (as stored in checkpoints)."""
    if not isinstance(d, dict) or d.get("kind") not in SCORINGS:
        raise ValueError(f"readout must be a table with kind in {SCORINGS}, got {d!r:.80}")
    if d["kind"] == "letter":
        return LetterReadout(d["label_token_ids"])
    return ClozeReadout(d.get("normalization", "token"))


def as_readout(readout_or_label_ids):
    """A readout object; a sequence of token ids means ``LetterReadout(ids)`` (the historical API)."""
    if isinstance(readout_or_label_ids, (LetterReadout, ClozeReadout)) or callable(readout_or_label_ids):
        return readout_or_label_ids
    return LetterReadout(readout_or_label_ids)


STANDARD_INPUTS = ("input_ids", "attention_mask", "labels", "choice_mask")


def readout_inputs(batch: dict) -> dict:
    """The batch tensors a readout takes beyond ``STANDARD_INPUTS`` (the packed cloze layout)."""
    return {k: v for k, v in batch.items() if k not in STANDARD_INPUTS}
