"""Run directories never lose a user's data or run code nobody asked for (issue 13, items 1-10).

Each test is one item of the issue; every CLI case also checks the one-line message and the exit code.
"""
from __future__ import annotations

import ast
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from melora_pyro import MeLoRAConfig, MeLoRAModel, load_adapters
from melora_pyro.checkpoint import find_latest_checkpoint
from melora_pyro.cli import main
from melora_pyro.io import CheckpointError
from melora_pyro.layers import MeLoRALinear
from melora_pyro.methods import MAP_WEIGHT_DECAY
from melora_pyro.models import load_base_model
from melora_pyro.train import TrainConfig

from .test_failures import STORIES_DIR, run_cli

ROOT = Path(__file__).resolve().parents[1]
T = ["--model", str(STORIES_DIR), "--dataset", "toy", "--rank", "2", "--steps", "4", "--batch-size", "2",
     "--train-limit", "16", "--eval-limit", "8", "--eval-samples", "2", "--max-length", "64"]


def snapshot(directory: Path) -> dict:
    """Every file under ``directory`` with its bytes (what a command must leave as it was)."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 4-step Me-LoRA run with checkpoints at steps 2 and 4 (copy it before changing it)."""
    if not STORIES_DIR.is_dir():
        pytest.skip(f"{STORIES_DIR} not found")
    run_dir = tmp_path_factory.mktemp("rundirs") / "run"
    assert main(["train", *T, "--checkpoint-every", "2", "--run-dir", str(run_dir)]) == 0
    return run_dir


def copy_of(run_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run_dir, tmp_path / "copy"))


# 1. --overwrite deletes only a directory the library owns, and only what a run wrote

def test_overwrite_never_deletes_what_no_run_wrote(finished, tmp_path, capsys):
    stranger = tmp_path / "x"
    (stranger / "checkpoints").mkdir(parents=True)
    (stranger / "checkpoints" / "mine.bin").write_text("keep")
    code, message = run_cli(capsys, "train", *T, "--overwrite", "--run-dir", stranger)
    assert code == 2 and "not a run directory melora-pyro created" in message, message
    assert (stranger / "checkpoints" / "mine.bin").read_text() == "keep"

    runs = tmp_path / "runs"
    for name in ("a", "b"):
        shutil.copytree(finished, runs / name)
    before = snapshot(runs)
    code, message = run_cli(capsys, "train", *T, "--overwrite", "--run-dir", runs)
    assert code == 2 and "not a run directory melora-pyro created" in message, message
    assert snapshot(runs) == before

    run = copy_of(finished, tmp_path)
    (run / "notes").mkdir()
    (run / "notes" / "summary.md").write_text("mine")
    (run / "checkpoints" / "mine.bin").write_text("keep")
    before = snapshot(run)
    code, message = run_cli(capsys, "train", *T, "--overwrite", "--run-dir", run)
    assert code == 2 and "holds files no run wrote" in message and "checkpoints/mine.bin" in message, message
    assert snapshot(run) == before


def test_overwrite_replaces_an_owned_run(finished, tmp_path):
    run = copy_of(finished, tmp_path)
    assert main(["train", *T, "--steps", "2", "--overwrite", "--no-eval", "--run-dir", str(run)]) == 0
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000002"]
    assert not (run / "metrics.json").exists()  # the old run's results went with it


# 2. evaluate and predict never train and never rewrite what train wrote

