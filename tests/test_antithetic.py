"""Antithetic draws (``melora_pyro.antithetic``, ``FullWeightELBO(antithetic=True)``): the mirror is exact,
the pair cancels the likelihood-gradient noise in the guide's scale, and a point guide runs once."""
import json

import pyro
import pyro.poutine as poutine
import pytest
import torch

from guides import MeanFieldGuide
from guides.point import DeltaGuide
from melora_pyro import FullWeightELBO
from melora_pyro.antithetic import mirror, random_sites
from melora_pyro.methods import build_method
from melora_pyro.models import tiny_llama
from melora_pyro.config import MeLoRAConfig
from melora_pyro.synthetic import collate_pairs, linear_gaussian_problem


def _guide_gradients(elbo, model, guide, batch, num_data, seed=0):
    """``(grad of M, grad of log Omega)`` of ``elbo``'s loss for one batch, RNG seeded."""
    guide.zero_grad()
    pyro.set_rng_seed(seed)
    elbo.loss_terms(model, guide, batch["input_ids"], None, batch["labels"], num_data)["loss"].backward()
    return guide.loc.grad.clone(), guide.log_scale.grad.clone()


def test_the_mirror_draw_is_the_first_draw_reflected_about_the_guide_mean():
    model, X, y = linear_gaussian_problem()
    guide = MeanFieldGuide(model, init_scale=0.3)
    first = poutine.trace(guide).get_trace()
    assert random_sites(first) == ["C"]
    second = poutine.trace(mirror(first)(guide)).get_trace()
    assert torch.allclose(second.nodes["C"]["value"], 2 * guide.loc - first.nodes["C"]["value"])
    assert not torch.allclose(second.nodes["C"]["value"], first.nodes["C"]["value"])


def test_antithetic_pairs_take_the_exact_mean_gradient_and_drop_the_likelihood_gradient_at_m():
    """Linear-Gaussian likelihood (quadratic in C): a pair's gradient in M is the exact expected gradient
    (the same for every draw), and its gradient in log Omega, ``Omega eps o (H Omega eps)``, no longer
    depends on where M is; one draw's does (its ``Omega eps o grad f(M)`` term)."""
    model, X, y = linear_gaussian_problem()
    batch = collate_pairs(list(zip(X[:4], y[:4])))
    guide = MeanFieldGuide(model, init_scale=0.3)
    paired, single = FullWeightELBO(antithetic=True), FullWeightELBO()

    loc_a, scale_a = _guide_gradients(paired, model, guide, batch, len(X), seed=0)
    loc_b, _ = _guide_gradients(paired, model, guide, batch, len(X), seed=1)
    assert torch.allclose(loc_a, loc_b, atol=1e-4)
    loc_single_a, _ = _guide_gradients(single, model, guide, batch, len(X), seed=0)
    loc_single_b, _ = _guide_gradients(single, model, guide, batch, len(X), seed=1)
    assert not torch.allclose(loc_single_a, loc_single_b, atol=1e-2)

    with torch.no_grad():
        guide.loc += 1.0  # move M: the likelihood's gradient at M changes
    _, scale_moved = _guide_gradients(paired, model, guide, batch, len(X), seed=0)
    assert torch.allclose(scale_a, scale_moved, atol=1e-4)
    with torch.no_grad():
        guide.loc -= 1.0
    _, scale_single = _guide_gradients(single, model, guide, batch, len(X), seed=0)
    with torch.no_grad():
        guide.loc += 1.0
    _, scale_single_moved = _guide_gradients(single, model, guide, batch, len(X), seed=0)
    assert not torch.allclose(scale_single, scale_single_moved, atol=1e-2)


def test_the_pair_averages_two_draws_and_a_point_guide_runs_once():
    model, X, y = linear_gaussian_problem()
    batch = collate_pairs(list(zip(X[:4], y[:4])))
    calls = []
    counted = lambda *args, **kwargs: (calls.append(1), model(*args, **kwargs))[1]  # noqa: E731
    elbo = FullWeightELBO(antithetic=True, num_particles=3)
    elbo.loss_terms(counted, MeanFieldGuide(model), batch["input_ids"], None, batch["labels"], len(X))
    assert len(calls) == 6
    calls.clear()
    elbo.loss_terms(counted, DeltaGuide(model), batch["input_ids"], None, batch["labels"], len(X))
    assert len(calls) == 3


def test_antithetic_is_a_method_option_and_refuses_flipout():
    config = MeLoRAConfig(rank=2, alpha=4, target_modules=("q_proj", "v_proj"))
    method = build_method("melora", tiny_llama(), config, [3, 4], antithetic=True)
    assert method.elbo.antithetic
    weighted = build_method("melora-elementwise", tiny_llama(), config, [3, 4], antithetic=True, kl_weight=0.5)
    assert weighted.elbo.antithetic and weighted.elbo.kl_weight(1, 10, 2) == 0.5
    assert not build_method("melora", tiny_llama(), config, [3, 4], flipout=True).elbo.antithetic
    with pytest.raises(ValueError, match="antithetic draws do not combine with flipout"):
        build_method("melora", tiny_llama(), config, [3, 4], flipout=True, antithetic=True)
    with pytest.raises(ValueError, match=r"unknown options \['antithetic'\]"):
        build_method("map", tiny_llama(), config, [3, 4], antithetic=True)


def test_the_variance_study_measures_antithetic_pairs_on_a_trained_run(tmp_path, stories):
    """``experiments.flipout_variance --estimators antithetic`` on a trained stories260K ``melora`` run: the
    pair's gradient in log Omega varies less than one shared draw's (the term it cancels dominates there),
    and the report has a row per parameter group."""
    from experiments import flipout_variance
    from melora_pyro.cli import main as cli
    from tests.test_grid import FLAGS

    run_dir = tmp_path / "melora"
    assert cli(["train", *FLAGS, "--method", "melora", "--init-scale", "0.3", "--run-dir", str(run_dir)]) == 0
    out = tmp_path / "variance"
    assert flipout_variance.main(["--run-dir", str(run_dir), "--batches", "2", "--repeats", "6",
                                  "--estimators", "antithetic", "--out", str(out)]) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    trained = result["conditions"]["trained"]["estimators"]
    assert trained["ratio"]["antithetic"]["log Omega"][0] < 0.5
    table = out.with_suffix(".md").read_text()
    assert all(f"| {group} |" in table for group in flipout_variance.GROUPS) and "antithetic / shared" in table
