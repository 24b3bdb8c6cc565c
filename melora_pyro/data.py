"""Benchmark data: loaders for the BLoB / Me-LoRA datasets, prompts, and batch encoding.

Every dataset becomes a list of ``Example`` (question, lettered choices, index of the right one). A
prompt (DESIGN.md section 5) lists the choices under letters and ends with ``"Answer:"``; the model's
prediction is its next-token distribution restricted to the label tokens ``" A"``, ``" B"``, ...

Data come from a local directory laid out like ``shared/data`` (see ``DATASETS`` for the files) or,
when no directory is given, from the Hugging Face hub. Bad local data raise ``DatasetError`` naming the
file, the line and what was expected; no row is ever dropped silently.
"""

from __future__ import annotations

import csv
import io
import json
import random
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from melora_pyro.errors import MeLoRAError
from melora_pyro.toy_task import toy_rows

LABEL_LETTERS = "ABCDEFGH"
MMLU_HEADER = ("question", "choice0", "choice1", "choice2", "choice3", "answer")
BOOLQ_TRAIN_FRACTION = 0.8
BOOLQ_OFFLINE_NOTE = (
    "BoolQ offline: the public train split is not available offline, so train/test are a seeded "
    "80/20 split of the 3,270-row validation file (boolq/val.jsonl); the hub path uses the real splits."
)

_DIGIT_LABELS = {str(k + 1): letter for k, letter in enumerate(LABEL_LETTERS)}  # ARC's "1".."8"


class DatasetError(MeLoRAError):
    """Bad benchmark data. The message names the file, the 1-based line (or row) and what was expected.

    ``source`` is the file (or hub split) and ``line`` the 1-based line or row, or None when the
    problem is the file as a whole (e.g. a missing file).
    """

    def __init__(self, message: str, source: str = "", line: int | None = None):
        super().__init__(message)
        self.source = source
        self.line = line


@dataclass(frozen=True)
class Example:
    """One multiple-choice question; ``label`` is the 0-based index of the right choice."""

    question: str
    choices: tuple[str, ...]
    label: int
    context: str = ""
    uid: str = ""

    def __post_init__(self):
        if not 0 <= self.label < len(self.choices):
            raise ValueError(f"example {self.uid!r}: label {self.label} outside 0..{len(self.choices) - 1}")


@dataclass(frozen=True)
class _Loc:
    """Where a row comes from: ``source`` (file relative to the data dir, or hub split) and its line."""

    source: str
    line: int
    unit: str = "line"

    def error(self, what: str) -> DatasetError:
        return DatasetError(f"{self.source} {self.unit} {self.line}: {what}", self.source, self.line)


# ---------------------------------------------------------------------------------------------------
# Field access and validation shared by the row parsers


