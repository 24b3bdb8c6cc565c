"""Behaviour the performance work relies on (experiments/bench.py, DESIGN.md section 6)."""
import math

import pyro
import pytest
import torch
import torch.nn.functional as F

from experiments import bench
from guides import MeanFieldGuide
from melora_pyro import FullWeightELBO, MeLoRAConfig, MeLoRAModel
from melora_pyro.kl import full_weight_kl
from melora_pyro.models import tiny_llama

LABELS = [10, 11, 12, 13]
NUM_DATA = 100


@pytest.fixture
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def test_stacked_site_equals_per_layer_sampling(float64):
    """One stacked ``C`` site (L, r, r) gives the loss and gradients of sampling each layer's C_l
    separately (same noise), binding it and adding per-layer KLs: checked against a hand-written
    per-layer reference in float64, to 1e-6."""
    pyro.clear_param_store()
    base = tiny_llama(num_layers=2, hidden=32, heads=4, kv_heads=2, intermediate=64, vocab=128).double()
    model = MeLoRAModel(base, MeLoRAConfig(rank=4, init_b_std=0.05), LABELS, name="stack_test")
    guide = MeanFieldGuide(model, init_scale=0.1)
    assert model.lora_A[0].dtype == torch.float64 and len(model.lora_B) == 2  # q_proj, v_proj groups
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        guide.loc.add_(0.1 * torch.randn(guide.loc.shape, generator=g))
        guide.log_scale.add_(0.2 * torch.randn(guide.log_scale.shape, generator=g))
    ids = torch.randint(20, 128, (3, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    labels = torch.tensor([0, 3, 1])
    L, r, cfg = model.num_adapters, model.rank, model.config

    # The library: stacked site, FullWeightELBO.
    params = [*model.lora_A, *model.lora_B, guide.loc, guide.log_scale]
    pyro.set_rng_seed(7)
    loss = FullWeightELBO().differentiable_loss(model, guide, ids, mask, labels, NUM_DATA)
    grads = torch.autograd.grad(loss, params)
    n_groups = len(model.lora_A)
    grad_A = [a for stack in grads[:n_groups] for a in stack.unbind(0)]
    grad_B = [b for stack in grads[n_groups:2 * n_groups] for b in stack.unbind(0)]
    grad_M, grad_log_omega = grads[-2].unbind(0), grads[-1].unbind(0)

    # The reference: per-layer leaves, per-layer C_l with the same noise, per-layer KLs.
    leaf = lambda t: t.detach().clone().requires_grad_()  # noqa: E731
    A = [leaf(a) for stack in model.lora_A for a in stack.unbind(0)]
    B = [leaf(b) for stack in model.lora_B for b in stack.unbind(0)]
    M = [leaf(m) for m in guide.loc.unbind(0)]
    log_omega = [leaf(s) for s in guide.log_scale.unbind(0)]
    pyro.set_rng_seed(7)
    eps = torch.randn(L, r, r)
    layers = [model.base.get_submodule(name) for name in model.layer_names]
    kl = 0.0
    for l, layer in enumerate(layers):
        omega = log_omega[l].exp()
        C_l = M[l] + omega * eps[l]
        layer.bound = (A[l], B[l] @ C_l)
        kl = kl + full_weight_kl(M[l], omega, A[l], B[l], sigma=cfg.prior_std, scale=cfg.scaling)
    try:
        logits = model.base(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, -1, LABELS]
    finally:
        for layer in layers:
            layer.bound = None
    ref = F.cross_entropy(logits, labels, reduction="sum") * NUM_DATA / ids.shape[0] + kl
    ref_grads = torch.autograd.grad(ref, [*A, *B, *M, *log_omega])

    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    ours = [*grad_A, *grad_B, *grad_M, *grad_log_omega]
    assert len(ours) == len(ref_grads) == 4 * L
    for name, a, b in zip(["A"] * L + ["B"] * L + ["M"] * L + ["log Omega"] * L, ours, ref_grads):
        # float32 gradients summed in another order (thread count, load) differ by ~1e-6: seen in CI
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"grad {name}: {m}")
    assert any(g.abs().max() > 1e-6 for g in ours)  # gradients are not trivially zero


def test_quick_overhead_timing_returns_finite_ratios():
    torch.manual_seed(0)
    res = bench.framework_overhead(1, hidden=32, batch=(2, 8), repeats=2, inner=1, warmup=1)
    assert res["adapted"] == 2
    assert set(res["ratios"]) == {"torch", "elbo", "svi"}
    for name, values in res["ratios"].items():
        assert len(values) == 2 and all(math.isfinite(v) and v > 0 for v in values), (name, values)
    assert res["ratios"]["torch"] == [1.0, 1.0]
    assert res["check_grad"] < 1e-3


def test_interleaved_rotates_and_summarises():
    calls = []
    times = bench.interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                              repeats=3, inner=2, warmup=1)
    assert calls == ["a", "b"] + ["a", "a", "b", "b"] + ["b", "b", "a", "a"] + ["a", "a", "b", "b"]
    assert all(len(v) == 3 for v in times.values())
    assert bench.mmm([3.0, 1.0, 2.0], "{:.1f}") == "1.0 / 2.0 / 3.0"
