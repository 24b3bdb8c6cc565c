"""peft in and out on the real stories260K model: export to a peft adapter / merged checkpoint, import a
peft-trained LoRA as Me-LoRA, and the CLI ``export`` / ``train --init-from-peft --freeze-ab``."""
import json

import pyro
import pyro.poutine as poutine
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from guides import IdentityGuide, MeanFieldGuide
from melora_pyro import CheckpointError, MeLoRAConfig, MeLoRAModel, load_adapters, predict_proba
from melora_pyro.cli import main
from melora_pyro.export import ExportError, export_merged, export_peft
from melora_pyro.models import load_base_model

from .conftest import STORIES_DIR

peft = pytest.importorskip("peft")
LABELS = list(range(3, 500, 9))  # many label tokens: the comparison sees much of the vocabulary
TARGETS = ("q_proj", "v_proj", "lm_head")  # lm_head is tied to the embedding in stories260K


def fresh_base():
    if not STORIES_DIR.is_dir():
        pytest.skip(f"{STORIES_DIR} not found (set MELORA_SHARED_DIR)")
    return load_base_model(str(STORIES_DIR))[0]


def inputs():
    generator = torch.Generator().manual_seed(0)
    return torch.randint(3, 512, (3, 11), generator=generator)


def posterior_mean_logits(model, guide, ids):
    return poutine.condition(model, data=guide.posterior_mean())(ids)


@pytest.fixture
def trained():
    """A Me-LoRA model and guide far from their initialisation (B, M and Omega all non-trivial)."""
    pyro.set_rng_seed(0)
    model = MeLoRAModel(fresh_base(), MeLoRAConfig(rank=4, alpha=8.0, target_modules=TARGETS), LABELS)
    guide = MeanFieldGuide(model, init_scale=0.05)
    with torch.no_grad():
        for b in model.lora_B:
            b.normal_(0, 0.3)
        guide.loc.add_(0.5 * torch.randn_like(guide.loc))
        guide.log_scale.add_(0.3 * torch.randn_like(guide.log_scale))
    return model, guide


def test_peft_export_loads_in_peft_with_our_posterior_mean_logits(trained, tmp_path):
    model, guide = trained
    ids = inputs()
    expected = posterior_mean_logits(model, guide, ids)
    out = export_peft(model, guide, tmp_path / "adapter")
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], sorted(config["target_modules"])) == (4, 8.0, sorted(TARGETS))
    peft_model = peft.PeftModel.from_pretrained(fresh_base(), out).eval()
    with torch.no_grad():
        got = peft_model(input_ids=ids).logits[:, -1, LABELS]
        base_logits = fresh_base()(input_ids=ids).logits[:, -1, LABELS]
    assert (expected - base_logits).abs().max() > 0.1  # the adapter changes the output
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_peft_export_keeps_the_posterior_for_load_adapters(trained, tmp_path):
    model, guide = trained
    ids = inputs()
    pyro.set_rng_seed(1)
    expected = predict_proba(model, guide, ids, num_samples=3)
    loaded, loaded_guide = load_adapters(export_peft(model, guide, tmp_path / "adapter"), fresh_base())
    assert torch.equal(loaded_guide.log_scale, guide.log_scale)
    pyro.set_rng_seed(1)
    assert torch.equal(predict_proba(loaded, loaded_guide, ids, num_samples=3), expected)


def test_merged_export_equals_the_posterior_mean_model(trained, tmp_path):
    model, guide = trained
    ids = inputs()
    expected = posterior_mean_logits(model, guide, ids)
    embedding = model.base.get_input_embeddings().weight.detach().clone()
    out = export_merged(model, guide, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not any("MeLoRA" in type(m).__name__ for m in merged.modules())
    with torch.no_grad():
        # float32: W0 + s B M A summed first rounds differently from W0 x + s B (M (A x)); CI saw 1.9e-5
        torch.testing.assert_close(merged(input_ids=ids).logits[:, -1, LABELS], expected, atol=1e-4, rtol=1e-4)
    assert torch.equal(merged.get_input_embeddings().weight, embedding)  # the tied lm_head was untied


def test_export_refuses_a_non_empty_directory_and_leaves_nothing_half_written(trained, tmp_path, monkeypatch):
    model, guide = trained
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "mine.txt").write_text("keep")
    with pytest.raises(ExportError, match="not empty"):
        export_peft(model, guide, taken)
    assert [p.name for p in taken.iterdir()] == ["mine.txt"]

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("melora_pyro.export.save_adapters", crash)
    with pytest.raises(OSError, match="disk full"):
        export_peft(model, guide, tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]  # no output, no temporary directory


