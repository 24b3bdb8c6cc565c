"""Failure modes (docs/failure_modes.md): bad input gets a clear error, nothing is lost, nothing runs
that should not. Every case is checked for its message; CLI cases also for one line and the exit code."""
from __future__ import annotations

import ast
import json
import os
import re
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from guides import MeanFieldGuide
from melora_pyro import MeLoRAConfig, MeLoRAModel, load_adapters, save_adapters
from melora_pyro._atomic import atomic_write_text
from melora_pyro.checkpoint import find_latest_checkpoint, load_training_state
from melora_pyro.cli import main
from melora_pyro.data import DatasetError, Example, encode, label_token_ids
from melora_pyro.errors import ConfigError, MeLoRAError
from melora_pyro.io import CheckpointError, load_adapter_tensors
from melora_pyro.models import load_base_model, tiny_llama
from melora_pyro import rundir
from melora_pyro.runs import RunError, RunSettings, check_run_dir, open_run_dir, read_toml
from melora_pyro.train import BatchOrder, NumericalError, TrainConfig, make_optimizer, train

# as in conftest.py (imported by path here: tests/ is not a package)
STORIES_DIR = Path(os.environ.get("MELORA_SHARED_DIR", Path(__file__).resolve().parents[1].parent / "shared")) \
    / "models" / "stories260K"

PACKAGE_DIRS = [Path(__file__).resolve().parents[1] / name for name in ("melora_pyro", "guides")]
LABELS = [10, 11, 12, 13]
STORIES = ["--model", str(STORIES_DIR)]
QUICK = ["--rank", "2", "--steps", "2", "--batch-size", "2", "--train-limit", "8", "--eval-limit", "4",
         "--eval-samples", "1", "--max-length", "64"]


def run_cli(capsys, *argv) -> tuple[int, str]:
    """``main(argv)``'s exit code and its message: one ``melora-pyro:`` line on stderr, no traceback
    (progress bars of transformers and tqdm aside)."""
    capsys.readouterr()
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("melora-pyro")]
    assert len(lines) == 1, err
    assert "Traceback" not in err and "Error" not in err.replace(lines[0], ""), err
    return code, lines[0]


# ---------------------------------------------------------------------------------------------------
# One base type


def test_library_errors_share_one_base():
    for error in (DatasetError, RunError, CheckpointError, ConfigError, NumericalError):
        assert issubclass(error, MeLoRAError) and issubclass(error, ValueError), error
    assert issubclass(NumericalError, RuntimeError)  # as before


# ---------------------------------------------------------------------------------------------------
# 1. Datasets, through the CLI (file, line, what was expected; exit 2)

ARC_FILE = "arc/ARC-Easy/ARC-Easy-Train.jsonl"


def arc_row(answer="A", choices=("one", "two", "three"), labels=None) -> dict:
    labels = labels or "ABCDEFGHIJ"[: len(choices)]
    return {"id": "q1", "answerKey": answer,
            "question": {"stem": "Pick one.", "choices": [{"text": t, "label": l} for t, l in zip(choices, labels)]}}


def lines(*rows) -> bytes:
    return b"".join((row if isinstance(row, bytes) else json.dumps(row).encode()) + b"\n" for row in rows)


