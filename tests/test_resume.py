"""Checkpoints: exact resume, and crash safety (SIGKILL in the middle of a checkpoint write)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from melora_pyro.checkpoint import find_latest_checkpoint, load_training_state, save_training_state
from melora_pyro.train import BatchOrder, TrainConfig, make_optimizer, train

try:  # tests/ as a package (tests/__init__.py) or as a plain directory on sys.path
    from ._distributed_worker import COMMON, build, collate, examples
except ImportError:
    from _distributed_worker import COMMON, build, collate, examples

WORKER = Path(__file__).with_name("_distributed_worker.py")
CONFIG = dict(batch_size=4, checkpoint_every=5, **COMMON)  # as the worker's sigkill mode
FILES = ("adapters.safetensors", "melora.json", "state.safetensors", "trainer.json")


def _train(run_dir, steps, resume=False):
    model, guide = build("meanfield")  # random draws of C: the RNG state must be restored exactly
    train(model, guide, examples(), collate, TrainConfig(steps=steps, **CONFIG), run_dir=run_dir, resume=resume,
          accelerator=False, progress=False)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """A run directory of 10 uninterrupted steps (checkpoints at 5 and 10)."""
    run_dir = tmp_path_factory.mktemp("straight")
    _train(run_dir, 10)
    return run_dir


def _assert_same_final_state(run_dir, reference):
    """Step-10 checkpoints equal bit for bit: A, B, guide, optimiser moments, RNGs, data order, log."""
    for name in ("adapters.safetensors", "state.safetensors"):
        ours, theirs = load_file(run_dir / "checkpoints/step-00000010" / name), \
            load_file(reference / "checkpoints/step-00000010" / name)
        assert set(ours) == set(theirs)
        assert any(k.startswith("optim.") and k.endswith("exp_avg_sq") for k in ours) or name != "state.safetensors"
        for key in ours:
            assert torch.equal(ours[key], theirs[key]), f"{name}: {key}"
    ours, theirs = (json.loads((d / "checkpoints/step-00000010/trainer.json").read_text()) for d in (run_dir, reference))
    for key in ("step", "order_position", "rng_python", "rng_numpy", "optimizer_param_groups"):
        assert ours[key] == theirs[key], key
    log, reference_log = ((d / "train_log.jsonl").read_text().splitlines() for d in (run_dir, reference))
    assert log == reference_log  # steps 1..10 once each, the same numbers


def test_five_steps_resume_five_steps_equals_ten_straight_steps(straight, tmp_path):
    _train(tmp_path, 5)
    assert find_latest_checkpoint(tmp_path).name == "step-00000005"
    _train(tmp_path, 10, resume=True)  # a fresh model and guide, restored from the checkpoint
    _assert_same_final_state(tmp_path, straight)


def test_sigkill_during_a_checkpoint_write_keeps_the_previous_one(straight, tmp_path):
    run_dir, marker = tmp_path / "run", tmp_path / "writing"
    child = subprocess.Popen([sys.executable, str(WORKER), "sigkill", str(run_dir), str(marker)],
                             env={**os.environ, "OMP_NUM_THREADS": "1"}, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not marker.exists():  # the child is inside the step-10 save, its temp directory half full
            assert child.poll() is None, f"worker exited early: {child.stderr.read()[-3000:]}"
            assert time.monotonic() < deadline, "the worker never reached the checkpoint write"
            time.sleep(0.2)
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(timeout=60) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
        child.stderr.close()
    root = run_dir / "checkpoints"
    leftovers = [p for p in root.iterdir() if p.name.startswith(".tmp-step-00000010")]
    assert leftovers and not (leftovers[0] / "trainer.json").exists()  # killed mid-write indeed
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) == ["step-00000005"]
    assert set(os.listdir(root / "step-00000005")) == set(FILES)  # final names: complete files only
    latest = find_latest_checkpoint(run_dir)
    assert latest == root / "step-00000005"
    model, guide = build("meanfield")
    order = BatchOrder(len(examples()), 4, 0)
    assert load_training_state(latest, model, guide, make_optimizer(model, guide, TrainConfig(**CONFIG)), order) == 5

    _train(run_dir, 10, resume=True)
    assert sorted(p.name for p in root.iterdir()) == ["step-00000005", "step-00000010"]  # leftover cleaned
    _assert_same_final_state(run_dir, straight)


def test_leftovers_are_ignored_then_cleaned_and_a_failed_save_changes_nothing(tmp_path, monkeypatch):
    import melora_pyro.checkpoint as checkpoint

    model, guide = build("meanfield")
    optimizer, order = make_optimizer(model, guide, TrainConfig(**CONFIG)), BatchOrder(24, 4, 0)
    save_training_state(tmp_path, 3, model, guide, optimizer, order)
    root = tmp_path / "checkpoints"
    (root / ".tmp-step-00000007-999").mkdir()  # a crashed save of another process
    (root / ".tmp-step-00000007-999" / "state.safetensors").write_bytes(b"half")
    (root / "step-0000000x").mkdir()  # not a checkpoint name
    assert find_latest_checkpoint(tmp_path) == root / "step-00000003"

    def crash(path, text):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "atomic_write_text", crash)  # trainer.json, the last file, fails
    with pytest.raises(OSError):
        save_training_state(tmp_path, 4, model, guide, optimizer, order)
    assert find_latest_checkpoint(tmp_path) == root / "step-00000003"
    monkeypatch.undo()
    save_training_state(tmp_path, 5, model, guide, optimizer, order)
    assert sorted(p.name for p in root.iterdir()) == ["step-00000003", "step-00000005", "step-0000000x"]
    save_training_state(tmp_path, 5, model, guide, optimizer, order)  # the same step again: replaced whole
    save_training_state(tmp_path, 6, model, guide, optimizer, order)  # KEEP_LAST = 2
    assert sorted(p.name for p in root.iterdir()) == ["step-00000005", "step-00000006", "step-0000000x"]
