"""Packed cloze sequences: a question's context once, then its K continuations, in one row.

For choice k the tokens are ``context_k + continuation_k`` (tokenised as lm-evaluation-harness does:
the context's trailing spaces move to the continuation, the continuation's tokens are those of the
whole string after the context's). The longest token prefix shared by all K contexts is stored once
(segment 0); after it come K segments, ``context_k``'s remaining tokens then ``continuation_k``
(segment k + 1). Each segment sees the shared prefix and itself (:func:`readouts.block_attention_mask`),
and its position ids continue the prefix's, so every token is scored exactly as in its own unpacked
sequence. ARC-style questions share the whole context; WinoGrande's share the sentence up to the blank.

A row too long for ``max_length`` loses words from the *start* of its passage (BoolQ); a question
whose row does not fit even without the passage raises :class:`DatasetError`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from .cloze import ClozeTemplate
from .data import DatasetError, Example, _bos_prefix, _longest_fitting


@dataclass(frozen=True)
class PackedExample:
    """One packed question (lists of Python ints, unpadded).

    ``tokens`` / ``segments`` / ``positions``: the row (length T). ``score_positions[i]`` predicts
    ``score_targets[i]``, a token of choice ``score_choice[i]``. ``choice_tokens[k]`` and
    ``choice_chars[k]``: continuation length in tokens and the choice text's length in characters.
    """

    tokens: tuple[int, ...]
    segments: tuple[int, ...]
    positions: tuple[int, ...]
    score_positions: tuple[int, ...]
    score_targets: tuple[int, ...]
    score_choice: tuple[int, ...]
    choice_tokens: tuple[int, ...]
    choice_chars: tuple[int, ...]
    label: int
    uid: str = ""

    @property
    def key(self) -> tuple:
        """What the hidden states of the row depend on: its tokens and their segments."""
        return self.tokens, self.segments


def encode_pair(tokenizer, context: str, continuation: str, bos: list[int]) -> tuple[list[int], list[int]]:
    """``(context_ids, continuation_ids)`` as lm-evaluation-harness's ``_encode_pair`` makes them."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    return bos + context_ids, whole[len(context_ids):]


def pack_example(tokenizer, example: Example, template: ClozeTemplate, max_length: int,
                 bos: list[int] | None = None) -> PackedExample:
    """Pack ``example`` under ``template`` into at most ``max_length`` tokens (see the module docstring).

    DatasetError (naming the example) for a continuation that tokenises to nothing, two choices with
    the same context and continuation, or a row that cannot fit even without its passage.
    """
    bos = _bos_prefix(tokenizer) if bos is None else bos
    packed = _pack(tokenizer, example, template, bos, None)
    if len(packed.tokens) <= max_length:
        return packed
    if template.has_passage() and example.context:
        starts = [m.start() for m in re.finditer(r"\S+", example.context)]

        def keep(n):  # the passage's last n words
            return example.context[starts[-n]:] if n else ""
        kept = _longest_fitting(lambda n: len(_pack(tokenizer, example, template, bos, keep(n)).tokens)
                                <= max_length, len(starts))
        if kept is not None:
            return _pack(tokenizer, example, template, bos, keep(kept))
        packed = _pack(tokenizer, example, template, bos, "")
    raise DatasetError(f"example {example.uid!r}: its context and {len(example.choices)} continuations take "
                       f"{len(packed.tokens)} tokens packed{' without the passage' if template.has_passage() else ''}, "
                       f"more than max_length={max_length}; raise max_length to at least {len(packed.tokens)}",
                       example.uid)


