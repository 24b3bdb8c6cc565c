"""Grids of CLI runs (``melora_pyro.grid``) and temperature scaling of a trained run, on stories260K."""
import fcntl
import json
import shutil

import pytest
import torch

from melora_pyro import MeLoRAConfig
from melora_pyro.cli import main
from melora_pyro.calibration import apply_temperature
from melora_pyro.cloze import template_for
from melora_pyro.data import load_examples
from melora_pyro.grid import Cell, GridError, archive_cells, cell_cost, is_done, read_cell, run_grid, train_log
from melora_pyro.methods import build_method
from melora_pyro.metrics import bootstrap_ci, ece, nll
from melora_pyro.models import tiny_llama
from melora_pyro.pipeline import read_predictions

from .conftest import STORIES_DIR

FLAGS = ("--model", str(STORIES_DIR), "--dataset", "toy", "--rank", "2", "--steps", "3", "--batch-size", "4",
         "--train-limit", "16", "--eval-limit", "12", "--eval-samples", "0", "--lr", "1e-2", "--max-length", "64")


def test_posthoc_temperature_equals_map_ts_trained_with_the_same_settings(tmp_path, stories):
    """``evaluate --temperature-scale`` of a map run = a ``map-ts`` run: same trained adapter, same
    validation split, same temperature and test probabilities, without training twice."""
    assert main(["train", *FLAGS, "--method", "map", "--run-dir", str(tmp_path / "map")]) == 0
    assert main(["evaluate", "--run-dir", str(tmp_path / "map"), "--temperature-scale"]) == 0
    assert main(["train", *FLAGS, "--method", "map-ts", "--run-dir", str(tmp_path / "map-ts")]) == 0
    [posthoc] = sorted((tmp_path / "map").glob("eval-test-*.json"))
    scaled, trained = json.loads(posthoc.read_text()), json.loads((tmp_path / "map-ts" / "metrics.json").read_text())
    assert scaled["temperature"] == pytest.approx(trained["temperature"], rel=1e-6)
    assert scaled["validation"] == trained["validation"] == "toy validation split (100)"
    probs, labels = read_predictions(posthoc.with_suffix(".safetensors"))
    expected, expected_labels = read_predictions(tmp_path / "map-ts" / "predictions.safetensors")
    assert torch.equal(labels, expected_labels) and torch.allclose(probs, expected, atol=1e-6)
    unscaled, _ = read_predictions(tmp_path / "map" / "predictions.safetensors")
    assert not torch.allclose(unscaled, probs)  # the temperature did change the probabilities
    assert scaled["nll"] == pytest.approx(nll(probs, labels), rel=1e-5)


def test_posthoc_temperature_of_a_bayesian_run_rescales_its_own_test_predictions(tmp_path, stories):
    """A sampled method's test split is not scored again: its stored probabilities, at the fitted T."""
    run = tmp_path / "melora"
    flags = [f if f != "0" or FLAGS[i - 1] != "--eval-samples" else "3" for i, f in enumerate(FLAGS)]
    assert main(["train", *flags, "--method", "melora", "--run-dir", str(run)]) == 0
    assert main(["evaluate", "--run-dir", str(run), "--temperature-scale"]) == 0
    [posthoc] = sorted(run.glob("eval-test-*.json"))
    metrics = json.loads(posthoc.read_text())
    assert metrics["rescaled"] == "predictions.safetensors" and metrics["eval_samples"] == 3
    probs, labels = read_predictions(posthoc.with_suffix(".safetensors"))
    stored, stored_labels = read_predictions(run / "predictions.safetensors")
    assert torch.equal(labels, stored_labels)
    assert torch.allclose(probs, apply_temperature(stored, metrics["temperature"]), atol=1e-6)
    assert metrics["nll"] == pytest.approx(nll(probs, labels), rel=1e-5)
    # asked for other samples than the run scored with, the test split is scored again
    assert main(["evaluate", "--run-dir", str(run), "--temperature-scale", "--eval-samples", "2"]) == 0
    again = json.loads(max(run.glob("eval-test-*.json"), key=lambda q: q.stat().st_mtime_ns).read_text())
    assert "rescaled" not in again and again["eval_samples"] == 2