GOOD = arc_row()
NO_ANSWER = {k: v for k, v in GOOD.items() if k != "answerKey"}
DATASET_CASES = [  # (case, content of the train file or None for no file, message)
    ("missing answer key", lines(GOOD, NO_ANSWER), f"{ARC_FILE} line 2: missing field 'answerKey'"),
    ("unknown answer key", lines(GOOD, arc_row(answer="Z")),
     f"{ARC_FILE} line 2: answerKey 'Z' is not one of the choice labels ['A', 'B', 'C']"),
    ("answer key of the wrong type", lines(arc_row(answer=1)), "line 1: field 'answerKey' should be str, got int 1"),
    ("empty choice", lines(GOOD, arc_row(choices=("one", " ", "three"))), "line 2: choice 1 is empty"),
    ("duplicate right choice", lines(arc_row(choices=("one", "two", "one"))),
     "line 1: the right choice 0 and choice 2 have the same text 'one'"),
    ("duplicate choice labels", lines(arc_row(labels=["A", "A", "B"])), "line 1: duplicate choice labels ['A', 'A', 'B']"),
    ("more choices than label letters", lines(arc_row(choices=tuple("abcdefghi"))),
     "line 1: 9 choices, more than the 8 label letters ABCDEFGH"),
    ("one choice", lines(arc_row(choices=("one",))), "line 1: 1 choice(s), expected at least 2"),
    ("invalid UTF-8", lines(GOOD, GOOD, b'{"id": "\xff"}'), f"{ARC_FILE} line 3: invalid UTF-8"),
    ("lone surrogate escape", lines(GOOD, b'{"id": "q\\ud800", "answerKey": "A", "question": {}}'),
     "line 2: field 'id' is not valid text (surrogates not allowed"),
    ("empty file", b"", f"{ARC_FILE} line 1: empty file, expected at least one row"),
    ("blank file", b"\n \n", "line 1: empty file"),
    ("invalid JSON", lines(GOOD) + b"{bad\n", "line 2: invalid JSON"),
    ("not an object", lines(GOOD, b"[1, 2]"), "line 2: expected a JSON object, got list"),
    ("missing file", None, f"file not found (expected {ARC_FILE} under the data directory)"),
]


@pytest.mark.parametrize("case, content, expected", DATASET_CASES, ids=[c[0] for c in DATASET_CASES])
def test_bad_dataset_file_cli(tmp_path, capsys, stories, case, content, expected):
    data_dir = tmp_path / "data"
    (data_dir / ARC_FILE).parent.mkdir(parents=True)
    if content is not None:
        (data_dir / ARC_FILE).write_bytes(content)
    code, message = run_cli(capsys, "train", *STORIES, *QUICK, "--dataset", "arc-e", "--data-dir", data_dir,
                            "--run-dir", tmp_path / "run")
    assert code == 2
    assert message.startswith("melora-pyro: error: ") and expected in message, message
    assert not (tmp_path / "run" / "settings.json").exists()  # nothing written for a run that never started


def test_dataset_error_carries_file_and_line(tmp_path):
    from melora_pyro.data import load_examples

    (tmp_path / ARC_FILE).parent.mkdir(parents=True)
    (tmp_path / ARC_FILE).write_bytes(lines(GOOD, NO_ANSWER))
    with pytest.raises(DatasetError) as caught:
        load_examples("arc-e", "train", tmp_path)
    assert (caught.value.source, caught.value.line) == (ARC_FILE, 2)


