"""experiments.weight_reach: the closed-form mean and spread of dW against Monte Carlo draws of real runs."""
import pytest
import torch
from pyro import poutine

from experiments import weight_reach
from melora_pyro.cli import main

from .test_cli import QUICK


def _monte_carlo(model, guide, draws: int) -> tuple[list[float], list[float]]:
    """|E dW|_F and sqrt(E |dW - E dW|^2) per layer, from ``draws`` samples of the guide through the model."""
    def updates(trace=None, data=None):
        sampler = poutine.replay(model.sample_adapters, trace=trace) if trace else \
            poutine.condition(model.sample_adapters, data=data)
        A, B, C = sampler()
        A, B = weight_reach._unbind(A), weight_reach._unbind(B)
        return [model.config.scaling * b @ c @ a for a, b, c in zip(A, B, C.unbind(0))]

    with torch.no_grad():
        mean = updates(data=guide.posterior_mean())
        squares = [0.0] * len(mean)
        for _ in range(draws):
            for i, (dw, mu) in enumerate(zip(updates(trace=poutine.trace(guide).get_trace()), mean)):
                squares[i] += float((dw - mu).square().sum()) / draws
    return [float(m.norm()) for m in mean], [s ** 0.5 for s in squares]


@pytest.mark.parametrize("method", ["melora", "blob"])
def test_reach_matches_monte_carlo_draws_of_a_trained_run(tmp_path, stories, method):
    run_dir = tmp_path / method
    assert main(["train", *QUICK, "--method", method, "--eval-samples", "0", "--run-dir", str(run_dir)]) == 0
    trained = weight_reach.load_run(weight_reach.load_settings(run_dir), run_dir)[0]
    rows = weight_reach.reach(trained)
    assert [r["layer"] for r in rows] == trained.model.layer_names
    torch.manual_seed(0)
    means, spreads = _monte_carlo(trained.model, trained.guide, draws=2000)
    for row, mean, spread in zip(rows, means, spreads):
        assert row["mean"] == pytest.approx(mean, rel=1e-4)
        assert row["spread"] == pytest.approx(spread, rel=0.05) and row["spread"] > 0
        assert row["linear"] == row["spread"] and row["w0"] > 0
    out = tmp_path / "reach-kl0.1"  # a dot in the name: the suffixes are appended, not substituted
    assert weight_reach.main(["--run-dir", str(run_dir), "--out", str(out)]) == 0
    assert sorted(p.name for p in tmp_path.glob("reach*")) == ["reach-kl0.1.json", "reach-kl0.1.md"]
    assert (tmp_path / "reach-kl0.1.md").read_text().count("\n| ") == len(rows) + 1  # header + a row per layer


def test_laplace_reach_matches_monte_carlo_draws_of_its_posterior(tmp_path, stories):
    run_dir = tmp_path / "laplace"
    assert main(["train", *QUICK, "--method", "laplace", "--prior-precision", "3", "--predictive", "weights",
                 "--eval-samples", "0", "--run-dir", str(run_dir)]) == 0
    fitted = weight_reach.load_run(weight_reach.load_settings(run_dir), run_dir)[0]
    rows = weight_reach.reach(fitted)
    model, s, groups = fitted.map.model, fitted.map.model.config.scaling, len(fitted.map.model.lora_A)
    A, B = weight_reach._unbind(model.lora_A), weight_reach._unbind(model.lora_B)
    stds = fitted.posterior_std()
    a_std, b_std = weight_reach._unbind(stds[:groups]), weight_reach._unbind(stds[groups:])
    torch.manual_seed(0)
    draws, full, linear = 2000, [0.0] * len(A), [0.0] * len(A)
    with torch.no_grad():
        for _ in range(draws):
            for i, (a, b, sa, sb) in enumerate(zip(A, B, a_std, b_std)):
                da, db = torch.randn_like(a) * sa, torch.randn_like(b) * sb
                full[i] += float((s * ((b + db) @ (a + da) - b @ a)).square().sum()) / draws
                linear[i] += float((s * (db @ a + b @ da)).square().sum()) / draws
    assert [r["layer"] for r in rows] == model.layer_names
    for row, a, b, f, lin in zip(rows, A, B, full, linear):
        assert row["mean"] == pytest.approx(float((s * b @ a).detach().norm()), rel=1e-5)
        assert row["spread"] == pytest.approx(f ** 0.5, rel=0.05)
        assert row["linear"] == pytest.approx(lin ** 0.5, rel=0.05) and 0 < row["linear"] < row["spread"]
        assert 0 <= row["prior_share"] <= 1
    # At a prior precision far above every curvature each parameter is left at the prior.
    fitted.prior_precision = 1000 * max(float(f.max()) for f in fitted.fisher) + 1
    assert all(r["prior_share"] == pytest.approx(1.0) for r in weight_reach.reach(fitted))


def test_reach_refuses_a_method_it_cannot_read_and_a_missing_run(tmp_path):
    with pytest.raises(ValueError, match="needs a mean-field guide on C, BLoB's guide on A or a Laplace"):
        weight_reach.reach(object())
    assert weight_reach.main(["--run-dir", str(tmp_path / "missing")]) == 2
