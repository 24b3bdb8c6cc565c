"""The melora-pyro command on the real stories260K model and the embedded toy task."""
import json

import pytest

from melora_pyro.cli import main

from .conftest import STORIES_DIR

QUICK = ["--model", str(STORIES_DIR), "--dataset", "toy", "--rank", "2", "--steps", "4",
         "--batch-size", "4", "--train-limit", "16", "--eval-limit", "8", "--eval-samples", "2",
         "--lr", "1e-3", "--max-length", "64"]


@pytest.fixture
def trained_run(tmp_path, stories):
    run_dir = tmp_path / "run"
    assert main(["train", *QUICK, "--method", "melora", "--checkpoint-every", "2", "--run-dir", str(run_dir)]) == 0
    return run_dir


def test_train_writes_the_run_directory(trained_run):
    names = {p.name for p in trained_run.iterdir()}
    assert {"settings.json", "train_log.jsonl", "checkpoints", "metrics.json", "summary.md",
            "reliability.png"} <= names
    log = [json.loads(line) for line in (trained_run / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and all("kl" in r and "acc" in r for r in log)
    metrics = json.loads((trained_run / "metrics.json").read_text())
    assert metrics["n"] == 8 and 0 <= metrics["acc"] <= 1 and metrics["nll"] > 0
    assert json.loads((trained_run / "settings.json").read_text())["adapter"]["rank"] == 2
    assert "| melora | 8 |" in (trained_run / "summary.md").read_text()
    assert (trained_run / "reliability.png").read_bytes()[:4] == b"\x89PNG"


def test_evaluate_reproduces_train_time_metrics(trained_run, capsys):
    before = json.loads((trained_run / "metrics.json").read_text())
    assert main(["evaluate", "--run-dir", str(trained_run), "--eval-samples", "0"]) == 0
    assert "ACC" in capsys.readouterr().out
    [written] = trained_run.glob("eval-test-*.json")
    after = json.loads(written.read_text())
    assert after["eval_samples"] == 0 and after["n"] == before["n"]
    assert json.loads((trained_run / "metrics.json").read_text()) == before  # train's results stay


def test_predict_prints_probabilities(trained_run, capsys):
    assert main(["predict", "--run-dir", str(trained_run), "--question", "What is 10 + 11?",
                 "--choices", "21", "20", "31", "12"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(row["probs"]) == {"21", "20", "31", "12"}
    assert abs(sum(row["probs"].values()) - 1) < 1e-3


def test_existing_run_dir_is_not_overwritten(trained_run, capsys):
    assert main(["train", *QUICK, "--run-dir", str(trained_run)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err


def test_tuple_and_optional_flags_parse():
    from melora_pyro.cli import _parser, _settings

    args = _parser().parse_args(["train", "--run-dir", "r", "--target-modules", "q_proj", "v_proj", "lm_head",
                                 "--guide-lr", "0.01", "--train-limit", "5"])
    settings = _settings(args)
    assert settings.adapter.target_modules == ("q_proj", "v_proj", "lm_head")
    assert settings.train.guide_lr == 0.01 and settings.train_limit == 5


def test_toml_config_and_flags(tmp_path, stories, capsys):
    config = tmp_path / "run.toml"
    config.write_text('method = "map"\n[adapter]\nrank = 3\n[train]\nsteps = 2\n')
    run_dir = tmp_path / "run"
    assert main(["train", "--config", str(config), *QUICK[:-8], "--steps", "3", "--train-limit", "8",
                 "--eval-limit", "4", "--run-dir", str(run_dir)]) == 0
    settings = json.loads((run_dir / "settings.json").read_text())
    assert settings["method"] == "map" and settings["adapter"]["rank"] == 2  # the flag wins
    assert settings["train"]["steps"] == 3
    config.write_text("[adapter]\nrnak = 3\n")
    assert main(["train", "--config", str(config), "--run-dir", str(tmp_path / "other")]) == 2
    assert "unknown keys ['rnak']" in capsys.readouterr().err


def test_demo_runs_its_four_methods_on_the_embedded_slice(tmp_path, stories, capsys):
    run_dir = tmp_path / "demo"
    assert main(["demo", "--model", str(STORIES_DIR), "--rank", "2", "--steps", "2", "--train-limit", "16",
                 "--eval-limit", "12", "--eval-samples", "2", "--max-length", "1024", "--run-dir", str(run_dir)]) == 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert list(metrics) == ["zero-shot", "map", "map-ts", "melora"]
    assert all(m["dataset"] == "arc-e-slice" and m["n"] == 12 for m in metrics.values())
    assert metrics["map-ts"]["validation"] and metrics["map-ts"]["temperature"] > 0
    summary = (run_dir / "summary.md").read_text()
    assert "| melora - map |" in summary and "| melora - map-ts |" in summary and "| map - zero-shot |" in summary
    assert summary in capsys.readouterr().out


def test_method_options_are_flags_that_reach_the_method(stories):
    from melora_pyro.cli import _parser, _settings
    from melora_pyro.pipeline import build_run

    def built(*flags):
        args = _parser().parse_args(["train", *QUICK, *flags, "--run-dir", "unused"])
        return build_run(_settings(args), progress=False)[0]

    laplace = built("--method", "laplace", "--prior-precision", "3", "--max-fisher-examples", "6",
                    "--fisher", "empirical", "--predictive", "weights", "--glm-samples", "7")
    assert (laplace.precision_rule, laplace.max_fisher_examples, laplace.fisher_kind, laplace.predictive,
            laplace.glm_samples) == (3.0, 6, "empirical", "weights", 7)
    assert built("--method", "laplace").precision_rule == "marglik"
    ensemble = built("--method", "ensemble", "--ensemble-size", "2", "--aggregate", "probs")
    assert len(ensemble.members) == 2 and ensemble.aggregate == "probs"
    blob = built("--method", "blob", "--kl-lr", "0.5", "--kl-reweighting", "false")
    assert blob.update.kl_lr == 0.5 and blob.update.kl_reweighting is False
    assert built("--method", "melora", "--flipout", "true").flipout and not built("--method", "melora").flipout
    assert built("--method", "melora-elementwise", "--kl-weight", "4").elbo.kl_weight(1, 10, 2) == 4.0


def test_an_option_the_method_does_not_take_is_refused(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["train", *QUICK, "--method", "map", "--glm-samples", "5", "--run-dir", str(run_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["melora-pyro: error: [options] method 'map': unknown options ['glm_samples']; "
                   "it takes ['weight_decay', 'seed']"]
    assert not run_dir.exists()


def test_laplace_options_from_the_cli(tmp_path, stories):
    from melora_pyro.cli import _parser, _settings
    from melora_pyro.pipeline import build_run

    args = _parser().parse_args(["train", *QUICK, "--method", "laplace", "--prior-precision", "validation",
                                 "--run-dir", "unused"])
    searching, task = build_run(_settings(args), progress=False)
    assert len(searching.val_examples) == 100 and len(task.train) == 16  # toy's validation split, train kept
    run_dir = tmp_path / "run"
    assert main(["train", *QUICK, "--method", "laplace", "--prior-precision", "3", "--predictive", "weights",
                 "--run-dir", str(run_dir)]) == 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["prior_precision"] == 3.0 and metrics["n"] == 8
    assert json.loads((run_dir / "settings.json").read_text())["options"]["predictive"] == "weights"
