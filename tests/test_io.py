"""Save / load / merge of adapters and guides."""
import json

import pyro
import pytest
import torch
from pyro.infer import SVI

from guides import DeltaGuide, MeanFieldGuide
from melora_pyro import (CheckpointError, FullWeightELBO, MeLoRAConfig, MeLoRAModel, load_adapters,
                         merge_adapters, predict_proba, save_adapters)
from melora_pyro.models import tiny_llama

LABELS = [10, 11, 12, 13]
CONFIG = MeLoRAConfig(rank=4, target_modules=("q_proj", "v_proj", "lm_head"))


@pytest.fixture
def trained():
    pyro.set_rng_seed(0)
    model = MeLoRAModel(tiny_llama(), CONFIG, LABELS)
    guide = MeanFieldGuide(model, init_scale=0.1)
    ids, y = torch.randint(0, 128, (8, 7)), torch.randint(0, 4, (8,))
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 2e-2}), FullWeightELBO())
    for _ in range(5):
        svi.step(ids, None, y, 8)
    return model, guide, ids


def test_save_load_into_fresh_base_reproduces_predictions(trained, tmp_path):
    model, guide, ids = trained
    save_adapters(tmp_path, model, guide)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapters.safetensors", "melora.json"]
    loaded, loaded_guide = load_adapters(tmp_path, tiny_llama())
    assert isinstance(loaded_guide, MeanFieldGuide)
    for n in (0, 3):
        pyro.set_rng_seed(1)
        expected = predict_proba(model, guide, ids, num_samples=n)
        pyro.set_rng_seed(1)
        assert torch.equal(predict_proba(loaded, loaded_guide, ids, num_samples=n), expected)


def test_merged_export_equals_posterior_mean_adapter_model(trained):
    model, guide, ids = trained
    expected = predict_proba(model, guide, ids, num_samples=0)
    embedding_before = model.base.get_input_embeddings().weight.detach().clone()
    merged = merge_adapters(model, guide)
    assert not any("MeLoRA" in type(m).__name__ for m in merged.modules())
    logits = merged(input_ids=ids).logits[:, -1, LABELS]
    assert torch.allclose(logits.softmax(-1), expected, atol=1e-5)
    assert torch.equal(merged.get_input_embeddings().weight, embedding_before)  # lm_head was untied


def test_load_rejects_a_checkpoint_that_does_not_fit(trained, tmp_path):
    model, guide, _ = trained
    save_adapters(tmp_path, model, guide)
    with pytest.raises(CheckpointError, match="shape"):
        load_adapters(tmp_path, tiny_llama(hidden=64, heads=4, kv_heads=2))
    with pytest.raises(CheckpointError, match="needs melora.json"):
        load_adapters(tmp_path / "missing", tiny_llama())
    meta = json.loads((tmp_path / "melora.json").read_text())
    meta["config"]["target_modules"] = ["nonexistent"]
    (tmp_path / "melora.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="does not fit the base model.*nonexistent"):
        load_adapters(tmp_path, tiny_llama())


def test_checkpoint_is_not_pickle(trained, tmp_path):
    model, _, _ = trained
    save_adapters(tmp_path, model, DeltaGuide(model))
    head = (tmp_path / "adapters.safetensors").read_bytes()[:16]
    assert not head.startswith(b"\x80")  # pickle protocol marker
    assert json.loads((tmp_path / "melora.json").read_text())["guide"] == "DeltaGuide"