def _pack(tokenizer, example: Example, template: ClozeTemplate, bos: list[int], passage: str | None) -> PackedExample:
    pairs = template.pairs(example, passage)
    encoded = [encode_pair(tokenizer, c, x, bos) for c, x in pairs]
    seen = {}
    for k, ((context, continuation), (_, ids)) in enumerate(zip(pairs, encoded)):
        if not ids:
            raise DatasetError(f"example {example.uid!r}: choice {k} ({example.choices[k]!r:.40}) tokenises to "
                               f"no continuation tokens", example.uid)
        if (context, continuation) in seen:
            raise DatasetError(f"example {example.uid!r}: choices {seen[context, continuation]} and {k} have the "
                               f"same context and continuation {continuation!r:.40}; their scores would be equal",
                               example.uid)
        seen[context, continuation] = k
    shared = _common_prefix_length([ctx for ctx, _ in encoded])
    tokens, segments = list(encoded[0][0][:shared]), [0] * shared
    positions = list(range(shared))
    score_positions, score_targets, score_choice = [], [], []
    for k, (context, continuation) in enumerate(encoded):
        start = len(tokens)
        own = context[shared:] + continuation
        tokens += own
        segments += [k + 1] * len(own)
        positions += range(shared, shared + len(own))
        for j, target in enumerate(continuation):
            unpacked = len(context) + j - 1  # the position predicting continuation token j
            score_positions.append(unpacked if unpacked < shared else start + unpacked - shared)
            score_targets.append(target)
            score_choice.append(k)
    if score_positions and min(score_positions) < 0:
        raise DatasetError(f"example {example.uid!r}: an empty context leaves nothing to predict the first "
                           f"continuation token from", example.uid)
    return PackedExample(tuple(tokens), tuple(segments), tuple(positions), tuple(score_positions),
                         tuple(score_targets), tuple(score_choice), tuple(len(c) for _, c in encoded),
                         tuple(len(choice) for choice in example.choices), example.label, example.uid)


def _common_prefix_length(sequences: list[list[int]]) -> int:
    n = min(len(s) for s in sequences)
    for i in range(n):
        if any(s[i] != sequences[0][i] for s in sequences[1:]):
            return i
    return n


def pack_batch(rows: list[PackedExample], num_labels: int, pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded tensors of packed rows, the inputs of ``readouts.ClozeReadout``.

    Returns ``input_ids``, ``segment_ids`` (-1 on padding), ``position_ids``, ``attention_mask``
    (1 on tokens) ``(b, T)``; ``score_positions``, ``score_targets``, ``score_choice`` (-1 on padding)
    ``(b, P)``; ``choice_tokens``, ``choice_chars`` ``(b, K)`` (0 for absent choices);
    ``choice_mask`` ``(b, K)`` bool and ``labels`` ``(b,)``. K is ``num_labels``.
    """
    if not rows:
        raise ValueError("pack_batch needs at least one row")
    T = max(len(r.tokens) for r in rows)
    P = max(len(r.score_positions) for r in rows)

    def padded(values, width, fill):
        return torch.tensor([list(v) + [fill] * (width - len(v)) for v in values], dtype=torch.long)

    choice_tokens = padded([r.choice_tokens for r in rows], num_labels, 0)
    return {
        "input_ids": padded([r.tokens for r in rows], T, pad_id),
        "segment_ids": padded([r.segments for r in rows], T, -1),
        "position_ids": padded([r.positions for r in rows], T, 0),
        "attention_mask": padded([[1] * len(r.tokens) for r in rows], T, 0),
        "score_positions": padded([r.score_positions for r in rows], P, 0),
        "score_targets": padded([r.score_targets for r in rows], P, 0),
        "score_choice": padded([r.score_choice for r in rows], P, -1),
        "choice_tokens": choice_tokens,
        "choice_chars": padded([r.choice_chars for r in rows], num_labels, 0),
        "choice_mask": choice_tokens > 0,
        "labels": torch.tensor([r.label for r in rows], dtype=torch.long),
    }


def cloze_batch(tokenizer, examples: list[Example], dataset: str | None = None, num_labels: int | None = None,
                max_length: int = 256) -> dict[str, torch.Tensor]:
    """``pack_batch`` of ``examples`` under ``dataset``'s template (``cloze.TEMPLATES``; None: ARC's).

    The batch is the model's keyword arguments: ``svi.step(**batch, num_data=N)``,
    ``predict_proba(model, guide, **batch)``. K is ``num_labels`` (default: the most choices).
    """
    from .cloze import template_for

    template, bos = template_for(dataset), _bos_prefix(tokenizer)
    rows = [pack_example(tokenizer, ex, template, max_length, bos) for ex in examples]
    pad = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
    return pack_batch(rows, num_labels or max(len(ex.choices) for ex in examples), pad)
