"""experiments.laplace_layers: LAP's GLM predictive restricted to one kind of layer, on a real fitted run."""
import json

import pytest
import torch

from experiments import laplace_layers
from melora_pyro.cli import main

from .test_cli import QUICK


def test_kinds_decompose_the_glm_covariance_and_the_report_is_written(tmp_path, stories):
    run_dir = tmp_path / "laplace"
    assert main(["train", *QUICK, "--method", "laplace", "--prior-precision", "3", "--eval-samples", "0",
                 "--run-dir", str(run_dir)]) == 0
    fitted, task = laplace_layers.load_run(laplace_layers.load_settings(run_dir), run_dir)
    masks = laplace_layers.kind_masks(fitted)
    assert list(masks) == ["q_proj", "v_proj"]
    assert sum(m.long() for m in masks.values()).eq(1).all()  # every entry in exactly one kind
    # Each kind holds r (n + m) entries per layer of that kind, W0 being m x n.
    model = fitted.map.model
    for kind, mask in masks.items():
        shapes = [model.base.get_submodule(name).base.weight.shape for name in model.layer_names
                  if name.endswith(kind)]
        assert int(mask.sum()) == sum(model.rank * (n + m) for m, n in shapes)

    variance = torch.cat([std.square().flatten() for std in fitted.posterior_std()])
    batch = task.collate(task.eval[:3])
    mean, covariances = fitted.glm_covariances(batch, [variance, *(variance * m for m in masks.values())])
    full, *parts = covariances
    reference_mean, reference = fitted.glm_logits(batch)
    assert torch.equal(mean, reference_mean) and torch.allclose(full, reference)
    assert torch.allclose(sum(parts), full, atol=1e-6) and all(p.abs().sum() > 0 for p in parts)
    # The prior-held entries are those whose posterior variance is the prior's within 1%.
    held = torch.cat([m.flatten() for m in fitted.prior_held()])
    assert 0 < int(held.sum()) < held.numel()
    assert torch.allclose(variance[held] * fitted.prior_precision, torch.ones(()), rtol=0.011)
    assert variance[~held].max() * fitted.prior_precision < 0.991

    out = tmp_path / "layers-s0.1"
    assert laplace_layers.main(["--run-dir", str(run_dir), "--eval-split", "test", "--out", str(out)]) == 0
    result = json.loads((tmp_path / "layers-s0.1.json").read_text())
    assert list(result["variants"]) == ["map", "all", "q_proj only", "v_proj only", "at prior", "data-constrained"]
    assert result["shares"]["at prior"] + result["shares"]["data-constrained"] == pytest.approx(1.0)
    assert result["n"] == 8 and result["prior_precision"] == 3.0


def test_refuses_a_run_that_is_not_laplace(tmp_path, stories):
    run_dir = tmp_path / "map"
    assert main(["train", *QUICK, "--method", "map", "--eval-samples", "0", "--run-dir", str(run_dir)]) == 0
    assert laplace_layers.main(["--run-dir", str(run_dir)]) == 2