def _get(row: Mapping, key: str, kind: type, loc: _Loc, prefix: str = ""):
    """``row[key]``, which must exist and be a ``kind`` (bool is not accepted as int)."""
    if key not in row:
        raise loc.error(f"missing field {prefix + key!r}")
    value = row[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise loc.error(f"field {prefix + key!r} should be {kind.__name__}, got {type(value).__name__} {value!r:.60}")
    if isinstance(value, str):  # JSON may escape a lone surrogate ("\ud800"): no tokenizer takes it
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:
            raise loc.error(f"field {prefix + key!r} is not valid text ({err.reason} at character {err.start})") from None
    return value


def _check_text(text: str, what: str, loc: _Loc) -> str:
    """``text``, which must hold more than whitespace."""
    if not text.strip():
        raise loc.error(f"{what} is empty")
    return text


def _example(question: str, choices: list[str], label: int, loc: _Loc, context: str = "", uid: str = "") -> Example:
    """An Example after validating its choices: 2..8 of them, none empty, the right one's text unique.

    A repeated wrong choice is kept: the label stays unambiguous, and OpenBookQA's train file has three
    such rows (lines 1456, 2747, 2806). A repeated right choice is an error.
    """
    if len(choices) < 2:
        raise loc.error(f"{len(choices)} choice(s), expected at least 2")
    if len(choices) > len(LABEL_LETTERS):
        raise loc.error(f"{len(choices)} choices, more than the {len(LABEL_LETTERS)} label letters {LABEL_LETTERS}")
    for k, text in enumerate(choices):
        _check_text(text, f"choice {k}", loc)
    twins = [k for k, text in enumerate(choices) if k != label and text.strip() == choices[label].strip()]
    if twins:
        raise loc.error(f"the right choice {label} and choice {twins[0]} have the same text {choices[label]!r}")
    return Example(question, tuple(choices), label, context=context, uid=uid)


# ---------------------------------------------------------------------------------------------------
# Row parsers: one per file layout, each turning a decoded row into an Example or raising DatasetError


def _parse_arc(row: Mapping, loc: _Loc) -> Example:
    """ARC / OpenBookQA row: ``id``, ``question.stem``, ``question.choices[{text,label}]``, ``answerKey``.

    Choice labels "1".."8" are read as "A".."H" (they index the choices the same way).
    """
    uid = _get(row, "id", str, loc)
    question = _get(row, "question", dict, loc)
    stem = _check_text(_get(question, "stem", str, loc, "question."), "question.stem", loc)
    raw_choices = _get(question, "choices", list, loc, "question.")
    texts, labels = [], []
    for k, choice in enumerate(raw_choices):
        if not isinstance(choice, dict):
            raise loc.error(f"question.choices[{k}] should be an object with text and label, got {choice!r:.60}")
        texts.append(_get(choice, "text", str, loc, f"question.choices[{k}]."))
        labels.append(_get(choice, "label", str, loc, f"question.choices[{k}]."))
    answer = _get(row, "answerKey", str, loc)
    letters = [_DIGIT_LABELS.get(label, label) for label in labels]
    if len(set(letters)) != len(letters):
        raise loc.error(f"duplicate choice labels {labels}")
    key = _DIGIT_LABELS.get(answer, answer)
    if key not in letters:
        raise loc.error(f"answerKey {answer!r} is not one of the choice labels {labels}")
    return _example(stem, texts, letters.index(key), loc, uid=uid)


def _parse_winogrande(row: Mapping, loc: _Loc) -> Example:
    """WinoGrande row: ``qID``, ``sentence`` (blank "_"), ``option1``, ``option2``, ``answer`` "1"/"2"."""
    uid = _get(row, "qID", str, loc)
    sentence = _check_text(_get(row, "sentence", str, loc), "sentence", loc)
    options = [_get(row, "option1", str, loc), _get(row, "option2", str, loc)]
    answer = _get(row, "answer", str, loc)
    if answer not in ("1", "2"):
        raise loc.error(f"answer {answer!r} is not '1' or '2'")
    return _example(sentence, options, int(answer) - 1, loc, uid=uid)


def _parse_boolq(row: Mapping, loc: _Loc) -> Example:
    """BoolQ row: ``question``, ``passage``, ``idx`` (int), ``label`` (bool); choices ("yes", "no")."""
    question = _check_text(_get(row, "question", str, loc), "question", loc)
    passage = _get(row, "passage", str, loc)
    uid = str(_get(row, "idx", int, loc))
    answer = _get(row, "label", bool, loc)
    return _example(question, ["yes", "no"], 0 if answer else 1, loc, context=passage, uid=uid)


def _parse_mmlu(row: Mapping, loc: _Loc) -> Example:
    """MMLU row with the fields of ``MMLU_HEADER`` (all strings), answer "0".."3"."""
    question = _check_text(_get(row, "question", str, loc), "question", loc)
    choices = [_get(row, f"choice{k}", str, loc) for k in range(4)]
    answer = _get(row, "answer", str, loc)
    if answer not in ("0", "1", "2", "3"):
        raise loc.error(f"answer {answer!r} is not one of 0, 1, 2, 3")
    return _example(question, choices, int(answer), loc, uid=f"{loc.source}#{loc.line}")


def without_repeated_choices(example: Example) -> Example:
    """``example`` with a repeated wrong choice kept once (the label re-indexed); itself if none repeats."""
    kept = [k for k, text in enumerate(example.choices)
            if all(text.strip() != example.choices[j].strip() for j in range(k))]
    if len(kept) == len(example.choices):
        return example
    return replace(example, choices=tuple(example.choices[k] for k in kept), label=kept.index(example.label))


# ---------------------------------------------------------------------------------------------------
# Hub rows -> the local row layout, so that one parser validates both


def _arc_from_hub(row: Mapping, index: int) -> dict:
    """allenai/ai2_arc row (``question`` str, ``choices`` {text: [...], label: [...]})."""
    choices = [{"text": t, "label": l} for t, l in zip(row["choices"]["text"], row["choices"]["label"])]
    return {"id": row["id"], "question": {"stem": row["question"], "choices": choices}, "answerKey": row["answerKey"]}


def _obqa_from_hub(row: Mapping, index: int) -> dict:
    """allenai/openbookqa ``main`` row (``question_stem``; ``choices`` as in ARC)."""
    return _arc_from_hub({**row, "question": row["question_stem"]}, index)


def _winogrande_from_hub(row: Mapping, index: int) -> dict:
    """allenai/winogrande row (the local fields without ``qID``): the row index becomes the id."""
    return {**row, "qID": str(index)}


def _boolq_from_hub(row: Mapping, index: int) -> dict:
    """google/boolq row (``question``, ``answer`` bool, ``passage``; no index field)."""
    return {"question": row["question"], "passage": row["passage"], "idx": index, "label": row["answer"]}


def _mmlu_from_hub(row: Mapping, index: int) -> dict:
    """cais/mmlu row (``question``, ``choices`` list of 4, ``answer`` int 0-3)."""
    return {"question": row["question"], **{f"choice{k}": c for k, c in enumerate(row["choices"])},
            "answer": str(row["answer"])}


# ---------------------------------------------------------------------------------------------------
# The registry


@dataclass(frozen=True)
class DatasetSpec:
    """How to load one dataset.

    ``files`` maps each split to its file under the data dir (JSONL, or CSV with ``MMLU_HEADER``);
    ``parse`` turns one row of it into an Example. ``hub`` is ``(path, config)`` for
    ``datasets.load_dataset``, ``hub_splits`` maps our split names to the hub's, and ``from_hub`` turns
    a hub row into the local row layout. ``holdout``: offline, train and test are a seeded 80/20 split
    of the one file that both map to (BoolQ). ``embedded``: the dataset is generated in code.
    """

    splits: tuple[str, ...]
    files: Mapping[str, str] = field(default_factory=dict)
    parse: Callable[[Mapping, _Loc], Example] | None = None
    hub: tuple[str, str | None] = ("", None)
    hub_splits: Mapping[str, str] = field(default_factory=dict)
    from_hub: Callable[[Mapping, int], Mapping] | None = None
    holdout: bool = False
    embedded: Callable[[str], list[dict]] | None = None


def _arc(config: str) -> DatasetSpec:
    stem = f"arc/{config}/{config}"
    return DatasetSpec(
        splits=("train", "validation", "test"),
        files={"train": f"{stem}-Train.jsonl", "validation": f"{stem}-Dev.jsonl", "test": f"{stem}-Test.jsonl"},
        parse=_parse_arc, hub=("allenai/ai2_arc", config),
        hub_splits={"train": "train", "validation": "validation", "test": "test"}, from_hub=_arc_from_hub)


def _winogrande(size: str) -> DatasetSpec:
    return DatasetSpec(
        splits=("train", "test"),
        files={"train": f"winogrande/train_{size}.jsonl", "test": "winogrande/dev.jsonl"},
        parse=_parse_winogrande, hub=("allenai/winogrande", f"winogrande_{size}"),
        hub_splits={"train": "train", "test": "validation"}, from_hub=_winogrande_from_hub)


def _mmlu(subject: str) -> DatasetSpec:
    return DatasetSpec(
        splits=("train", "test"),
        files={"train": f"mmlu/{subject}_dev.csv", "test": f"mmlu/{subject}_test.csv"},
        parse=_parse_mmlu, hub=("cais/mmlu", subject),
        hub_splits={"train": "dev", "test": "test"}, from_hub=_mmlu_from_hub)


DATASETS: dict[str, DatasetSpec] = {
    "wg-s": _winogrande("s"),
    "wg-m": _winogrande("m"),
    "arc-c": _arc("ARC-Challenge"),
    "arc-e": _arc("ARC-Easy"),
    "obqa": DatasetSpec(
        splits=("train", "validation", "test"),
        files={"train": "obqa/OpenBookQA_train.jsonl", "validation": "obqa/dev.jsonl", "test": "obqa/test.jsonl"},
        parse=_parse_arc, hub=("allenai/openbookqa", "main"),
        hub_splits={"train": "train", "validation": "validation", "test": "test"}, from_hub=_obqa_from_hub),
    "boolq": DatasetSpec(
        splits=("train", "test"),
        files={"train": "boolq/val.jsonl", "test": "boolq/val.jsonl"},
        parse=_parse_boolq, hub=("google/boolq", None),
        hub_splits={"train": "train", "test": "validation"}, from_hub=_boolq_from_hub, holdout=True),
    "mmlu-chem": _mmlu("college_chemistry"),
    "mmlu-phys": _mmlu("college_physics"),
    "toy": DatasetSpec(splits=("train", "validation", "test"), embedded=toy_rows),
}


def load_examples(name: str, split: str, data_dir: str | Path | None = None, seed: int = 0) -> list[Example]:
    """The ``split`` ("train", "validation" where one exists, "test") of dataset ``name`` (a DATASETS key).

    With ``data_dir`` the files are read from a directory laid out like ``shared/data``
    (``DatasetSpec.files``); without it the dataset comes from the Hugging Face hub through
    ``datasets.load_dataset`` (ids in ``DatasetSpec.hub``). WinoGrande's "test" is its dev set, MMLU's
    "train" its 5-question dev set. ``toy`` is generated in code and ignores ``data_dir``.

    BoolQ offline: its train split is not in ``shared/data``, so "train" and "test" are a split of
    ``boolq/val.jsonl`` by a permutation seeded with ``seed``: the first 80% (2,616 rows) train, the
    rest (654) test, each kept in file order (see ``BOOLQ_OFFLINE_NOTE``). ``seed`` affects nothing else.

    Raises ValueError for an unknown name or split, DatasetError for a missing file or a bad row.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {sorted(DATASETS)}")
    spec = DATASETS[name]
    if split not in spec.splits:
        raise ValueError(f"dataset {name!r} has no split {split!r}; valid splits: {list(spec.splits)}")
    if spec.embedded is not None:
        return [Example(**row) for row in spec.embedded(split)]
    if data_dir is None:
        return _load_hub(spec, split)
    source = spec.files[split]
    path = Path(data_dir) / source
    reader = _read_csv(path, source) if source.endswith(".csv") else _read_jsonl(path, source)
    examples = [spec.parse(row, _Loc(source, line)) for line, row in reader]
    return _holdout_split(examples, split, seed) if spec.holdout else examples


def _holdout_split(examples: list[Example], split: str, seed: int) -> list[Example]:
    """The "train" (first 80% of a ``seed``-ed permutation) or "test" (the rest) part, in input order."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_train = round(BOOLQ_TRAIN_FRACTION * len(examples))
    chosen = order[:n_train] if split == "train" else order[n_train:]
    return [examples[i] for i in sorted(chosen)]


def _load_hub(spec: DatasetSpec, split: str) -> list[Example]:
    """The split from the Hugging Face hub; rows are validated by the same parser as local files."""
    import datasets  # imported here: the local path must not need the hub client

    path, config = spec.hub
    hub_split = spec.hub_splits[split]
    rows = datasets.load_dataset(path, config, split=hub_split)
    source = f"{path}/{config or 'default'}[{hub_split}]"
    return [spec.parse(spec.from_hub(row, i), _Loc(source, i + 1, "row")) for i, row in enumerate(rows)]


# ---------------------------------------------------------------------------------------------------
# File readers: yield (1-based line, row dict); format errors become DatasetError


def _read_text(path: Path, source: str) -> str:
    """The file decoded as UTF-8; DatasetError if it is missing, not UTF-8 or blank."""
    if not path.is_file():
        raise DatasetError(f"{path}: file not found (expected {source} under the data directory)", str(path))
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise _Loc(source, line).error(f"invalid UTF-8 ({err.reason} at byte {err.start})") from None
    if not text.strip():
        raise _Loc(source, 1).error("empty file, expected at least one row")
    return text


def _read_jsonl(path: Path, source: str) -> Iterator[tuple[int, dict]]:
    """One JSON object per line; blank lines hold no row and are skipped."""
    for line, raw in enumerate(_read_text(path, source).split("\n"), start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except json.JSONDecodeError as err:
            raise _Loc(source, line).error(f"invalid JSON ({err.msg} at column {err.colno})") from None
        except (ValueError, RecursionError) as err:  # e.g. an integer too long to convert, deep nesting
            raise _Loc(source, line).error(f"invalid JSON ({err})") from None
        if not isinstance(row, dict):
            raise _Loc(source, line).error(f"expected a JSON object, got {type(row).__name__}")
        yield line, row


def _read_csv(path: Path, source: str) -> Iterator[tuple[int, dict]]:
    """Quoted CSV with header ``MMLU_HEADER``; fields may span lines, a row's line is where it starts."""
    reader = csv.reader(io.StringIO(_read_text(path, source), newline=""), strict=True)
    rows = 0
    try:
        header = next(reader)
        if tuple(header) != MMLU_HEADER:
            raise _Loc(source, 1).error(f"header {header} is not {list(MMLU_HEADER)}")
        start = reader.line_num + 1
        for fields in reader:
            if fields:  # a blank line holds no row
                if len(fields) != len(MMLU_HEADER):
                    expected = f"expected {len(MMLU_HEADER)} {list(MMLU_HEADER)}"
                    raise _Loc(source, start).error(f"{len(fields)} fields, {expected}")
                rows += 1
                yield start, dict(zip(MMLU_HEADER, fields))
            start = reader.line_num + 1
    except csv.Error as err:
        raise _Loc(source, reader.line_num).error(f"malformed CSV ({err})") from None
    if rows == 0:
        raise _Loc(source, 2).error("no rows after the header")


# ---------------------------------------------------------------------------------------------------
# Prompts and encoding


def render_prompt(example: Example) -> str:
    """The prompt text: optional ``Passage:`` line, ``Question:`` line, lettered choices, ``Answer:``.

    The model's next token after ``"Answer:"`` is read at the label tokens ``" A"``, ``" B"``, ...
    """
    passage = f"Passage: {example.context}\n" if example.context else ""
    choices = "".join(f"{LABEL_LETTERS[k]}. {text}\n" for k, text in enumerate(example.choices))
    return f"{passage}Question: {example.question}\n{choices}Answer:"


def label_token_ids(tokenizer, num_choices: int) -> list[int]:
    """Token id for each label string ``" A"``, ``" B"``, ...: the last token of its tokenisation.

    Returns ``num_choices`` distinct ids; ``MeLoRAError`` (a ValueError) if two labels share one.
    """
    if not 1 <= num_choices <= len(LABEL_LETTERS):
        raise ValueError(f"num_choices {num_choices} outside 1..{len(LABEL_LETTERS)}")
    labels = [" " + LABEL_LETTERS[k] for k in range(num_choices)]
    ids = [tokenizer(label, add_special_tokens=False)["input_ids"][-1] for label in labels]
    owner = {}
    for label, token in zip(labels, ids):
        if token in owner:
            raise MeLoRAError(f"label strings {owner[token]!r} and {label!r} tokenise to the same token {token}; "
                              f"this tokenizer cannot tell the answers apart")
        owner[token] = label
    return ids


def encode(tokenizer, examples: list[Example], max_length: int = 256,
           num_labels: int | None = None) -> dict[str, torch.Tensor]:
    """Tokenise a batch of prompts, left-padded to the longest one.

    Returns ``input_ids`` (LongTensor, batch x T), ``attention_mask`` (LongTensor, batch x T, 0 on
    padding), ``labels`` (LongTensor, batch) and ``choice_mask`` (BoolTensor, batch x K: which of
    the K label tokens each question offers), with T <= ``max_length``. Pads with the tokenizer's
    pad id, else its eos id, else 0; a BOS token is prepended when the tokenizer adds one by default.
    Too-long prompts are shortened as ``_fit_prompt`` describes. K is ``num_labels`` (questions may
    have fewer choices, e.g. ARC's 3-choice ones among 5-choice ones); without it all examples must
    have the same number of choices.
    """
    if not examples:
        raise ValueError("encode needs at least one example")
    counts = sorted({len(ex.choices) for ex in examples})
    if num_labels is None:
        if len(counts) > 1:
            raise ValueError(f"examples in one batch must have the same number of choices, got {counts}; "
                             f"pass num_labels to mask the missing ones")
        num_labels = counts[0]
    elif counts[-1] > num_labels:
        raise ValueError(f"an example has {counts[-1]} choices, more than num_labels={num_labels}")
    bos = _bos_prefix(tokenizer)
    sequences = [_fit_prompt(tokenizer, ex, max_length, bos) for ex in examples]
    pad = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
    width = max(len(s) for s in sequences)
    input_ids = torch.tensor([[pad] * (width - len(s)) + s for s in sequences], dtype=torch.long)
    attention_mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in sequences], dtype=torch.long)
    labels = torch.tensor([ex.label for ex in examples], dtype=torch.long)
    choice_mask = torch.arange(num_labels)[None, :] < torch.tensor([len(ex.choices) for ex in examples])[:, None]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
            "choice_mask": choice_mask}


