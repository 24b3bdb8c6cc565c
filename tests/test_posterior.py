"""The posterior trains: default optimisation reaches a known optimum, and the synthetic task is learnt."""
import json
import math

import pyro
import pytest
import torch

from guides import MeanFieldGuide
from melora_pyro import FullWeightELBO, MeLoRAConfig, MeLoRAModel
from melora_pyro.methods import build_method
from melora_pyro.models import tiny_llama
from melora_pyro.synthetic import collate_pairs, linear_gaussian_problem, marked_token_task
from melora_pyro.train import TrainConfig, make_optimizer, train


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_default_training_reaches_the_known_gaussian_optimum(seed):
    """Through MeanFieldGuide and train() with its default ELBO and TrainConfig() (antithetic pairs of C,
    batch 4 of 8 examples, 300 steps): M within 10% (Frobenius) of the exact posterior mean, Omega within
    10% of the optimum's in the geometric mean over its entries (mean |log(Omega / Omega_opt)| < 0.1),
    every entry within 50%.

    ``python -m experiments.known_optimum`` (results/known_optimum.md, 6 problem seeds): with the pairs
    the mean |log| error is 0.05-0.09 on every seed; with single draws it was 0.09-0.23 (over 0.1 on 5 of
    6), because the noise of the likelihood's gradient at M, which the pair cancels, biased log Omega low
    at Adam's constant rate. What is left is that constant rate's noise: the largest error of Omega's
    10/50/90% quantiles is 0.02-0.15 (single draws: 0.11-0.33)."""
    pyro.set_rng_seed(0)
    model, X, y = linear_gaussian_problem(seed)
    M_opt, omega_opt = model.optimum(X, y)
    guide = MeanFieldGuide(model)
    history = train(model, guide, list(zip(X, y)), collate_pairs, TrainConfig(), progress=False)
    M, omega = guide.loc.detach()[0], guide.scale.detach()[0]
    assert (M - M_opt).norm() / M_opt.norm() < 0.1
    assert (omega / omega_opt).log().abs().mean() < 0.1, omega / omega_opt
    assert torch.all((omega / omega_opt - 1).abs() < 0.5), omega / omega_opt
    assert history[-1]["omega_median"] == pytest.approx(omega.median().item(), rel=0.5)  # the logged statistics


def test_single_draws_miss_the_known_optimum_that_antithetic_pairs_reach():
    """The same training with ``FullWeightELBO()`` (one draw per step) on problem seed 0: Omega's mean
    |log| error is above 0.1 (0.135 measured), so the test above can fail."""
    pyro.set_rng_seed(0)
    model, X, y = linear_gaussian_problem(0)
    _, omega_opt = model.optimum(X, y)
    guide = MeanFieldGuide(model)
    train(model, guide, list(zip(X, y)), collate_pairs, TrainConfig(), elbo=FullWeightELBO(), progress=False)
    assert (guide.scale.detach()[0] / omega_opt).log().abs().mean() > 0.1


@pytest.mark.slow  # two trainings of 3,000 steps: about 20 s
@pytest.mark.parametrize("seed", [0, 1])
def test_annealed_training_reaches_the_known_optimum_within_10_percent(seed):
    """The issue's 10% for every quantile of Omega, where the study (experiments.known_optimum) finds it
    reachable: the default guide, ELBO and rates with the learning rates decayed linearly to 0 over 3,000
    steps."""
    pyro.set_rng_seed(0)
    model, X, y = linear_gaussian_problem(seed)
    M_opt, omega_opt = model.optimum(X, y)
    guide = MeanFieldGuide(model)
    train(model, guide, list(zip(X, y)), collate_pairs, TrainConfig(steps=3000, lr_schedule="linear"), progress=False)
    M, omega = guide.loc.detach()[0], guide.scale.detach()[0]
    assert (M - M_opt).norm() / M_opt.norm() < 0.1
    q = torch.tensor([0.1, 0.5, 0.9])
    found, wanted = torch.quantile(omega.flatten(), q), torch.quantile(omega_opt.flatten(), q)
    assert torch.all((found / wanted - 1).abs() < 0.1), (found, wanted)