def test_temperature_scaling_a_run_is_refused_without_a_separate_validation_split(tmp_path, stories, capsys):
    run = tmp_path / "map"
    assert main(["train", *FLAGS, "--method", "map", "--eval-split", "validation", "--run-dir", str(run)]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--run-dir", str(run), "--temperature-scale"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "validation split other than the evaluated one" in err[0]
    assert not list(run.glob("eval-*"))  # nothing half-written


def test_a_run_is_scored_on_another_dataset_as_if_it_had_been_evaluated_there(tmp_path, stories):
    """``evaluate --eval-dataset`` scores another dataset's split (its own cloze template) with the run's
    adapter: the same probabilities as a run trained alike that evaluated there at train time; with
    ``--temperature-scale`` the temperature comes from the run's own dataset, never the scored one, and
    the stored predictions of the scored dataset are rescaled."""
    flags = (*FLAGS[:FLAGS.index("--max-length")], "--max-length", "512", "--method", "map")
    ood = ("--eval-dataset", "arc-e-slice")
    assert main(["train", *flags, "--run-dir", str(tmp_path / "toy")]) == 0
    assert main(["train", *flags, *ood, "--run-dir", str(tmp_path / "direct")]) == 0
    grid = [Cell("arc", flags, run="toy", evaluate=ood), Cell("arc-ts", flags, run="toy", evaluate=(*ood, "--temperature-scale")),
            Cell("toy-ts", flags, run="toy", evaluate=("--temperature-scale",))]
    assert run_grid(grid, tmp_path, log=lambda *_: None) == {c.name: "done" for c in grid}
    probs, labels, metrics = read_cell(grid[0], tmp_path)
    expected, expected_labels = read_predictions(tmp_path / "direct" / "predictions.safetensors")
    assert torch.equal(labels, expected_labels) and torch.allclose(probs, expected, atol=1e-6)
    assert metrics["dataset"] == "arc-e-slice" and metrics["trained_on"] == "toy" and metrics["n"] == 12
    scaled_probs, _, scaled = read_cell(grid[1], tmp_path)
    assert scaled["dataset"] == "arc-e-slice" and scaled["validation"] == "toy validation split (100)"
    [plain] = [p for p in (tmp_path / "toy").glob("eval-*.json") if "temperature" not in json.loads(p.read_text())]
    assert scaled["rescaled"] == plain.with_suffix(".safetensors").name  # the arc-e-slice scoring, not train's
    assert torch.allclose(scaled_probs, apply_temperature(probs, scaled["temperature"]), atol=1e-6)
    assert read_cell(grid[2], tmp_path)[2]["rescaled"] == "predictions.safetensors"  # each cell reads its own
    direct = json.loads((tmp_path / "direct" / "metrics.json").read_text())
    toy = json.loads((tmp_path / "toy" / "metrics.json").read_text())
    assert direct["dataset"] == "arc-e-slice" and toy["dataset"] == "toy" and "trained_on" not in toy


def test_the_scored_dataset_keeps_its_own_template_and_the_run_s_dataset_its_train_split(stories):
    from melora_pyro.packing import pack_example
    from melora_pyro.pipeline import load_task
    from melora_pyro.runs import RunSettings

    from .conftest import SHARED_DIR
    settings = RunSettings(dataset="arc-e-slice", eval_dataset="obqa", data_dir=str(SHARED_DIR / "data"),
                           max_length=512, eval_limit=4, train_limit=8)
    task = load_task(settings, stories[1], log=lambda *_: None)
    for example, template in ((task.eval[0], template_for("obqa")), (task.train[0], template_for("arc-e-slice"))):
        assert task.pack(example) == pack_example(stories[1], example, template, 512)
    assert template_for("obqa") != template_for("arc-e-slice")  # so the check above tells them apart
    arc_ids = {ex.uid for ex in load_examples("arc-e-slice", "train", None)}
    assert {ex.uid for ex in task.train} <= arc_ids and not {ex.uid for ex in task.eval} & arc_ids


def test_a_grid_runs_each_cell_once_shares_training_and_reports_failures(tmp_path, stories):
    root = tmp_path / "grid"
    map_cell = Cell("toy/map", FLAGS + ("--method", "map"))
    grid = [map_cell,
            Cell("toy/map-ts", map_cell.flags, run="toy/map", evaluate=("--temperature-scale",)),
            Cell("toy/broken", FLAGS + ("--method", "map", "--rank", "0"))]
    assert not any(is_done(c, root) for c in grid)
    status = run_grid(grid, root, jobs=2, log=lambda *_: None)
    assert status["toy/map"] == status["toy/map-ts"] == "done"
    assert status["toy/broken"].startswith("failed: exit status 2")
    assert not (root / "toy" / "map-ts").exists()  # the temperature cell reused the map run
    probs, labels, metrics = read_cell(grid[0], root)
    scaled, scaled_labels, scaled_metrics = read_cell(grid[1], root)
    assert probs.shape == scaled.shape == (12, 4) and torch.equal(labels, scaled_labels)
    assert "temperature" in scaled_metrics and "temperature" not in metrics
    assert grid[1].command(root).count("melora-pyro") == 2
    cost = json.loads((root / "toy" / "map.cost.json").read_text())
    assert cost["cpu_s"] > 0 and cost["command"] == grid[0].command(root)
    log_before = (root / "toy" / "map.log").read_text()
    assert run_grid(grid[:2], root, log=lambda *_: None) == {"toy/map": "done", "toy/map-ts": "done"}
    assert (root / "toy" / "map.log").read_text() == log_before  # finished cells are not run again


def test_a_second_grid_on_the_same_root_is_refused_and_runs_nothing(tmp_path, capsys):
    """Two processes resuming one run directory would corrupt it: while one grid holds ``root``, another
    ``run_grid`` (and the comparison's CLI, with one error line) refuses before running any cell."""
    root = tmp_path / "grid"
    root.mkdir()
    cell = Cell("toy/map", FLAGS + ("--method", "map"))
    with open(root / ".grid.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # what a running grid holds (flock: per open file, so this conflicts)
        held.write("4242")
        held.flush()
        with pytest.raises(GridError, match=r"another grid \(pid 4242\) is running on"):
            run_grid([cell], root, log=lambda *_: None)
        from experiments import comparison

        from .conftest import SHARED_DIR
        assert comparison.main(["--data-dir", str(SHARED_DIR / "data"), "--datasets", "arc-e", "--seeds", "0", "--methods", "map",
                                "--root", str(root), "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: another grid")
    assert not (root / "toy").exists() and not (tmp_path / "out.md").exists()


def test_seed_lists_bootstrap_the_mean_over_seeds_on_the_same_resamples():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (200,), generator=g)
    a, b = (torch.randn(200, 4, generator=g).softmax(-1) for _ in range(2))
    assert bootstrap_ci(ece, [a], labels, [b]) == bootstrap_ci(ece, a, labels, b)
    assert bootstrap_ci(ece, [a, a], labels, [b, b]) == pytest.approx(bootstrap_ci(ece, a, labels, b))
    lo, hi = bootstrap_ci(nll, [a, b], labels, [b, b])  # the mean of (a - b) and (b - b) = 0
    single = bootstrap_ci(nll, a, labels, b)
    assert (lo, hi) == pytest.approx((single[0] / 2, single[1] / 2), abs=1e-6)


def test_init_scale_is_an_adapter_setting_the_guide_starts_from():
    config = MeLoRAConfig(rank=2, target_modules=("v_proj",), init_scale=0.3)
    method = build_method("melora", tiny_llama, config, [3, 4])
    assert torch.allclose(method.guide.log_scale.exp(), torch.tensor(0.3))
    given = build_method("melora", tiny_llama, config, [3, 4], init_scale=0.05)
    assert torch.allclose(given.guide.log_scale.exp(), torch.tensor(0.05))
    with pytest.raises(Exception, match="init_scale must be a positive number"):
        MeLoRAConfig(init_scale=0.0)


def test_archived_cells_outlive_their_run_directories(tmp_path, stories):
    """``archive_cells`` keeps metrics, predictions, cost and training log; readers and ``run_grid`` fall
    back to it."""
    root, archive = tmp_path / "runs", tmp_path / "results" / "cells"
    cell = Cell("toy/map", FLAGS + ("--method", "map"))
    assert run_grid([cell], root, log=lambda *_: None) == {"toy/map": "done"}
    probs, labels, metrics = read_cell(cell, root)
    assert archive_cells([cell, Cell("toy/never-run", FLAGS)], root, archive) == 1
    assert sorted(p.name for p in (archive / "toy").iterdir()) == ["map.cost.json", "map.json", "map.safetensors",
                                                                   "map.train_log.jsonl"]
    logged = train_log(cell, root)
    shutil.rmtree(root)
    assert logged and train_log(cell, root, archive) == logged and train_log(cell, root) == []
    assert not is_done(cell, root) and is_done(cell, root, archive)
    kept_probs, kept_labels, kept_metrics = read_cell(cell, root, archive)
    assert torch.equal(kept_probs, probs) and torch.equal(kept_labels, labels) and kept_metrics == metrics
    assert cell_cost(cell, root, archive)["cpu_s"] > 0
    assert run_grid([cell], root, archive=archive, log=lambda *_: None) == {"toy/map": "done"}
    assert not root.exists() or not (root / "toy" / "map").exists()  # nothing was trained again
    with pytest.raises(Exception, match="no results"):
        read_cell(cell, root)
    shutil.rmtree(archive)
    assert run_grid([cell], root, archive=archive, log=lambda *_: None) == {"toy/map": "done"}
    assert is_done(cell, tmp_path / "elsewhere", archive)  # archived the moment it finished


def test_comparison_grid_scales_temperatures_on_dev_and_trains_map_ts_where_there_is_none():
    from experiments import comparison

    from .conftest import SHARED_DIR
    grid = {c.name: c for c in comparison.cells(["arc-e", "wg-s"], ["zero-shot", "map-ts", "melora", "melora-ts"],
                                                [1], str(SHARED_DIR / "data"))}
    assert set(grid) == {"arc-e/zero-shot", "wg-s/zero-shot", "arc-e/map-ts-s1", "arc-e/melora-s1",
                         "arc-e/melora-ts-s1", "wg-s/map-ts-s1", "wg-s/melora-s1"}  # no dev split: no melora-ts
    assert grid["arc-e/map-ts-s1"].run_name == "arc-e/map-s1" and grid["arc-e/map-ts-s1"].evaluate
    assert grid["arc-e/melora-ts-s1"].run_name == "arc-e/melora-s1"
    wg = grid["wg-s/map-ts-s1"]
    assert wg.run_name == "wg-s/map-ts-s1" and wg.evaluate is None and "map-ts" in wg.flags
    assert "--seed" in wg.flags and wg.flags[wg.flags.index("--seed") + 1] == "1"


def test_an_option_variant_is_its_method_run_with_the_option():
    from experiments import comparison

    from .conftest import SHARED_DIR
    [cell] = comparison.cells(["arc-e"], ["melora-flipout"], [0], str(SHARED_DIR / "data"))
    assert cell.name == "arc-e/melora-flipout-s0" and comparison.method_of(cell) == "melora-flipout"
    flags = list(cell.flags)
    assert flags[flags.index("--method") + 1] == "melora" and flags[flags.index("--flipout") + 1] == "true"


def test_each_dataset_is_scored_with_the_normalisation_chosen_on_its_dev_split():
    from experiments import comparison

    from .conftest import SHARED_DIR
    grid = {c.name: list(c.flags) for c in comparison.cells(["arc-e", "arc-c"], ["zero-shot", "melora"], [0],
                                                             str(SHARED_DIR / "data"))}
    for name in ("arc-c/zero-shot", "arc-c/melora-s0"):
        assert grid[name][grid[name].index("--normalization") + 1] == "char"
    assert "--normalization" not in grid["arc-e/melora-s0"]  # ARC-E keeps the CLI's default, sum


def test_the_signal_line_says_when_no_method_is_above_chance():
    from experiments import grids
    from melora_pyro import data

    from .conftest import SHARED_DIR
    data_dir = str(SHARED_DIR / "data")
    examples = [data.without_repeated_choices(ex) for ex in data.load_examples("arc-c", "test", data_dir)]
    labels = torch.tensor([ex.label for ex in examples])
    first = torch.zeros(len(labels), 5)
    first[:, 0] = 1.0  # always the first choice: about chance
    right = torch.nn.functional.one_hot(labels, 5).float()
    chance_only = grids.signal_line({"zero-shot": [(None, first)]}, labels, "arc-c", data_dir, {})
    assert "(not above chance)" in chance_only and "No signal" in chance_only
    with_signal = grids.signal_line({"zero-shot": [(None, first)], "map": [(None, right), (None, right)]},
                                     labels, "arc-c", data_dir, {})
    assert "map 100.0 %" in with_signal and "No signal" not in with_signal
    # a two-way task with a 3:1 label imbalance: always the majority answer clears chance, not the bar
    labels = torch.tensor([0, 0, 0, 1] * 100)
    majority = torch.nn.functional.one_hot(torch.zeros_like(labels), 2).float()
    line = grids.signal_line({"zero-shot": [(None, majority)]}, labels, "boolq", data_dir, {})
    assert "majority label 75.0 %" in line and "(not above the majority label)" in line and "No signal" in line


def test_the_overfitting_grid_trains_each_epoch_count_and_seed_once_on_that_seed_s_subset():
    from experiments import overfitting

    from .conftest import SHARED_DIR
    grid = {c.name: c for c in overfitting.cells(str(SHARED_DIR / "data"), seeds=(0, 2))}
    assert set(grid) == {f"{m}-{e}ep-s{s}" for m in overfitting.METHODS for e in overfitting.EPOCHS for s in (0, 2)}
    for variant, kl_weight, antithetic in (("melora", "1", "false"), ("melora-kl0.1-pairs", "0.1", "true"),
                                           ("melora-pairs", "1", "true")):  # the same training set, its own settings
        flags = grid[f"{variant}-8ep-s2"].flags
        assert flags[flags.index("--method") + 1] == "melora"
        assert flags[flags.index("--kl-weight") + 1] == kl_weight and flags.count("--kl-weight") == 1
        assert flags[flags.index("--antithetic") + 1] == antithetic and flags.count("--antithetic") == 1
    only = overfitting.cells(str(SHARED_DIR / "data"), (1,), ("melora-pairs",), (8,))
    assert {c.name for c in only} == {"melora-pairs-8ep-s1", "melora-pairs-ts-8ep-s1"}
    assert all(c.flags[c.flags.index("--dataset") + 1] == "obqa" for c in only)
    for baseline in ("blob", "laplace"):  # the comparison's settings: posterior samples, no Me-LoRA pins
        flags = grid[f"{baseline}-8ep-s2"].flags
        assert flags[flags.index("--method") + 1] == baseline and flags[flags.index("--eval-samples") + 1] == "4"
        assert "--kl-weight" not in flags and "--antithetic" not in flags
    arc_e = overfitting.cells(str(SHARED_DIR / "data"), (1,), ("map",), (8,), dataset="arc-e")[0].flags
    assert arc_e[arc_e.index("--dataset") + 1] == "arc-e" and "--normalization" not in arc_e  # ARC-E's own: sum
    assert arc_e[arc_e.index("--train-limit") + 1] == "500" and arc_e[arc_e.index("--steps") + 1] == "500"
    for seed in (0, 2):
        for epochs in overfitting.EPOCHS:
            flags = grid[f"melora-{epochs}ep-s{seed}"].flags
            assert flags[flags.index("--train-limit") + 1] == "500" and flags[flags.index("--seed") + 1] == str(seed)
            assert int(flags[flags.index("--steps") + 1]) == -(-500 * epochs // 8)  # whole passes over the subset
            for method in ("map", "melora"):  # the temperature re-scores the run, it does not train again
                scaled = grid[f"{method}-ts-{epochs}ep-s{seed}"]
                assert scaled.run_name == f"{method}-{epochs}ep-s{seed}"
                assert scaled.evaluate == ("--temperature-scale",)
            glm = grid[f"melora-glm-{epochs}ep-s{seed}"]  # q(C) linearised: the melora run scored again on test
            assert glm.run_name == f"melora-{epochs}ep-s{seed}" and "--posterior-scale" in glm.evaluate
            assert glm.evaluate[glm.evaluate.index("--eval-split") + 1] == "test"
    assert "map-glm-8ep-s0" not in grid


def test_a_glm_cell_reports_the_glm_evaluation_and_no_other():
    from melora_pyro.grid import _evaluates

    wanted = {"dataset": "arc-e", "split": "test"}
    glm = {"dataset": "arc-e", "split": "test", "predictive": "glm", "posterior_scale": 4.0}
    plain, scaled = {"dataset": "arc-e", "split": "test"}, {"dataset": "arc-e", "split": "test", "temperature": 1.2}
    assert _evaluates(glm, wanted, scaled=False, glm=True)
    assert not _evaluates(plain, wanted, scaled=False, glm=True) and not _evaluates(scaled, wanted, scaled=False, glm=True)
    assert not _evaluates(glm, wanted, scaled=False) and _evaluates(plain, wanted, scaled=False)
    assert not _evaluates({**glm, "split": "validation"}, wanted, scaled=False, glm=True)


def test_the_ood_grid_scores_each_obqa_run_on_every_test_set_and_trains_nothing_else():
    from experiments import ood

    from .conftest import SHARED_DIR
    grid = ood.cells(("zero-shot", "map", "melora-ts"), (0, 1), ood.TESTS, str(SHARED_DIR / "data"))
    by_name = {c.name: c for c in grid}
    assert len(by_name) == len(grid) == 5 * (1 + 2 + 2)
    assert {c.run_name for c in grid} == {"obqa/zero-shot", "obqa/map-s0", "obqa/map-s1", "obqa/melora-s0",
                                          "obqa/melora-s1"}
    assert by_name["obqa/map-s1"].evaluate is None  # the in-distribution column is train's own scoring
    assert by_name["obqa/melora-ts-s0"].evaluate == ("--temperature-scale",)
    for test in ood.TESTS:
        assert by_name[f"{test}/map-s1"].evaluate == ("--eval-dataset", test)
        assert by_name[f"{test}/melora-ts-s0"].evaluate == ("--eval-dataset", test, "--temperature-scale")
        assert by_name[f"{test}/zero-shot"].run_name == "obqa/zero-shot"
    flags = by_name["obqa/melora-ts-s1"].flags  # trains (once, for all its cells) the obqa melora run of seed 1
    assert flags[flags.index("--method") + 1] == "melora" and flags[flags.index("--dataset") + 1] == "obqa"
    assert flags[flags.index("--seed") + 1] == "1"


def test_a_run_scored_on_another_split_is_not_the_train_cell_s_result(tmp_path):
    """A run directory trained by another command line (evaluated on dev, the cell asks for test) is not
    the cell's result: the archived one stands, and archiving never replaces it."""
    from melora_pyro import rundir
    from melora_pyro.pipeline import write_predictions

    root, archive = tmp_path / "runs", tmp_path / "cells"
    cell = Cell("melora-s0", ("--method", "melora", "--dataset", "arc-e", "--eval-split", "test"))
    run = root / cell.name
    run.mkdir(parents=True)
    rundir.create_marker(run)
    rundir.update_marker(run, finished=True)
    write_predictions(run / "predictions.safetensors", torch.full((2, 4), 0.25), torch.tensor([0, 1]))
    (run / "metrics.json").write_text(json.dumps({"dataset": "arc-e", "split": "validation", "n": 2}))
    assert not is_done(cell, root) and archive_cells([cell], root, archive) == 0
    (run / "metrics.json").write_text(json.dumps({"dataset": "arc-e", "split": "test", "n": 2}))
    assert is_done(cell, root) and archive_cells([cell], root, archive) == 1