def start_training(run: Path, steps: int = 100_000) -> subprocess.Popen:
    """A ``train`` process of ``steps`` steps into ``run``, returned once its first checkpoint is complete."""
    child = subprocess.Popen([sys.executable, "-m", "melora_pyro.cli", "train", *T, "--steps", str(steps),
                              "--checkpoint-every", "1", "--run-dir", str(run)], cwd=ROOT,
                             env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
                             stderr=subprocess.PIPE, text=True,
                             # Ctrl-C as in a terminal: a run started in the background (`cmd &`) inherits
                             # SIGINT ignored, and Python then installs no KeyboardInterrupt handler.
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while find_latest_checkpoint(run) is None:
        if child.poll() is not None or time.monotonic() > deadline:
            child.kill()
            raise AssertionError(f"training never started: {child.stderr.read()[-2000:]}")
        time.sleep(0.2)
    return child


def test_evaluate_and_predict_refuse_an_unfinished_run(finished, tmp_path, capsys):
    killed = tmp_path / "killed"
    child = start_training(killed, steps=300)  # about a minute: killed long before the end
    child.kill()  # SIGKILL: no handler runs
    child.wait(timeout=60)
    child.stderr.close()
    before = snapshot(killed)
    for command in (["evaluate"], ["predict", "--question", "q?", "--choices", "a", "b"]):
        code, message = run_cli(capsys, *command, "--run-dir", killed)
        assert code == 2 and "is unfinished" in message and f"train --resume --run-dir {killed}" in message, message
        assert snapshot(killed) == before  # nothing trained, nothing written
    lost = copy_of(finished, tmp_path)
    shutil.rmtree(lost / "checkpoints")
    before = snapshot(lost)
    code, message = run_cli(capsys, "evaluate", "--run-dir", lost)
    assert code == 2 and "no checkpoint in" in message, message
    assert snapshot(lost) == before


def test_evaluate_writes_its_own_file_and_predict_writes_nothing(finished, tmp_path, capsys):
    run = copy_of(finished, tmp_path)
    before = snapshot(run)
    assert main(["evaluate", "--run-dir", str(run), "--eval-limit", "2"]) == 0
    after = snapshot(run)
    new = sorted(set(after) - set(before))
    assert len(new) == 2 and new[0].startswith("eval-test-") and new[0].endswith(".json"), new
    assert new[1] == new[0].removesuffix(".json") + ".safetensors"  # its predictions
    assert json.loads(after[new[0]])["n"] == 2
    assert {k: v for k, v in after.items() if k in before and k != "melora-run.json"} == \
        {k: v for k, v in before.items() if k != "melora-run.json"}  # settings, metrics, summary, plot as train left them
    before = snapshot(run)
    assert main(["predict", "--run-dir", str(run), "--question", "What is 1 + 1?", "--choices", "2", "3"]) == 0
    assert snapshot(run) == before


# 3. Code execution comes from the command line only, never from a file in the run directory

def remote_code_model(directory: Path, sentinel: Path) -> Path:
    """stories260K with an ``auto_map`` to a ``modeling_evil.py`` that creates ``sentinel`` when imported."""
    shutil.copytree(STORIES_DIR, directory)
    config = json.loads((directory / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilLlama"}
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "modeling_evil.py").write_text(
        f"open({str(sentinel)!r}, 'w').write('ran')\n"
        "from transformers import LlamaForCausalLM\n\n\nclass EvilLlama(LlamaForCausalLM):\n    pass\n")
    return directory


def test_settings_json_cannot_switch_on_remote_code(finished, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    sentinel = tmp_path / "ran"
    run = copy_of(finished, tmp_path)
    settings = json.loads((run / "settings.json").read_text())
    settings.update(model=str(remote_code_model(tmp_path / "evil", sentinel)), trust_remote_code=True)
    (run / "settings.json").write_text(json.dumps(settings))
    for command in (["evaluate"], ["predict", "--question", "q?", "--choices", "a", "b"]):
        capsys.readouterr()
        main([*command, "--run-dir", str(run)])
        assert not sentinel.exists(), command


# 4. --resume refuses a change that alters the run; a new lr is applied and recorded with its step

@pytest.fixture(scope="module")
def half(tmp_path_factory):
    """A 4-step run killed after its step-2 checkpoint (what --resume continues)."""
    if not STORIES_DIR.is_dir():
        pytest.skip(f"{STORIES_DIR} not found")
    run_dir = tmp_path_factory.mktemp("half") / "run"
    assert main(["train", *T, "--steps", "2", "--no-eval", "--run-dir", str(run_dir)]) == 0
    return run_dir


@pytest.mark.parametrize("flags, change", [
    (["--train-limit", "12"], "train_limit 16 -> 12"),
    (["--rank", "3"], "adapter.rank 2 -> 3"),
    (["--method", "map"], "method 'melora' -> 'map'"),
], ids=["train-limit", "rank", "method"])
def test_resume_refuses_a_change_that_alters_the_run(half, tmp_path, capsys, flags, change):
    run = copy_of(half, tmp_path)
    before = snapshot(run)
    code, message = run_cli(capsys, "train", "--resume", "--steps", "4", *flags, "--run-dir", run)
    assert code == 2 and "--resume would change the run" in message and change in message, message
    assert snapshot(run) == before


@pytest.mark.parametrize("flags, expected", [
    (["--steps", "1"], "--resume --steps 1: the run is already at step 2"),
    (["--steps", "4", "--overwrite"], "--resume continues a run and --overwrite replaces it: give one of them"),
], ids=["fewer steps", "with --overwrite"])
def test_resume_refuses_fewer_steps_and_overwrite(half, tmp_path, capsys, flags, expected):
    run = copy_of(half, tmp_path)
    before = snapshot(run)
    code, message = run_cli(capsys, "train", "--resume", *flags, "--run-dir", run)
    assert code == 2 and expected in message, message
    assert snapshot(run) == before


def test_resume_applies_and_records_a_new_lr(half, tmp_path):
    run = copy_of(half, tmp_path)
    assert main(["train", "--resume", "--steps", "4", "--lr", "3e-4", "--no-eval", "--run-dir", str(run)]) == 0
    trainer = json.loads((run / "checkpoints" / "step-00000004" / "trainer.json").read_text())
    defaults = TrainConfig()  # the guide keeps its own rates (loc, log scale)
    assert [g["lr"] for g in trainer["optimizer_param_groups"]] == [3e-4, defaults.guide_lr, defaults.guide_scale_lr]
    assert json.loads((run / "settings.json").read_text())["train"]["lr"] == 3e-4
    changes = json.loads((run / "melora-run.json").read_text())["changes"]
    assert changes == [{"step": 2, "train.lr": [1e-4, 3e-4], "train.steps": [2, 4], "time": changes[0]["time"]}]


# 5. One writer per run directory

def test_a_live_lock_refuses_a_second_writer_and_a_stale_one_is_taken_over(half, tmp_path, capsys):
    from melora_pyro.rundir import lock_run_dir

    run = copy_of(half, tmp_path)
    with lock_run_dir(run):  # this process writes into it
        before = snapshot(run)
        for command in (["train", "--resume", "--steps", "4"], ["evaluate"]):
            code, message = run_cli(capsys, *command, "--run-dir", run)
            assert code == 2 and f"is in use by process {os.getpid()}" in message, message
            assert snapshot(run) == before
    assert not (run / "melora-run.lock").exists()
    code = ("import os, sys; from melora_pyro.rundir import lock_run_dir; "
            "held = lock_run_dir(sys.argv[1]); held.__enter__(); os._exit(0)")  # killed holding the lock: a stale lock
    subprocess.run([sys.executable, "-c", code, str(run)], check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert (run / "melora-run.lock").exists()
    assert main(["train", "--resume", "--steps", "4", "--no-eval", "--run-dir", str(run)]) == 0
    assert not (run / "melora-run.lock").exists()
    assert [json.loads(x)["step"] for x in (run / "train_log.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


# 6. A flag is honoured, or refused when it contradicts the method's definition

@pytest.mark.parametrize("flags, expected", [
    (["--method", "melora", "--kl", "elementwise"], "method 'melora' is defined with kl='full_weight'"),
    (["--method", "melora-elementwise", "--kl", "full_weight"], "method 'melora-elementwise' is defined with kl='elementwise'"),
    (["--method", "melora", "--prior-noise", "0.1"], "method 'melora' is defined with prior_noise=0.0"),
    (["--method", "mle", "--weight-decay", "0.1"], "method 'mle' is defined with weight_decay=0.0"),
    (["--method", "mcdropout", "--dropout", "0"], "method 'mcdropout' needs dropout > 0"),
], ids=["melora kl", "elementwise kl", "melora prior-noise", "mle weight-decay", "mcdropout dropout 0"])
def test_a_flag_that_contradicts_the_method_is_refused(tmp_path, capsys, flags, expected):
    code, message = run_cli(capsys, "train", *T, *flags, "--run-dir", tmp_path / "run")
    assert code == 2 and expected in message, message
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flags, where, value", [
    (["--method", "map", "--weight-decay", "0.5"], ("trainer", "weight_decay"), 0.5),
    (["--method", "map"], ("trainer", "weight_decay"), MAP_WEIGHT_DECAY),
    (["--method", "mcdropout", "--dropout", "0.3"], ("melora", "dropout"), 0.3),
    (["--method", "melora-noise", "--prior-noise", "0.2"], ("melora", "prior_noise"), 0.2),
    (["--method", "melora-elementwise"], ("melora", "kl"), "elementwise"),
], ids=["map weight-decay", "map default", "mcdropout dropout", "melora-noise prior-noise", "elementwise"])
def test_a_method_knob_is_honoured_and_recorded_truthfully(tmp_path, flags, where, value):
    run = tmp_path / "run"
    assert main(["train", *T, "--steps", "1", *flags, "--no-eval", "--run-dir", str(run)]) == 0
    checkpoint = find_latest_checkpoint(run)
    if where[0] == "trainer":
        groups = json.loads((checkpoint / "trainer.json").read_text())["optimizer_param_groups"]
        assert groups[0]["weight_decay"] == value
        assert json.loads((run / "settings.json").read_text())["train"]["weight_decay"] == value
    else:
        assert json.loads((checkpoint / "melora.json").read_text())["config"][where[1]] == value
        assert json.loads((run / "settings.json").read_text())["adapter"][where[1]] == value


# 7. One line, exit 2, for a missing device and a checkpoint of the wrong structure

@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch without CUDA")
def test_cuda_on_a_cpu_only_torch(tmp_path, capsys):
    code, message = run_cli(capsys, "train", *T, "--device", "cuda", "--run-dir", tmp_path / "run")
    assert code == 2 and "setting device 'cuda': this torch has no CUDA device" in message, message
    assert not (tmp_path / "run").exists()


def test_trainer_json_of_the_wrong_structure(half, tmp_path, capsys):
    run = copy_of(half, tmp_path)
    (find_latest_checkpoint(run) / "trainer.json").write_text('{"step": 4}')
    code, message = run_cli(capsys, "train", "--resume", "--steps", "4", "--run-dir", run)
    assert code == 2 and "damaged training checkpoint" in message and "optimizer_param_groups" in message, message


# 8. Every setting validated before anything is written

@pytest.mark.parametrize("flags, expected", [
    (["--method", "foo"], "setting method must be one of ['zero-shot', 'mle', 'map'"),
    (["--rank", "100000"], "rank 100000 exceeds min(n, m)"),
    (["--target-modules", "nonexistent"], "target_modules ['nonexistent'] match no nn.Linear"),
    (["--seed", "4294967296"], "TrainConfig.seed must be an integer in [0, 2**32), got 4294967296"),
], ids=["method", "rank", "targets", "seed"])
def test_a_bad_setting_writes_nothing(tmp_path, capsys, flags, expected):
    run = tmp_path / "run"
    code, message = run_cli(capsys, "train", *T, *flags, "--run-dir", run)
    assert code == 2 and expected in message, message
    assert not run.exists()


def test_an_empty_evaluation_split_is_found_before_training(tmp_path, capsys):
    rows = (STORIES_DIR.parents[1] / "data" / "boolq" / "val.jsonl").read_text().splitlines()[:2]
    (tmp_path / "data" / "boolq").mkdir(parents=True)
    (tmp_path / "data" / "boolq" / "val.jsonl").write_text("\n".join(rows) + "\n")
    code, message = run_cli(capsys, "train", *T[:2], "--dataset", "boolq", "--data-dir", tmp_path / "data",
                            "--rank", "2", "--steps", "1", "--batch-size", "1", "--max-length", "256",
                            "--run-dir", tmp_path / "run")
    assert code == 2 and "boolq test: no examples" in message, message
    assert not (tmp_path / "run").exists()


# 9. The library: a failed MeLoRAModel leaves the base untouched; bad batches and tensors are one-line errors

def test_a_failed_melora_model_leaves_the_base_model_untouched():
    base, _ = load_base_model(str(STORIES_DIR))
    before = {name: p.requires_grad for name, p in base.named_parameters()}
    with pytest.raises(ValueError, match="rank 48 exceeds min"):
        MeLoRAModel(base, MeLoRAConfig(rank=48, target_modules=("q_proj", "k_proj")), [10, 11])
    assert not any(isinstance(m, MeLoRALinear) for m in base.modules())
    assert {name: p.requires_grad for name, p in base.named_parameters()} == before
    MeLoRAModel(base, MeLoRAConfig(rank=2, target_modules=("q_proj", "k_proj")), [10, 11])  # a retry works


@pytest.mark.parametrize("change, expected", [
    (dict(num_data=0), "num_data must be an integer >= the batch size 2"),
    (dict(num_data=-5), "num_data must be an integer >= the batch size 2"),
    (dict(num_data=1), "num_data must be an integer >= the batch size 2"),
    (dict(choice_mask=torch.tensor([[True, False], [True, True]]), labels=torch.tensor([1, 0])),
     "labels [1] are choices the choice_mask rules out"),
    (dict(attention_mask=torch.ones(5, dtype=torch.long)), "attention_mask must have the shape of input_ids (2, 5)"),
    (dict(attention_mask=torch.zeros(2, 5, dtype=torch.long)), "attention_mask must keep the last position"),
    (dict(choice_mask=torch.ones(2, 3, dtype=torch.bool)), "choice_mask must have shape (2, 2)"),
], ids=["num_data 0", "num_data < 0", "num_data < batch", "masked label", "mask (T,)", "mask zeros", "choice_mask"])
def test_a_bad_batch_is_one_clear_error(stories, change, expected):
    base, _ = load_base_model(str(STORIES_DIR))
    model = MeLoRAModel(base, MeLoRAConfig(rank=2), [10, 11])
    inputs = dict(input_ids=torch.randint(3, 500, (2, 5)), labels=torch.tensor([0, 1]), num_data=8)
    with pytest.raises(ValueError) as caught:
        model(**{**inputs, **change})
    assert expected in str(caught.value) and "\n" not in str(caught.value), str(caught.value)


def test_nan_adapter_tensors_in_a_checkpoint(finished, tmp_path):
    run = copy_of(finished, tmp_path)
    path = find_latest_checkpoint(run) / "adapters.safetensors"
    tensors = load_file(path)
    tensors["model.lora_A.0"][0, 0, 0] = float("nan")
    save_file(tensors, path)
    base, _ = load_base_model(str(STORIES_DIR))
    with pytest.raises(CheckpointError) as caught:
        load_adapters(path.parent, base)
    message = str(caught.value)
    assert "model tensor lora_A.0 holds non-finite values" in message and "\n" not in message and len(message) < 300


# 10. Smaller: absolute paths, umask, signals, log_every, default checkpoints, messages, --help, safe loading

def test_relative_paths_are_stored_absolute(tmp_path, monkeypatch):
    shutil.copytree(STORIES_DIR, tmp_path / "mymodel")
    monkeypatch.chdir(tmp_path)
    assert main(["train", *T[2:], "--model", "mymodel", "--steps", "1", "--no-eval", "--run-dir", "run"]) == 0
    settings = json.loads((tmp_path / "run" / "settings.json").read_text())
    assert settings["model"] == str(tmp_path / "mymodel")


def test_files_respect_the_umask(tmp_path):
    from melora_pyro._atomic import atomic_write_text

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "metrics.json", "{}")
    finally:
        os.umask(old)
    assert (tmp_path / "metrics.json").stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_training_with_a_hint_to_resume(tmp_path, sig):
    run = tmp_path / "run"
    child = start_training(run)
    try:
        child.send_signal(sig)
        assert child.wait(timeout=60) == 130
    finally:
        if child.poll() is None:
            child.kill()
    last = child.stderr.read().rstrip().splitlines()[-1]
    child.stderr.close()
    assert last.startswith("melora-pyro: interrupted") and f"--resume --run-dir {run}" in last, last
    assert not (run / "melora-run.lock").exists()


def test_log_every_and_a_default_checkpoint_interval(tmp_path, caplog):
    assert TrainConfig().checkpoint_every > 0
    with caplog.at_level("INFO"):
        assert main(["train", *T, "--log-every", "2", "--no-eval", "--run-dir", str(tmp_path / "run")]) == 0
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert [line.split()[1] for line in logged] == ["2/4", "4/4"], logged


@pytest.mark.parametrize("flags, expected", [
    (["--model", "{tmp}"], "model directory {tmp} has no config.json"),
    (["--data-dir", "{tmp}/file"], "setting data_dir: {tmp}/file is not a directory"),
], ids=["model dir without config", "data-dir is a file"])
def test_path_settings_say_what_is_wrong(tmp_path, capsys, flags, expected):
    (tmp_path / "file").write_text("x")
    flags = [f.format(tmp=tmp_path) for f in flags]
    code, message = run_cli(capsys, "train", *T, *flags, "--run-dir", tmp_path / "run")
    assert code == 2 and expected.format(tmp=tmp_path) in message, message


def test_an_empty_question(finished, capsys):
    code, message = run_cli(capsys, "predict", "--run-dir", finished, "--question", "", "--choices", "a", "b")
    assert code == 2 and "field 'question' should be a non-empty string" in message, message


def test_help_lists_methods_and_datasets(capsys):
    from melora_pyro.data import DATASETS
    from melora_pyro.methods import METHODS

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert all(name in text for name in (*METHODS, *DATASETS)), text


def test_library_and_experiments_load_torch_files_safely():
    """Every ``torch.load`` call in the package, the guides and the experiments passes weights_only=True."""
    unsafe = []
    for path in sorted(p for d in ("melora_pyro", "guides", "experiments") for p in (ROOT / d).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load"
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"
                    and not any(k.arg == "weights_only" and getattr(k.value, "value", None) is True
                                for k in node.keywords)):
                unsafe.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not unsafe, unsafe