def test_guide_groups_have_their_own_rates_and_zero_freezes():
    model, X, y = linear_gaussian_problem()
    guide = MeanFieldGuide(model)
    optimizer = make_optimizer(model, guide, TrainConfig(lr=1e-4, guide_lr=0.0, guide_scale_lr=0.05))
    rates = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    assert rates == {id(guide.loc): 0.0, id(guide.log_scale): 0.05}
    before = guide.loc.detach().clone()
    train(model, guide, list(zip(X, y)), collate_pairs, TrainConfig(steps=3, guide_lr=0.0), progress=False)
    assert torch.equal(guide.loc, before)
    assert not torch.allclose(guide.scale, torch.full_like(guide.scale, 1e-2))


@pytest.mark.parametrize("field", ["guide_lr", "guide_scale_lr"])
def test_guide_rates_refuse_none_and_negative(field):
    for bad in (None, -1.0):
        with pytest.raises(ValueError, match=f"TrainConfig.{field} must be a finite number >= 0"):
            TrainConfig(**{field: bad})


def test_log_records_kl_and_omega_quantiles(tmp_path):
    model = MeLoRAModel(tiny_llama(), MeLoRAConfig(rank=2), [10, 11, 12, 13])
    ids, labels = marked_token_task(8, seed=0)
    train(model, MeanFieldGuide(model), list(zip(ids, labels)), collate_pairs, TrainConfig(steps=2), run_dir=tmp_path,
          progress=False)
    records = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert len(records) == 2
    for r in records:
        assert {"kl", "omega_q10", "omega_median", "omega_q90"} <= set(r)
        assert 0 < r["omega_q10"] <= r["omega_median"] <= r["omega_q90"] and math.isfinite(r["kl"])


@pytest.mark.slow  # twelve trainings of 150 steps on a tiny model: about 1-2 minutes on 2 shared cores
def test_default_melora_learns_the_synthetic_task_about_as_well_as_plain_lora():
    """build_method("melora") with default settings against plain LoRA (``mle``: IdentityGuide) in the
    same budget: mean accuracy over 3 task draws x 2 seeds within 5 points, and Omega has left its initial
    value. One run's accuracy difference has a standard error of about 3 points (256 test questions): a
    single seed could not resolve 5 points. Measured with the defaults of 2026-12-03 (antithetic pairs, KL
    weight 0.1; per run, mle / melora): 0.738 / 0.699, 0.688 / 0.727, 0.805 / 0.750, 0.809 / 0.785,
    0.816 / 0.773, 0.766 / 0.781; means 0.770 / 0.753 (single draws and the ELBO: 0.748)."""
    config = MeLoRAConfig(rank=4, target_modules=("q_proj", "v_proj", "lm_head"))
    settings = TrainConfig(steps=150, batch_size=32, lr=1e-2)
    accuracy = {"mle": [], "melora": []}
    for task_seed in (1, 3, 5):
        train_x, train_y = marked_token_task(256, seed=task_seed)
        test_x, test_y = marked_token_task(256, seed=task_seed + 1)
        for seed in (0, 1):
            for name in accuracy:
                method = build_method(name, tiny_llama, config, [10, 11, 12, 13], seed=seed)
                method.fit(list(zip(train_x, train_y)), collate_pairs, settings)
                probs = method.predict({"input_ids": test_x, "labels": test_y}, num_samples=4)
                accuracy[name].append((probs.argmax(-1) == test_y).float().mean().item())
    mean = {name: sum(values) / len(values) for name, values in accuracy.items()}
    assert mean["mle"] > 0.6, accuracy  # the task is learnt at all (chance: 0.25)
    assert mean["melora"] >= mean["mle"] - 0.05, accuracy
    omega = method.guide.scale
    assert (omega.log() - math.log(1e-2)).abs().median() > 1.0  # moved by more than a factor e
