"""Cloze task definitions: each dataset as (context, continuation) text pairs, after lm-evaluation-harness.

A task is data: a :class:`ClozeTemplate` says how an ``Example`` becomes K pairs ``(context_k,
continuation_k)``; the score of choice k is ``log p(continuation_k | context_k)``. The templates follow
the harness's task YAMLs (lm-eval 0.4: ``arc_easy.yaml``, ``openbookqa.yaml``, ``winogrande.yaml``,
``boolq.yaml``):

======================  ====================================================  =========================
dataset                 context                                               continuation
======================  ====================================================  =========================
ARC-E / ARC-C, MMLU,    ``"Question: {question}\\nAnswer:"``                   ``" {choice}"``
toy
OBQA                    ``"{question}"`` (the question stem)                  ``" {choice}"``
WinoGrande (partial)    the sentence up to ``_`` with option k filled in      ``" {rest after _}"``,
                                                                              the same for both options
BoolQ                   ``"{passage}\\nQuestion: {question}?\\nAnswer:"``       ``" yes"`` / ``" no"``
======================  ====================================================  =========================

MMLU differs from the harness, whose default MMLU task is lettered (``"A. ..."`` choices, ``" A"``
continuations); here it is scored like ARC, as the issue asks. Only ``{passage}`` is ever shortened
(by :mod:`melora_pyro.packing`, from its start); questions and continuations are never cut.
"""
from __future__ import annotations

from dataclasses import dataclass

from .data import DatasetError, Example

QUESTION_ANSWER = "Question: {question}\nAnswer:"


@dataclass(frozen=True)
class ClozeTemplate:
    """How one dataset's examples become (context, continuation) pairs.

    ``context`` is a format string over ``question`` and ``passage`` (``Example.context``);
    ``delimiter`` goes between context and choice text (the harness's ``target_delimiter``).
    ``partial``: WinoGrande's partial scoring, where the choice fills the blank ``_`` of the
    question and the rest of the sentence is the shared continuation (``context`` unused).
    """

    context: str = QUESTION_ANSWER
    delimiter: str = " "
    partial: bool = False

    def pairs(self, example: Example, passage: str | None = None) -> list[tuple[str, str]]:
        """The K ``(context, continuation)`` pairs of ``example``; ``passage`` replaces its passage
        (a shortened one). DatasetError for a partial-scoring sentence without a blank."""
        if self.partial:
            sentence = example.question
            blank = sentence.find("_")
            if blank < 0:
                raise DatasetError(f"example {example.uid!r}: WinoGrande sentence has no blank '_' to fill: "
                                   f"{sentence!r:.80}", example.uid)
            rest = self.delimiter + sentence[blank + 1:].strip()
            return [(sentence[:blank] + option, rest) for option in example.choices]
        context = self.context.format(question=example.question,
                                      passage=example.context if passage is None else passage)
        return [(context, self.delimiter + choice) for choice in example.choices]

    def has_passage(self) -> bool:
        return "{passage}" in self.context


_WINOGRANDE = ClozeTemplate(partial=True)
TEMPLATES: dict[str, ClozeTemplate] = {
    "arc-e": ClozeTemplate(), "arc-c": ClozeTemplate(),
    "mmlu-chem": ClozeTemplate(), "mmlu-phys": ClozeTemplate(),
    "toy": ClozeTemplate(),
    "obqa": ClozeTemplate(context="{question}"),
    "wg-s": _WINOGRANDE, "wg-m": _WINOGRANDE,
    "boolq": ClozeTemplate(context="{passage}\nQuestion: {question}?\nAnswer:"),
}


def template_for(dataset: str | None) -> ClozeTemplate:
    """The template of a ``data.DATASETS`` name; ``None`` (examples of no known dataset) is ARC's."""
    if dataset is None:
        return ClozeTemplate()
    if dataset not in TEMPLATES:
        raise ValueError(f"no cloze template for dataset {dataset!r}; known: {sorted(TEMPLATES)}")
    return TEMPLATES[dataset]