def test_debug_flag_shows_the_traceback(tmp_path, capsys):
    assert main(["train", "--rank", "0", "--run-dir", str(tmp_path / "run"), "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "ConfigError" in err and "MeLoRAConfig.rank must be a positive integer" in err


# ---------------------------------------------------------------------------------------------------
# 1. Prompts that cannot fit, label strings that share a token


def test_prompt_that_cannot_fit_even_without_its_passage(stories):
    _, tokenizer = stories
    example = Example("Is it?", ("yes", "no"), 0, context="a long passage " * 50, uid="boolq-7")
    bare = len(encode(tokenizer, [Example("", ("yes", "no"), 0)], max_length=512)["input_ids"][0])
    fitted = encode(tokenizer, [example], max_length=bare + 3)["input_ids"]  # the passage is cut away
    assert fitted.shape[1] <= bare + 3
    with pytest.raises(DatasetError, match=rf"example 'boolq-7': .* alone takes {bare}, more than "
                                           rf"max_length={bare - 1}; raise max_length to at least {bare}"):
        encode(tokenizer, [example], max_length=bare - 1)


def test_prompt_that_cannot_fit_cli_fails_before_training(tmp_path, capsys, stories):
    code, message = run_cli(capsys, "train", *STORIES, *QUICK, "--scoring", "letter", "--max-length", "8",
                            "--run-dir", tmp_path / "run")
    assert code == 2
    assert "toy train: " in message and "cannot fit max_length=8 tokens even without passage and question" in message
    assert "raise --max-length to at least" in message
    assert not (tmp_path / "run" / "checkpoints").exists()
    code, message = run_cli(capsys, "train", *STORIES, *QUICK, "--max-length", "8", "--run-dir", tmp_path / "cloze")
    assert code == 2
    assert re.search(r"example 'toy-train-\d+': its context and 4 continuations take \d+ tokens packed, more than "
                     r"max_length=8; raise max_length to at least \d+", message)
    assert not (tmp_path / "cloze" / "checkpoints").exists()


def clashing_tokenizer_model(directory: Path) -> Path:
    """A model directory whose tokenizer maps every unknown word, " A" and " B" included, to one id."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"[UNK]": 0, "Answer:": 1}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="[UNK]").save_pretrained(directory)
    tiny_llama().save_pretrained(directory)
    return directory


def test_label_strings_sharing_a_token(tmp_path, capsys):
    model_dir = clashing_tokenizer_model(tmp_path / "model")
    _, tokenizer = load_base_model(str(model_dir))
    with pytest.raises(MeLoRAError, match="label strings ' A' and ' B' tokenise to the same token 0"):
        label_token_ids(tokenizer, 4)
    code, message = run_cli(capsys, "train", "--model", model_dir, *QUICK, "--scoring", "letter",
                            "--run-dir", tmp_path / "run")
    assert code == 2 and "label strings ' A' and ' B' tokenise to the same token 0" in message, message


# ---------------------------------------------------------------------------------------------------
# 1. Configs: flags and TOML files (no model is loaded: these fail at once)

FLAG_CASES = [
    (["--rank", "0"], "MeLoRAConfig.rank must be a positive integer, got 0"),
    (["--alpha", "-1"], "MeLoRAConfig.alpha must be a positive number, got -1.0"),
    (["--dropout", "1.5"], "MeLoRAConfig.dropout must be a number in [0, 1), got 1.5"),
    (["--kl", "forward"], "MeLoRAConfig.kl must be one of ('full_weight', 'elementwise'), got 'forward'"),
    (["--prior-std", "nan"], "MeLoRAConfig.prior_std must be a positive number, got nan"),
    (["--steps", "0"], "TrainConfig.steps must be a positive integer, got 0"),
    (["--lr", "-1"], "TrainConfig.lr must be a finite number >= 0, got -1.0"),
    (["--lr", "inf"], "TrainConfig.lr must be a finite number >= 0, got inf"),
    (["--checkpoint-every", "-1"], "TrainConfig.checkpoint_every must be an integer >= 0 (0: only at the end), got -1"),
    (["--seed", "-3"], "TrainConfig.seed must be an integer in [0, 2**32), got -3"),
    (["--dtype", "float16"], "setting dtype must be 'float32' or 'bfloat16', got 'float16'"),
    (["--device", "tpu"], "setting device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got 'tpu'"),
    (["--dataset", "squad"], "setting dataset must be one of ['arc-c', 'arc-e', 'arc-e-slice', 'boolq',"),
    (["--dataset", "wg-s", "--eval-split", "validation"],
     "setting eval_split must be one of ['train', 'test'] for dataset 'wg-s', got 'validation'"),
    (["--max-length", "0"], "setting max_length must be a positive integer, got 0"),
    (["--train-limit", "0"], "setting train_limit must be None or a positive integer, got 0"),
    (["--model", "/no/such/model"], "model directory /no/such/model not found"),
]


@pytest.mark.parametrize("flags, expected", FLAG_CASES, ids=[" ".join(f) for f, _ in FLAG_CASES])
def test_bad_flag_cli(tmp_path, capsys, flags, expected):
    code, message = run_cli(capsys, "train", *flags, "--run-dir", tmp_path / "run")
    assert code == 2 and message.startswith("melora-pyro: error: ") and expected in message, message
    if flags[0] != "--model":
        assert not (tmp_path / "run").exists()  # rejected before the run directory is made


TOML_CASES = [  # (case, file content (None: no file), message)
    ("unknown top-level key", 'modle = "x"\n', "unknown settings ['modle']"),
    ("unknown [adapter] key", "[adapter]\nrnak = 3\n", "MeLoRAConfig: unknown keys ['rnak']"),
    ("unknown [train] key", "[train]\nstep = 3\n", "unknown [train] keys ['step']"),
    ("out-of-range [train] value", "[train]\nlr = -1.0\n", "TrainConfig.lr must be a finite number >= 0, got -1.0"),
    ("wrong type", '[adapter]\nrank = "two"\n', "MeLoRAConfig.rank must be a positive integer, got 'two'"),
    ("bool for an int", "[train]\nsteps = true\n", "TrainConfig.steps must be a positive integer, got True"),
    ("target_modules not a list", "[adapter]\ntarget_modules = 3\n", "MeLoRAConfig.target_modules must be"),
    ("section not a table", "adapter = 3\n", "[adapter] must be a table of keys, got int"),
    ("bad top-level value", 'device = "gpu"\n', "setting device must be"),
    ("TOML syntax error", "[adapter\nrank = 2\n", "cannot read the TOML config"),
    ("not UTF-8", b"rank = '\xff'\n", "cannot read the TOML config"),
    ("missing file", None, "cannot read the TOML config"),
]


@pytest.mark.parametrize("case, content, expected", TOML_CASES, ids=[c[0] for c in TOML_CASES])
def test_bad_toml_config_cli(tmp_path, capsys, case, content, expected):
    config = tmp_path / "run.toml"
    if content is not None:
        config.write_bytes(content if isinstance(content, bytes) else content.encode())
    code, message = run_cli(capsys, "train", "--config", config, "--run-dir", tmp_path / "run")
    assert code == 2 and f"{config}: " in message and expected in message, message
    with pytest.raises(MeLoRAError):
        read_toml(config)


def test_bad_config_values_raise_config_error():
    with pytest.raises(ConfigError, match="MeLoRAConfig.rank must be a positive integer, got 0"):
        MeLoRAConfig(rank=0)
    with pytest.raises(ConfigError, match="target_modules must be a non-empty sequence"):
        MeLoRAConfig(target_modules=None)
    with pytest.raises(ConfigError, match="unknown keys \\['1', 'rnak'\\]"):
        MeLoRAConfig.from_dict({"rnak": 1, 1: 2})
    with pytest.raises(ConfigError, match="TrainConfig.batch_size must be a positive integer, got '4'"):
        TrainConfig(batch_size="4")
    with pytest.raises(ConfigError, match="TrainConfig.max_grad_norm must be None or a finite number >= 0"):
        TrainConfig(max_grad_norm=-1.0)
    with pytest.raises(RunError, match="setting device must be"):
        RunSettings(device=5)
    with pytest.raises(RunError, match="settings must be a table"):
        RunSettings.from_dict(["model"])


# ---------------------------------------------------------------------------------------------------
# 1. Target modules the base model lacks


@pytest.mark.parametrize("flags, expected", [
    (["--target-modules", "query_key_value"],
     "target_modules ['query_key_value'] match no nn.Linear in LlamaForCausalLM; its linear modules are named"),
    (["--rank", "4096"], "rank 4096 exceeds min(n, m)"),
], ids=["missing target", "rank too large"])
def test_target_modules_the_model_lacks_cli(tmp_path, capsys, stories, flags, expected):
    code, message = run_cli(capsys, "train", *STORIES, *QUICK, *flags, "--run-dir", tmp_path / "run")
    assert code == 2 and expected in message, message
    with pytest.raises(ConfigError, match="match no nn.Linear"):
        MeLoRAModel(tiny_llama(), MeLoRAConfig(rank=2, target_modules=("query_key_value",)), LABELS)


# ---------------------------------------------------------------------------------------------------
# 1 and 3. Adapter checkpoints that do not fit, are damaged, or are not safetensors


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A finished 2-step Me-LoRA run on stories260K with a checkpoint at every step (copy before editing)."""
    if not STORIES_DIR.is_dir():
        pytest.skip(f"{STORIES_DIR} not found")
    run_dir = tmp_path_factory.mktemp("failures") / "run"
    assert main(["train", *STORIES, *QUICK, "--checkpoint-every", "1", "--no-eval", "--run-dir", str(run_dir)]) == 0
    return run_dir


def copy_run(trained_run, tmp_path) -> Path:
    return Path(shutil.copytree(trained_run, tmp_path / "run"))


def test_checkpoint_whose_config_does_not_match_cli(trained_run, tmp_path, capsys):
    run_dir = copy_run(trained_run, tmp_path)
    settings = json.loads((run_dir / "settings.json").read_text())
    settings["adapter"]["rank"] = 3
    (run_dir / "settings.json").write_text(json.dumps(settings))
    code, message = run_cli(capsys, "evaluate", "--run-dir", run_dir)
    assert code == 2
    assert "step-00000002/melora.json: the checkpoint's adapter config does not match the model: " \
           "rank=2 (checkpoint) vs 3 (model)" in message, message


def test_checkpoint_with_a_damaged_tensor_file_cli(trained_run, tmp_path, capsys):
    run_dir = copy_run(trained_run, tmp_path)
    (find_latest_checkpoint(run_dir) / "adapters.safetensors").write_bytes(b"\x00" * 10)
    code, message = run_cli(capsys, "evaluate", "--run-dir", run_dir)
    assert code == 2 and "adapters.safetensors: unreadable safetensors file" in message, message


def tiny_melora(**config) -> tuple[MeLoRAModel, MeanFieldGuide]:
    model = MeLoRAModel(tiny_llama(), MeLoRAConfig(**{"rank": 2, **config}), LABELS)
    return model, MeanFieldGuide(model)


def test_checkpoint_shapes_or_config_that_do_not_fit(tmp_path):
    model, guide = tiny_melora()
    save_adapters(tmp_path, model, guide)
    with pytest.raises(CheckpointError, match=r"model tensor lora_A.0 has shape \(2, 2, 32\), the base model needs "
                                              r"\(2, 2, 64\)"):
        load_adapters(tmp_path, tiny_llama(hidden=64))
    # q_proj and o_proj have the same shape: only the recorded config tells them apart
    other, other_guide = tiny_melora(target_modules=("q_proj", "o_proj"))
    with pytest.raises(CheckpointError, match=r"adapter config does not match the model: target_modules="
                                              r"\['q_proj', 'v_proj'\] \(checkpoint\) vs \['q_proj', 'o_proj'\]"):
        load_adapter_tensors(tmp_path, other, other_guide)
    other, other_guide = tiny_melora(prior_std=0.1)
    with pytest.raises(CheckpointError, match=r"prior_std=1.0 \(checkpoint\) vs 0.1 \(model\)"):
        load_adapter_tensors(tmp_path, other, other_guide)
    relabelled = MeLoRAModel(tiny_llama(), MeLoRAConfig(rank=2), [20, 21, 22, 23])
    with pytest.raises(CheckpointError, match=r"readouts differ: checkpoint has .*10, 11, 12, 13"):
        load_adapter_tensors(tmp_path, relabelled, MeanFieldGuide(relabelled))


def test_checkpoint_cannot_name_an_arbitrary_guide_class(tmp_path):
    model, guide = tiny_melora()
    save_adapters(tmp_path, model, guide)
    meta = json.loads((tmp_path / "melora.json").read_text())
    for name in ("point", "__class__", "mean_field"):
        (tmp_path / "melora.json").write_text(json.dumps({**meta, "guide": name}))
        with pytest.raises(CheckpointError, match=f"unknown guide class '{name}'; expected one of"):
            load_adapters(tmp_path, tiny_llama())


class _TouchOnUnpickle:
    """Unpickling this object calls ``open(path, "w")``: the file appears iff the pickle was loaded."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_pickle_disguised_as_safetensors_is_rejected_unexecuted(tmp_path):
    model, guide = tiny_melora()
    checkpoint = save_adapters(tmp_path / "ckpt", model, guide)
    marker = tmp_path / "pwned"
    (checkpoint / "adapters.safetensors").write_bytes(pickle.dumps(_TouchOnUnpickle(marker)))
    with pytest.raises(CheckpointError, match="adapters.safetensors: unreadable safetensors file"):
        load_adapters(checkpoint, tiny_llama())
    torch.save({"payload": _TouchOnUnpickle(marker)}, checkpoint / "adapters.safetensors")  # torch's zip format
    with pytest.raises(CheckpointError, match="unreadable safetensors file"):
        load_adapters(checkpoint, tiny_llama())
    assert not marker.exists()
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(_TouchOnUnpickle(control))).close()  # the payload is live when unpickled
    assert control.exists()


def test_pickle_in_a_training_checkpoint_is_rejected_unexecuted(trained_run, tmp_path, capsys):
    run_dir = copy_run(trained_run, tmp_path)
    marker = tmp_path / "pwned"
    (find_latest_checkpoint(run_dir) / "state.safetensors").write_bytes(pickle.dumps(_TouchOnUnpickle(marker)))
    code, message = run_cli(capsys, "evaluate", "--run-dir", run_dir)
    assert code == 2 and "step-00000002: damaged training checkpoint" in message, message
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------
# 3. Nothing in the package can run code from a file


def _calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
            owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else ""
            yield node, owner, name


def test_package_source_has_no_unsafe_loading():
    """An AST grep of melora_pyro/ and guides/ (docstrings and comments do not count): no pickle-family
    import, no ``torch.load`` without ``weights_only=True``, no ``eval``/``exec``, no
    ``trust_remote_code=True`` or ``allow_pickle=True`` literal."""
    files = [path for root in PACKAGE_DIRS for path in sorted(root.rglob("*.py"))]
    assert len(files) > 10
    found = []
    for path in files:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        where = path.relative_to(PACKAGE_DIRS[0].parent)
        for node in ast.walk(tree):
            modules = ([a.name for a in node.names] if isinstance(node, ast.Import)
                       else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for module in modules:
                if module.split(".")[0] in {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib",
                                            "shelve", "marshal"}:
                    found.append(f"{where}:{node.lineno} imports {module}")
            if isinstance(node, ast.keyword) and node.arg in ("trust_remote_code", "allow_pickle") \
                    and isinstance(node.value, ast.Constant) and node.value.value is True:
                found.append(f"{where}:{node.value.lineno} {node.arg}=True")
        for node, owner, name in _calls(tree):
            if isinstance(node.func, ast.Name) and name in ("eval", "exec", "__import__"):
                found.append(f"{where}:{node.lineno} calls {name}()")
            if owner == "torch" and name == "load":
                safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                           for k in node.keywords)
                if not safe:
                    found.append(f"{where}:{node.lineno} torch.load without weights_only=True")
            if owner in ("pickle", "dill", "yaml") and name in ("load", "loads", "unsafe_load"):
                found.append(f"{where}:{node.lineno} {owner}.{name}")
    assert not found, found


def test_remote_code_is_off_unless_asked(monkeypatch, tmp_path, capsys):
    import inspect

    import melora_pyro.models as models
    import melora_pyro.pipeline as pipeline

    assert inspect.signature(models.load_base_model).parameters["trust_remote_code"].default is False
    assert RunSettings().trust_remote_code is False
    seen = []

    def fake_from_pretrained(source, **kwargs):
        seen.append(kwargs.get("trust_remote_code", "absent"))
        raise ConfigError("stop here")

    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", fake_from_pretrained)
    for flags, expected in (([], False), (["--trust-remote-code"], True)):
        code, message = run_cli(capsys, "train", *STORIES, *flags, "--run-dir", tmp_path / f"run{len(seen)}")
        assert code == 2 and "stop here" in message
        assert seen[-1] is expected
    assert pipeline.load_base_model is models.load_base_model


# ---------------------------------------------------------------------------------------------------
# 2. Numerical faults: training stops at the step, names the tensor, keeps the last checkpoint


def numeric_batch(indices) -> dict:
    g = torch.Generator().manual_seed(sum(indices))
    n = len(indices)
    return {"input_ids": torch.randint(0, 128, (n, 7), generator=g), "attention_mask": torch.ones(n, 7, dtype=torch.long),
            "labels": torch.randint(0, 4, (n,), generator=g)}


def fresh_state(config):
    model, guide = tiny_melora()
    return model, guide, make_optimizer(model, guide, config), BatchOrder(8, config.batch_size, config.seed)


def poison_loss(model, guide):  # the frozen base's embedding: the loss (not the KL) becomes NaN
    model.base.get_input_embeddings().weight.data.fill_(float("nan"))


def poison_omega(model, guide):  # Omega = exp(log_scale) = inf: the KL, and so the loss, blow up
    guide.log_scale.data.fill_(float("inf"))


def poison_gradient(model, guide):  # a NaN gradient: the loss is fine, the update makes log Omega NaN
    guide.log_scale.register_hook(lambda grad: torch.full_like(grad, float("nan")))


@pytest.mark.parametrize("poison, tensors", [
    (poison_loss, "non-finite values in loss;"),
    (poison_omega, "non-finite values in loss, kl;"),
    (poison_gradient, "non-finite values in guide.log_scale;"),
], ids=["loss", "kl", "omega"])
def test_nan_at_step_3_stops_training_and_keeps_step_2(tmp_path, poison, tensors):
    config = TrainConfig(steps=5, batch_size=2, lr=1e-3, checkpoint_every=1)
    model, guide = tiny_melora()
    calls = []

    def collate(indices):
        calls.append(1)
        if len(calls) == 3:  # the batch of step 3
            poison(model, guide)
        return numeric_batch(indices)

    with pytest.raises(NumericalError, match=f"^step 3: {tensors} training stopped, the last complete checkpoint is kept"):
        train(model, guide, list(range(8)), collate, config, run_dir=tmp_path, progress=False)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-00000001", "step-00000002"]  # no step 3, no tmp
    assert [json.loads(line)["step"] for line in (tmp_path / "train_log.jsonl").read_text().splitlines()] == [1, 2]
    latest = find_latest_checkpoint(tmp_path)
    assert latest.name == "step-00000002"
    model2, guide2, optimizer2, order2 = fresh_state(config)
    assert load_training_state(latest, model2, guide2, optimizer2, order2) == 2
    assert all(torch.isfinite(p).all() for p in [*model2.parameters(), *guide2.parameters()])
    # nothing is lost: fixing the fault and resuming trains steps 3..5 from the step-2 state
    history = train(model2, guide2, list(range(8)), numeric_batch, config, run_dir=tmp_path, resume=True,
                    progress=False)
    assert [r["step"] for r in history] == [3, 4, 5]


def test_numerical_error_cli_is_one_line(tmp_path, capsys, stories):
    code, message = run_cli(capsys, "train", *STORIES, *QUICK, "--steps", "4", "--lr", "1e30", "--checkpoint-every",
                            "1", "--run-dir", tmp_path / "run")
    assert code == 3, message
    assert message.startswith("melora-pyro: numerical error: step ") and "non-finite values in" in message
    assert "the last complete checkpoint is kept" in message
    step = int(message.split("step ")[1].split(":")[0])
    kept = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert kept == [f"step-{s:08d}" for s in range(max(1, step - 2), step)]  # KEEP_LAST = 2, none partial


# ---------------------------------------------------------------------------------------------------
# 4. Output safety: atomic files, run directories are never overwritten unasked


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    import melora_pyro._atomic as atomic

    target = tmp_path / "metrics.json"
    atomic_write_text(target, "old")

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(atomic.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # no temporary file left


def test_existing_run_dir_is_not_overwritten_cli(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "settings.json").write_text("{}")
    for command in ("train", "demo"):
        code, message = run_cli(capsys, command, "--run-dir", run_dir)
        assert code == 2 and f"run directory {run_dir} exists and is not empty; pass --overwrite" in message
    assert (run_dir / "settings.json").read_text() == "{}"


def test_overwrite_refuses_a_directory_that_is_not_a_run(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("precious")
    (tmp_path / "checkpoints").mkdir()
    code, message = run_cli(capsys, "train", "--run-dir", tmp_path, "--overwrite")
    assert code == 2 and f"{tmp_path} is not a run directory melora-pyro created (no melora-run.json)" in message
    assert (tmp_path / "notes.txt").read_text() == "precious"
    not_a_dir = tmp_path / "notes.txt"
    code, message = run_cli(capsys, "train", "--run-dir", not_a_dir)
    assert code == 2 and "exists and is not a directory" in message


def test_overwrite_replaces_a_run_or_demo_directory(tmp_path):
    with open_run_dir(tmp_path / "demo"):
        pass
    for run_dir in (tmp_path / "run", tmp_path / "demo" / "melora"):
        with open_run_dir(run_dir):
            (run_dir / "checkpoints" / "step-00000001").mkdir(parents=True)
            (run_dir / "settings.json").write_text("{}")
            rundir.record_written(run_dir, "checkpoints", "settings.json")
    rundir.record_written(tmp_path / "demo", "melora")
    (tmp_path / "demo" / "summary.md").write_text("x")
    rundir.record_written(tmp_path / "demo", "summary.md")
    for run_dir in (tmp_path / "run", tmp_path / "demo"):
        with pytest.raises(RunError, match="exists and is not empty"):
            check_run_dir(run_dir)
        check_run_dir(run_dir, overwrite=True)
        with open_run_dir(run_dir, overwrite=True):
            assert sorted(p.name for p in run_dir.iterdir()) == ["melora-run.json", "melora-run.lock"]


@pytest.mark.parametrize("setup, expected", [
    (lambda d: None, "is not a run directory (no settings.json); train into it first"),
    (lambda d: (d / "settings.json").write_text("{not json"), "settings.json: not valid JSON"),
    (lambda d: (d / "settings.json").write_text('{"rank": 2}'), "unknown settings ['rank']"),
], ids=["no settings", "corrupt settings", "foreign settings"])
def test_evaluate_a_directory_that_is_not_a_run_cli(tmp_path, capsys, setup, expected):
    setup(tmp_path)
    code, message = run_cli(capsys, "evaluate", "--run-dir", tmp_path)
    assert code == 2 and expected in message, message


PREDICT_CASES = [
    (b'{"question": "q", "choices": ["a", "b"]}\n{bad\n', "line 2: invalid JSON"),
    (b'{"choices": ["a", "b"]}\n', "line 1: field 'question' should be a non-empty string"),
    (b'{"question": "q", "choices": ["a"]}\n', "line 1: 1 choices, expected 2 to 8"),
    (b'{"question": "q", "choices": ["a", ""]}\n', "line 1: field 'choices' should be a list of non-empty strings"),
    (b'{"question": "q", "choices": ["a", "a"]}\n', "line 1: duplicate choices ['a', 'a']"),
    (b'{"question": "q", "choices": ["a", "b"], "answer": 0}\n', "line 1: unknown fields ['answer']"),
    (b'["q", "a", "b"]\n', "line 1: expected a JSON object, got list"),
    (b'{"question": "q\\ud800", "choices": ["a", "b"]}\n', "line 1: invalid text (surrogates not allowed)"),
    (b"\xff\n", "invalid UTF-8"),
    (b"\n", "empty file"),
]


@pytest.mark.parametrize("content, expected", PREDICT_CASES, ids=[c[1] for c in PREDICT_CASES])
def test_bad_predict_input_cli(tmp_path, capsys, content, expected):
    path = tmp_path / "questions.jsonl"
    path.write_bytes(content)
    code, message = run_cli(capsys, "predict", "--run-dir", tmp_path / "run", "--input", path)
    assert code == 2 and expected in message, message
