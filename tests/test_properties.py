"""Property-based tests (hypothesis): whatever the input, the library either accepts it (and what it
returns is valid) or raises its own error type, ``MeLoRAError``: never a ``KeyError``, ``TypeError``,
``AttributeError`` or a tokenizer's exception.

Covered: dataset files of every layout (ARC / OpenBookQA, WinoGrande, BoolQ JSONL; MMLU CSV) loaded
and encoded; ``MeLoRAConfig.from_dict``; ``TrainConfig(**kwargs)``; ``RunSettings.from_dict``;
TOML files through ``runs.read_toml``.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from melora_pyro.config import KL_KINDS, MeLoRAConfig
from melora_pyro.data import DATASETS, LABEL_LETTERS, MMLU_HEADER, DatasetError, Example, encode, load_examples
from melora_pyro.errors import MeLoRAError
from melora_pyro.models import load_base_model
from melora_pyro.runs import RunSettings, read_toml
from melora_pyro.train import TrainConfig

# as in conftest.py (imported by path here: tests/ is not a package)
STORIES_DIR = Path(os.environ.get("MELORA_SHARED_DIR", Path(__file__).resolve().parents[1].parent / "shared")) \
    / "models" / "stories260K"

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# Any JSON value; integers beyond 64 bits and non-finite floats included
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
# empty, blank, control characters; lone surrogates (which st.text never draws) from a JSON "\\ud800" escape
TEXT = st.text(max_size=6) | st.sampled_from(["\ud800", "a\udfff", "\x00", "\u2028", " \t"])
WORD = st.text(min_size=1, max_size=6).filter(str.strip)


@pytest.fixture(scope="module")
def tokenizer():
    if not STORIES_DIR.is_dir():
        pytest.skip(f"{STORIES_DIR} not found")
    return load_base_model(str(STORIES_DIR))[1]


# ---------------------------------------------------------------------------------------------------
# Dataset files


def maybe(draw, valid):
    """Mostly a plausible value, now and then any JSON value, so that both outcomes are exercised."""
    return draw(mostly(valid, JSON, one_in=24))


def drop_some(draw, row: dict) -> dict:
    return {k: v for k, v in row.items() if draw(st.integers(0, 29)) > 0}  # a key goes missing 1 time in 30


def mostly(common, rare, one_in: int = 4):
    """``rare`` about once in ``one_in`` draws, else ``common`` (``st.one_of`` would merge equal branches)."""
    return st.integers(0, one_in - 1).flatmap(lambda k: rare if k == 0 else common)


CHOICE = mostly(WORD, TEXT)


@st.composite
def arc_rows(draw):
    n = draw(st.integers(0, 10))
    letters = draw(st.sampled_from(["ABCDEFGHIJ", "ABCDEFGHIJ", "1234567890", "ABBCDEFGHI"]))
    choices = [{"text": maybe(draw, CHOICE), "label": maybe(draw, st.just(letters[k]))} for k in range(n)]
    if choices and draw(st.integers(0, 15)) == 0:
        choices[draw(st.integers(0, n - 1))] = draw(JSON)
    keys = list(letters[:max(n, 1)])
    row = {"id": maybe(draw, WORD), "answerKey": maybe(draw, st.sampled_from(keys * 3 + ["Z", ""])),
           "question": maybe(draw, st.fixed_dictionaries({"stem": CHOICE, "choices": st.just(choices)}))}
    return drop_some(draw, row)


@st.composite
def winogrande_rows(draw):
    row = {"qID": maybe(draw, WORD), "sentence": maybe(draw, CHOICE), "option1": maybe(draw, CHOICE),
           "option2": maybe(draw, CHOICE), "answer": maybe(draw, st.sampled_from(["1", "2"] * 3 + ["0", "3", ""]))}
    return drop_some(draw, row)


@st.composite
def boolq_rows(draw):
    row = {"question": maybe(draw, CHOICE), "passage": maybe(draw, TEXT | WORD),
           "idx": maybe(draw, st.integers(-5, 10 ** 6)), "label": maybe(draw, st.booleans())}
    return drop_some(draw, row)


ROWS = {"arc-e": arc_rows(), "obqa": arc_rows(), "wg-s": winogrande_rows(), "boolq": boolq_rows()}


def line_bytes(row, ascii_only: bool = True) -> bytes:
    """One JSONL line; ``ascii_only`` escapes every non-ASCII character (a lone surrogate stays one when read),
    otherwise the characters are written raw (a lone surrogate becomes invalid UTF-8)."""
    return json.dumps(row, ensure_ascii=ascii_only, allow_nan=True).encode("utf-8", "surrogatepass")


def lines_of(rows):
    return st.tuples(rows, st.sampled_from([True, True, True, False])).map(lambda pair: line_bytes(*pair))


def file_lines(rows):
    """Up to 3 lines, mostly rows of the layout, now and then junk (bytes, text, another JSON value)."""
    junk = st.binary(max_size=8) | TEXT.map(lambda t: t.encode("utf-8", "surrogatepass")) | lines_of(JSON)
    return st.lists(mostly(lines_of(rows), junk, one_in=10), max_size=3)


def check_loaded(examples: list, tokenizer) -> None:
    """Loaded examples are valid and can be encoded (or are refused with the library's own error)."""
    for ex in examples:
        assert isinstance(ex, Example) and all(isinstance(x, str) for x in (ex.question, ex.context, ex.uid))
        assert 2 <= len(ex.choices) <= len(LABEL_LETTERS) and 0 <= ex.label < len(ex.choices)
        assert all(isinstance(c, str) and c.strip() for c in ex.choices)
        assert sum(c.strip() == ex.choices[ex.label].strip() for c in ex.choices) == 1  # the answer is unambiguous
    for ex in examples:
        try:
            batch = encode(tokenizer, [ex], max_length=48)
        except MeLoRAError:
            continue
        assert batch["input_ids"].shape[1] <= 48 and batch["labels"].tolist() == [ex.label]


@settings(max_examples=150, **SETTINGS)
@given(name=st.sampled_from(sorted(ROWS)), data=st.data())
def test_any_jsonl_file_loads_or_raises_the_library_error(tmp_path_factory, tokenizer, name, data):
    lines = data.draw(file_lines(ROWS[name]))
    root = tmp_path_factory.getbasetemp() / "properties-jsonl"
    path = root / DATASETS[name].files["train"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\n".join(lines))
    splits = ("train", "test") if DATASETS[name].holdout else ("train",)  # BoolQ's splits share one file
    try:
        examples = [ex for split in splits for ex in load_examples(name, split, root)]
    except MeLoRAError as e:
        assert isinstance(e, DatasetError) and str(e).startswith(DATASETS[name].files["train"]), e
        return
    check_loaded(examples, tokenizer)
    # none dropped; a line of only Unicode whitespace (U+2028, found by hypothesis) holds no row
    assert len(examples) == sum(1 for line in path.read_bytes().decode("utf-8").split("\n") if line.strip())


CELL = st.sampled_from(["0", "1", "3", "4", "", " ", "a\nb", '"', "x"]) | TEXT.filter(lambda t: "\x00" not in t) | WORD


@settings(max_examples=100, **SETTINGS)
@given(header=st.sampled_from([list(MMLU_HEADER), list(MMLU_HEADER[:-1]), ["q", "a", "b", "c", "d", "answer"]]),
       rows=st.lists(st.lists(CELL, min_size=4, max_size=7), max_size=3), tail=st.text(max_size=6) | st.binary(max_size=6))
def test_any_csv_file_loads_or_raises_the_library_error(tmp_path_factory, tokenizer, header, rows, tail):
    out = io.StringIO()
    csv.writer(out).writerows([header, *rows])
    root = tmp_path_factory.getbasetemp() / "properties-csv"
    path = root / DATASETS["mmlu-chem"].files["train"]
    path.parent.mkdir(parents=True, exist_ok=True)
    tail = tail if isinstance(tail, bytes) else tail.encode("utf-8", "surrogatepass")
    path.write_bytes(out.getvalue().encode("utf-8", "surrogatepass") + tail)
    try:
        examples = load_examples("mmlu-chem", "train", root)
    except MeLoRAError as e:
        assert isinstance(e, DatasetError) and str(e).startswith(DATASETS["mmlu-chem"].files["train"]), e
        return
    check_loaded(examples, tokenizer)


# ---------------------------------------------------------------------------------------------------
# Configs

ADAPTER_VALUES = {
    "rank": st.integers(-2, 64), "alpha": st.floats(-1, 64) | st.integers(-1, 64), "prior_std": st.floats(-1, 2),
    "prior_noise": st.floats(-1, 1), "dropout": st.floats(-0.5, 1.5), "init_b_std": st.floats(-1, 1),
    "kl": st.sampled_from([*KL_KINDS, "forward", ""]),
    "target_modules": st.lists(st.sampled_from(["q_proj", "v_proj", "lm_head", ""]), max_size=3)
    | st.sampled_from(["q_proj", ""]),
}
TRAIN_VALUES = {
    "steps": st.integers(-1, 10), "batch_size": st.integers(-1, 10), "grad_accum": st.integers(-1, 4),
    "lr": st.floats(-1, 1), "guide_lr": st.none() | st.floats(-1, 1), "guide_scale_lr": st.floats(-1, 1), "weight_decay": st.floats(-1, 1),
    "max_grad_norm": st.none() | st.floats(-1, 10), "seed": st.integers(-1, 2 ** 64),
    "log_every": st.integers(-1, 10), "checkpoint_every": st.integers(-1, 10),
}
RUN_VALUES = {
    "model": st.sampled_from(["smollm2-135m", "", "/no/such/dir"]), "dataset": st.sampled_from([*DATASETS, "squad"]),
    "data_dir": st.none() | st.sampled_from(["data", ""]), "method": st.sampled_from(["melora", "map", ""]),
    "max_length": st.integers(-1, 512), "train_limit": st.none() | st.integers(-1, 10),
    "eval_split": st.sampled_from(["train", "validation", "test", "dev"]), "eval_limit": st.none() | st.integers(-1, 10),
    "eval_samples": st.integers(-1, 10), "eval_batch_size": st.integers(-1, 10),
    "dtype": st.sampled_from(["float32", "bfloat16", "float16"]),
    "device": st.sampled_from(["auto", "cpu", "cuda", "cuda:1", "cuda:x", "tpu"]), "trust_remote_code": st.booleans(),
}


def table(values: dict, unknown_keys: bool = True):
    """A dict of some known keys with plausible or arbitrary values, now and then an unknown key."""
    @st.composite
    def build(draw):
        keys = draw(st.lists(st.sampled_from(sorted(values)), unique=True, max_size=len(values)))
        d = {k: draw(st.one_of(values[k], values[k], JSON)) for k in keys}
        if unknown_keys and draw(st.integers(0, 9)) == 0:
            d[draw(st.text(max_size=8) | st.integers())] = draw(JSON)
        return d
    return build()


def is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@settings(max_examples=150, **SETTINGS)
@given(d=table(ADAPTER_VALUES) | JSON)
def test_meloraconfig_from_any_dict(d):
    try:
        config = MeLoRAConfig.from_dict(d)
    except MeLoRAError:
        return
    assert isinstance(config.rank, int) and config.rank >= 1 and config.kl in KL_KINDS
    assert all(is_number(getattr(config, f)) for f in ("alpha", "prior_std", "prior_noise", "dropout", "init_b_std"))
    assert config.target_modules and all(isinstance(t, str) and t for t in config.target_modules)
    assert MeLoRAConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config  # JSON round trip


@settings(max_examples=150, **SETTINGS)
@given(d=table(TRAIN_VALUES, unknown_keys=False))  # an unknown keyword is Python's TypeError, as for any class
def test_trainconfig_from_any_values(d):
    try:
        config = TrainConfig(**d)
    except MeLoRAError:
        return
    for name in ("steps", "batch_size", "grad_accum", "log_every"):
        assert isinstance(getattr(config, name), int) and getattr(config, name) >= 1
    assert is_number(config.lr) and config.lr >= 0 and 0 <= config.seed < 2 ** 32


@st.composite
def run_tables(draw):
    d = draw(table(RUN_VALUES))
    for section, values in (("adapter", ADAPTER_VALUES), ("train", TRAIN_VALUES)):
        if draw(st.booleans()):
            d[section] = draw(st.one_of(table(values), table(values), JSON))
    return d


@settings(max_examples=150, **SETTINGS)
@given(d=run_tables() | JSON)
def test_runsettings_from_any_dict(d):
    try:
        run = RunSettings.from_dict(d)
    except MeLoRAError:
        return
    assert run.dataset in DATASETS and run.eval_split in DATASETS[run.dataset].splits
    assert isinstance(run.adapter, MeLoRAConfig) and isinstance(run.train, TrainConfig)
    assert RunSettings.from_dict(json.loads(json.dumps(run.to_dict()))) == run  # what settings.json holds


def toml_value(v) -> str | None:
    """``v`` written as TOML (None: not representable, e.g. JSON null)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "nan" if v != v else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        items = [toml_value(x) for x in v]
        return None if None in items else "[" + ", ".join(items) + "]"
    if isinstance(v, dict):
        items = {k: toml_value(x) for k, x in v.items()}
        return "{" + ", ".join(f"{json.dumps(k)} = {x}" for k, x in items.items() if x is not None) + "}"
    return None


@settings(max_examples=100, **SETTINGS)
@given(d=run_tables(), raw=st.none() | st.text(max_size=20) | st.binary(max_size=20))
def test_any_toml_file_reads_or_raises_the_library_error(tmp_path_factory, d, raw):
    path = tmp_path_factory.getbasetemp() / "properties.toml"
    if raw is None:
        text = "".join(f"{json.dumps(str(k))} = {t}\n" for k, v in d.items() if (t := toml_value(v)) is not None)
        path.write_bytes(text.encode("utf-8", "surrogatepass"))
    else:
        path.write_bytes(raw if isinstance(raw, bytes) else raw.encode("utf-8", "surrogatepass"))
    try:
        parsed = read_toml(path)
    except MeLoRAError as e:
        assert str(e).startswith(f"{path}: "), e
        return
    run = RunSettings.from_dict(parsed)  # read_toml accepted it: so do the settings
    assert dataclasses.asdict(run)["adapter"]["rank"] >= 1
