"""experiments.posterior_spread: disagreement statistics, and the per-draw scoring of a real trained run."""
import json
import math

import pytest
import torch

from experiments import posterior_spread
from melora_pyro.cli import main

from .test_cli import QUICK


def test_spread_is_zero_for_identical_draws_and_log2_for_two_confident_opposite_ones():
    same = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]]).expand(3, 2, 3)
    assert posterior_spread.spread(same)["disagreement"] == 0
    assert posterior_spread.spread(same)["mutual_information"] == pytest.approx(0, abs=1e-6)
    opposite = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])             # 2 draws, 1 question
    result = posterior_spread.spread(opposite)
    assert result["disagreement"] == 1
    assert result["mutual_information"] == pytest.approx(math.log(2)) == result["predictive_entropy"]


def test_measure_scores_each_draw_and_the_posterior_mean_of_a_trained_run(tmp_path, stories):
    run_dir = tmp_path / "run"  # trained and scored at the posterior mean: the reference for the mean row
    assert main(["train", *QUICK, "--method", "melora", "--eval-samples", "0", "--run-dir", str(run_dir)]) == 0
    trained = posterior_spread.load_run(posterior_spread.load_settings(run_dir), run_dir)[0].guide.scale.clone()
    result = posterior_spread.measure(run_dir, samples=3, widths=(1.0, 1e4), progress=False)
    reference = json.loads((run_dir / "metrics.json").read_text())
    assert result["n"] == reference["n"] == 8 and result["samples"] == 3
    for key in ("acc", "ece", "nll", "brier"):
        assert result["posterior_mean"][key] == pytest.approx(reference[key], abs=1e-5)
    for r in result["widths"].values():
        assert 0 <= r["disagreement"] <= 1 and -1e-6 <= r["mutual_information"] <= r["predictive_entropy"]
    # 10^4 x Omega (init 1e-2 after 4 steps: std ~100) must make the draws differ, the trained width hardly
    assert result["widths"]["10000.0"]["mutual_information"] > result["widths"]["1.0"]["mutual_information"] + 0.01
    method = posterior_spread.load_run(posterior_spread.load_settings(run_dir), run_dir)[0]
    with posterior_spread.widened(method.guide, 3.0):
        assert torch.allclose(method.guide.scale, 3 * trained)
    assert torch.equal(method.guide.scale, trained)  # restored, and the run's files never changed
    with pytest.raises(ValueError, match="samples must be >= 2"):
        posterior_spread.measure(run_dir, samples=1)
    with pytest.raises(ValueError, match="width factor -1"):
        posterior_spread.measure(run_dir, samples=2, widths=(-1.0,))
    assert posterior_spread.main(["--run-dir", str(tmp_path / "missing")]) == 2


def test_a_random_subspace_keeps_the_posterior_mean_model_and_the_weight_space_spread(tmp_path, stories):
    run_dir = tmp_path / "run"
    assert main(["train", *QUICK, "--method", "melora", "--eval-samples", "0", "--run-dir", str(run_dir)]) == 0
    method = posterior_spread.load_run(posterior_spread.load_settings(run_dir), run_dir)[0]
    trained = posterior_spread.weight_reach.reach(method)
    posterior_spread.randomise_subspace(method, seed=0)
    swapped = posterior_spread.weight_reach.reach(method)
    for before, after in zip(trained, swapped):
        assert after["spread"] == pytest.approx(before["spread"], rel=1e-4) and after["mean"] == 0
    for a in method.model.lora_A[0]:  # orthonormal rows: a subspace training did not choose
        assert torch.allclose(a @ a.T, torch.eye(a.shape[0]), atol=1e-5)
    # the posterior mean now lives in W0: scoring at it gives what train wrote
    result = posterior_spread.measure(run_dir, samples=2, progress=False, random_subspace=True)
    reference = json.loads((run_dir / "metrics.json").read_text())
    for key in ("acc", "ece", "nll", "brier"):
        assert result["posterior_mean"][key] == pytest.approx(reference[key], abs=1e-5)
    assert result["random_subspace"] and "random subspace" in posterior_spread.markdown(result, "cmd")