@pytest.fixture
def peft_adapter(tmp_path):
    """A peft LoRA adapter made with peft's own API, with non-zero B (peft starts B at zero)."""
    torch.manual_seed(0)
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=list(TARGETS), task_type="CAUSAL_LM")
    peft_model = peft.get_peft_model(fresh_base(), config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    peft_model.save_pretrained(tmp_path / "peft")
    return tmp_path / "peft", peft_model.eval()


def test_from_peft_first_forward_equals_the_peft_model(peft_adapter):
    adapter_dir, peft_model = peft_adapter
    ids = inputs()
    model = MeLoRAModel.from_peft(fresh_base(), adapter_dir, LABELS, prior_std=0.5)
    assert (model.config.rank, model.config.alpha, model.config.prior_std) == (4, 16.0, 0.5)
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits[:, -1, LABELS]
    for guide in (MeanFieldGuide(model), IdentityGuide(model)):
        torch.testing.assert_close(posterior_mean_logits(model, guide, ids), expected, atol=1e-5, rtol=1e-5)


def test_from_peft_rejects_what_it_cannot_compute(peft_adapter, tmp_path):
    adapter_dir, _ = peft_adapter
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    (adapter_dir / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(CheckpointError, match="use_dora=True"):
        MeLoRAModel.from_peft(fresh_base(), adapter_dir, LABELS)
    with pytest.raises(CheckpointError, match="not a peft adapter directory"):
        MeLoRAModel.from_peft(fresh_base(), tmp_path / "nothing", LABELS)


QUICK = ["--model", str(STORIES_DIR), "--dataset", "toy", "--steps", "3", "--batch-size", "4",
         "--train-limit", "16", "--eval-limit", "8", "--eval-samples", "0", "--max-length", "64", "--lr", "1e-2"]


def test_cli_trains_q_of_c_on_a_frozen_peft_lora_then_exports_it(peft_adapter, tmp_path, capsys):
    adapter_dir, _ = peft_adapter
    run_dir = tmp_path / "run"
    assert main(["train", *QUICK, "--method", "melora", "--init-from-peft", str(adapter_dir), "--freeze-ab",
                 "--run-dir", str(run_dir)]) == 0
    settings = json.loads((run_dir / "settings.json").read_text())
    assert settings["adapter"]["rank"] == 4 and settings["freeze_ab"] is True
    out = tmp_path / "exported"
    assert main(["export", "--run-dir", str(run_dir), "--format", "peft", "--out", str(out)]) == 0
    peft_weights, exported = load_file(adapter_dir / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_"
    assert torch.equal(exported[key + "A.weight"], peft_weights[key + "A.weight"])  # A stayed frozen
    _, guide = load_adapters(out, fresh_base())
    assert not torch.allclose(guide.loc, torch.eye(4).expand_as(guide.loc))  # q(C) was trained
    assert main(["export", "--run-dir", str(run_dir), "--format", "merged", "--out", str(out)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    merged = tmp_path / "merged"
    assert main(["export", "--run-dir", str(run_dir), "--format", "merged", "--out", str(merged)]) == 0
    assert AutoModelForCausalLM.from_pretrained(merged) is not None and (merged / "tokenizer_config.json").is_file()


def test_cli_refuses_shape_flags_with_init_from_peft(peft_adapter, tmp_path, capsys):
    adapter_dir, _ = peft_adapter
    assert main(["train", *QUICK, "--rank", "2", "--init-from-peft", str(adapter_dir),
                 "--run-dir", str(tmp_path / "run")]) == 2
    assert "--rank: the adapter shape comes from --init-from-peft" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_freeze_ab_is_refused_where_nothing_would_train():
    from melora_pyro.methods import build_method
    from melora_pyro.models import tiny_llama
    from melora_pyro.pipeline import start_from_peft
    from melora_pyro.runs import RunError, RunSettings

    for name, message in (("map", "leaves nothing to train"), ("blob", "no point-estimated A")):
        method = build_method(name, tiny_llama(), MeLoRAConfig(rank=2), [10, 11])
        with pytest.raises(RunError, match=message):
            start_from_peft(method, RunSettings(method=name, freeze_ab=True))
    method = build_method("melora", tiny_llama(), MeLoRAConfig(rank=2), [10, 11])
    start_from_peft(method, RunSettings(freeze_ab=True))
    assert method.adapter_state() == 2 * method.model.num_adapters * 2 ** 2  # 2 r^2 per layer: M and Omega
