"""Me-LoRA's linearised (GLM) predictive over q(C) (``baselines.GLMPredictiveMethod``)."""
import json
import pyro.poutine as poutine
import pytest
import torch

from melora_pyro.baselines import GLMPredictiveMethod
from melora_pyro.cli import main
from melora_pyro.methods import build_method
from melora_pyro.models import tiny_llama
from melora_pyro.train import TrainConfig

try:
    from .test_cli import QUICK
    from .test_methods import CONFIG, LABEL_IDS, _examples, collate
except ImportError:
    from test_cli import QUICK
    from test_methods import CONFIG, LABEL_IDS, _examples, collate


def _trained(**options):
    method = build_method("melora", tiny_llama, CONFIG, LABEL_IDS, predictive="glm", **options)
    method.fit(_examples(), collate, TrainConfig(steps=3, batch_size=4, lr=1e-2))
    return method


def _logits(method, batch, c):
    model = poutine.condition(method.base.model, data={"C": c})
    return model(batch["input_ids"], batch["attention_mask"], choice_mask=batch["choice_mask"])


def test_logit_covariance_is_j_omega_squared_jt_with_j_by_central_differences():
    """J diag(Omega^2) J^T with the Jacobian of the offered labels' logits in C taken by central
    differences, entry by entry of C: the covariance uses Omega (not log Omega, not Omega^2) at M."""
    method = _trained(glm_samples=1000)
    guide = method.base.guide
    with torch.no_grad():
        guide.log_scale.add_(0.5 * torch.randn_like(guide.log_scale))  # unequal widths
    batch = collate(_examples(3, seed=4))  # the last example offers 2 of the 3 labels
    mean, covariance = method.logit_moments(batch)
    loc, eps = guide.loc.detach(), 1e-3
    columns = []
    with torch.no_grad():
        for j in range(loc.numel()):
            step = torch.zeros(loc.numel()).index_fill_(0, torch.tensor(j), eps).view_as(loc)
            columns.append((_logits(method, batch, loc + step) - _logits(method, batch, loc - step)) / (2 * eps))
        assert torch.allclose(mean, _logits(method, batch, loc), atol=1e-5)
    finite = torch.isfinite(mean)
    J = torch.where(finite[..., None], torch.stack(columns, -1), torch.zeros(()))  # (batch, K, P)
    brute = torch.einsum("bkp,p,blp->bkl", J, guide.scale.detach().square().flatten(), J)
    assert brute.abs().max() > 0
    assert torch.allclose(covariance, brute, rtol=2e-2, atol=1e-3 * brute.abs().max())
    assert covariance[-1, 2].abs().max() == 0 and covariance[-1, :, 2].abs().max() == 0


def test_predict_is_a_distribution_and_the_mean_prediction_at_zero_width():
    method = _trained(glm_samples=2000, posterior_scale=1e-4)
    batch = collate(_examples(4, seed=5))
    probs = method.predict(batch, num_samples=1)
    assert torch.allclose(probs.sum(-1), torch.ones(4), atol=1e-5) and probs[-1, 2] == 0
    assert torch.allclose(probs, method.predict(batch, 0), atol=1e-4)  # no width: the posterior mean's
    wide = GLMPredictiveMethod(method.base, posterior_scale=1e4, glm_samples=2000).predict(batch, 1)
    assert wide.max(-1).values.max() < probs.max(-1).values.max()  # a wider posterior softens


def test_validation_scale_is_the_grid_point_of_least_validation_nll():
    val = _examples(8, seed=7)
    method = _trained(glm_samples=500, posterior_scale="validation", val_examples=val)
    assert set(method.selection) == set(method.selection) and len(method.selection) == 15
    assert method.posterior_scale == min(method.selection, key=method.selection.get)
    again = dict(method.selection)
    method.select_scale(collate)
    assert method.selection == again  # common random numbers: the search repeats exactly


def test_glm_options_are_refused_where_they_mean_nothing():
    with pytest.raises(ValueError, match="need predictive='glm'"):
        build_method("melora", tiny_llama, CONFIG, LABEL_IDS, posterior_scale=2.0)
    with pytest.raises(ValueError, match="needs val_examples"):
        build_method("melora", tiny_llama, CONFIG, LABEL_IDS, predictive="glm", posterior_scale="validation")
    with pytest.raises(ValueError, match="unknown options"):
        build_method("map", tiny_llama, CONFIG, LABEL_IDS, posterior_scale=2.0)
    assert not isinstance(build_method("melora", tiny_llama, CONFIG, LABEL_IDS), GLMPredictiveMethod)


def test_evaluate_scores_a_trained_run_with_the_glm_predictive(tmp_path, stories):
    run_dir = tmp_path / "run"
    assert main(["train", *QUICK, "--method", "melora", "--no-eval", "--run-dir", str(run_dir)]) == 0
    assert main(["evaluate", "--run-dir", str(run_dir), "--predictive", "glm", "--posterior-scale", "2",
                 "--glm-samples", "100"]) == 0
    [written] = run_dir.glob("eval-test-*.json")
    metrics = json.loads(written.read_text())
    assert metrics["predictive"] == "glm" and metrics["posterior_scale"] == 2.0 and metrics["n"] == 8
    assert json.loads((run_dir / "settings.json").read_text())["options"].get("predictive") is None  # the run stays