def _bos_prefix(tokenizer) -> list[int]:
    """``[bos_token_id]`` if the tokenizer puts BOS in front of a text by default, else ``[]``."""
    ids = tokenizer("a")["input_ids"]
    bos = tokenizer.bos_token_id
    return [bos] if bos is not None and ids and ids[0] == bos else []


def _tokenise(tokenizer, example: Example, bos: list[int]) -> list[int]:
    return bos + tokenizer(render_prompt(example), add_special_tokens=False)["input_ids"]


def _fit_prompt(tokenizer, example: Example, max_length: int, bos: list[int]) -> list[int]:
    """Token ids of the prompt, at most ``max_length`` of them.

    A prompt that is too long loses whole words from the end of its passage first (down to dropping
    the passage line), then from the start of its question; the choices and ``"Answer:"`` are never
    cut. DatasetError (a ValueError) if they alone do not fit.
    """
    ids = _tokenise(tokenizer, example, bos)
    if len(ids) <= max_length:
        return ids
    passage, question = example.context, example.question
    passage_ends = [m.end() for m in re.finditer(r"\S+", passage)]
    question_starts = [m.start() for m in re.finditer(r"\S+", question)]
    no_passage = replace(example, context="")
    cuts = (  # (words available, the example keeping n of them)
        (len(passage_ends), lambda n: replace(example, context=passage[: passage_ends[n - 1]] if n else "")),
        (len(question_starts), lambda n: replace(no_passage, question=question[question_starts[-n]:] if n else "")),
    )
    for words, cut in cuts:
        kept = _longest_fitting(lambda n: len(_tokenise(tokenizer, cut(n), bos)) <= max_length, words)
        if kept is not None:
            return _tokenise(tokenizer, cut(kept), bos)
    bare = len(_tokenise(tokenizer, replace(no_passage, question=""), bos))
    raise DatasetError(
        f"example {example.uid!r}: the prompt takes {len(ids)} tokens and its choices block with 'Answer:' "
        f"alone takes {bare}, more than max_length={max_length}; raise max_length to at least {bare}",
        example.uid)


def _longest_fitting(fits: Callable[[int], bool], full: int) -> int | None:
    """The largest n in 0..full with ``fits(n)`` by bisection (fits is taken as monotone), or None."""
    if not fits(0):
        return None
    lo, hi = 0, full  # fits(lo) holds; the answer lies in lo..hi
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo
