"""MeLoRAModel, guides, ELBO and scoring on a tiny random LLaMA."""
import pyro
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import SVI, Predictive

from guides import DeltaGuide, IdentityGuide, MeanFieldGuide
from melora_pyro import (FullWeightELBO, MeLoRAConfig, MeLoRAModel, count_adapter_state,
                         predict_proba)
from melora_pyro.kl import full_weight_kl
from melora_pyro.models import tiny_llama
from melora_pyro.synthetic import MARKED_TASK_LABELS as LABELS, marked_token_task


def make_model(**config):
    config = {"rank": 4, **config}
    return MeLoRAModel(tiny_llama(), MeLoRAConfig(**config), LABELS)


def batch(n=6, seq=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 128, (n, seq), generator=g), torch.randint(0, 4, (n,), generator=g)


def test_adapters_are_injected_and_base_is_frozen():
    model = make_model(target_modules=("q_proj", "v_proj", "lm_head"))
    assert model.num_adapters == 5
    assert model.layer_names[-1] == "lm_head"
    assert all(not p.requires_grad for p in model.base.parameters() if p.numel() > 0
               and not any(p is q for q in model.parameters() if q.requires_grad))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"lora_{x}.{g}" for x in "AB" for g in range(len(model.lora_A))}


def test_model_records_probs_and_observes_labels_in_data_plate():
    model = make_model()
    ids, y = batch()
    trace = poutine.trace(model).get_trace(ids, None, y, 100)
    probs = trace.nodes["probs"]["value"]
    assert probs.shape == (6, 4) and torch.allclose(probs.sum(-1), torch.ones(6))
    assert trace.nodes["C"]["value"].shape == (model.num_adapters, 4, 4)
    assert trace.nodes["y"]["is_observed"]
    assert trace.nodes["y"]["scale"] == pytest.approx(100 / 6)


@pytest.mark.parametrize("gauge", ["none", "unit"])
def test_adapted_output_is_w0_x_plus_s_b_c_a_x(gauge):
    """W0 x + s B C A x computed by hand; in the unit gauge with unit rows of A and columns of B."""
    model = make_model(target_modules=("lm_head",), gauge=gauge)
    ids, _ = batch()
    C = torch.randn(4, 4)
    logits = poutine.condition(model, data={"C": C[None]})(ids)
    base = model.base
    hidden = base.model(input_ids=ids).last_hidden_state[:, -1]
    A, B = model.lora_A[0][0], model.lora_B[0][0]
    if gauge == "unit":
        A, B = A / A.norm(dim=1, keepdim=True), B / B.norm(dim=0, keepdim=True)
    expected = hidden @ base.lm_head.base.weight.T + model.config.scaling * hidden @ A.T @ C.T @ B.T
    assert torch.allclose(logits, expected[:, LABELS], atol=1e-5)


def test_unit_gauge_removes_the_flat_directions_of_the_elbo():
    """Rescaling rows of A and columns of B changes nothing the model computes (the ELBO's flat
    directions B -> B D1, A -> D2 A are no longer directions of the parameters that matter), and
    the layers start at dW = 0 with C at 0."""
    model = make_model(gauge="unit")
    assert torch.equal(MeanFieldGuide(model).loc, torch.zeros(model.num_adapters, 4, 4))
    ids, _ = batch()
    C = torch.randn(model.num_adapters, 4, 4)
    before = poutine.condition(model, data={"C": C})(ids)
    A, B = model.fix_gauge(list(model.lora_A), list(model.lora_B))
    gram_a, gram_b = model.gram_matrices(A, B)
    assert torch.allclose(gram_a.diagonal(dim1=-2, dim2=-1), torch.ones(model.num_adapters, 4))
    assert torch.allclose(gram_b.diagonal(dim1=-2, dim2=-1), torch.ones(model.num_adapters, 4))
    with torch.no_grad():
        for a, b in zip(model.lora_A, model.lora_B):
            a.mul_(torch.rand(a.shape[0], 4, 1) + 0.5)
            b.mul_(torch.rand(b.shape[0], 1, 4) * 10)
    assert torch.allclose(poutine.condition(model, data={"C": C})(ids), before, atol=1e-5)


def test_identity_guide_needs_the_plain_gauge():
    with pytest.raises(ValueError, match="gauge='none'"):
        IdentityGuide(make_model(gauge="unit"))


@pytest.mark.parametrize("guide_cls", [MeanFieldGuide, DeltaGuide, IdentityGuide])
def test_svi_learns_the_synthetic_task_with_every_guide(guide_cls):
    pyro.set_rng_seed(0)
    model = make_model(target_modules=("q_proj", "v_proj", "lm_head"), prior_std=1.0,
                       gauge="none" if guide_cls is IdentityGuide else "unit")
    guide = guide_cls(model)
    train_x, train_y = marked_token_task(256, seed=1)
    test_x, test_y = marked_token_task(256, seed=2)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), FullWeightELBO())
    losses = []
    for step in range(150):
        i = torch.randint(0, 256, (32,))
        losses.append(svi.step(train_x[i], None, train_y[i], 256))
    acc = (predict_proba(model, guide, test_x, num_samples=4).argmax(-1) == test_y).float().mean()
    assert acc > 0.6, f"{guide_cls.__name__}: accuracy {acc:.2f} (chance 0.25)"
    assert sum(losses[-20:]) < sum(losses[:20])
    if guide_cls is MeanFieldGuide:
        assert not torch.allclose(guide.log_scale, torch.full_like(guide.log_scale, torch.log(torch.tensor(1e-2))))


def test_map_then_vi_carries_a_and_b_over():
    model = make_model()
    ids, y = batch()
    svi = SVI(model, DeltaGuide(model), pyro.optim.Adam({"lr": 1e-2}), FullWeightELBO())
    svi.step(ids, None, y, 6)
    trained_A = model.lora_A[0].detach().clone()
    guide = MeanFieldGuide(model)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), FullWeightELBO())
    svi.step(ids, None, y, 6)
    assert not torch.equal(model.lora_A[0], trained_A)  # A kept training under the new guide
    assert pyro.get_param_store()["melora.lora_A.0"] is model.lora_A[0]


def test_rebuilt_model_is_not_shadowed_by_stale_params():
    first = make_model()
    ids, y = batch()
    SVI(first, MeanFieldGuide(first), pyro.optim.Adam({"lr": 1e-2}), FullWeightELBO()).step(ids, None, y)
    second = make_model()
    before = second.lora_B[0].detach().clone()
    SVI(second, MeanFieldGuide(second), pyro.optim.Adam({"lr": 1e-2}), FullWeightELBO()).step(ids, None, y)
    assert not torch.equal(second.lora_B[0], before)


def test_elbo_loss_is_likelihood_plus_closed_form_kl():
    pyro.set_rng_seed(3)
    model = make_model()
    guide = MeanFieldGuide(model, init_scale=0.05)
    ids, y = batch()
    elbo = FullWeightELBO()
    guide_trace = poutine.trace(guide).get_trace(ids, None, y, 60)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(ids, None, y, 60)
    nll = -torch.distributions.Categorical(logits=model_trace.nodes["y"]["fn"].logits).log_prob(y).sum() * 10
    kl = sum(full_weight_kl(guide.loc[s], guide.scale[s], a, b, model.config.prior_std, model.config.scaling)
             for a, b, s in zip(*model.fix_gauge(list(model.lora_A), list(model.lora_B)), _group_slices(model)))
    assert torch.allclose(sum(elbo.particle_terms(model_trace, guide_trace)), nll + kl, rtol=1e-5)


def _group_slices(model):
    start = 0
    for a in model.lora_A:
        yield slice(start, start + a.shape[0])
        start += a.shape[0]


def test_identity_guide_loss_is_the_likelihood_alone():
    pyro.set_rng_seed(0)
    model = make_model(gauge="none")
    ids, y = batch()
    loss = FullWeightELBO().loss(model, IdentityGuide(model), ids, None, y)
    logits = poutine.condition(model, data={"C": torch.eye(4).repeat(model.num_adapters, 1, 1)})(ids)
    assert loss == pytest.approx(torch.nn.functional.cross_entropy(logits, y, reduction="sum").item(), rel=1e-5)


def test_predictive_average_equals_hand_written_average():
    model = make_model()
    guide = MeanFieldGuide(model, init_scale=0.3)
    ids, _ = batch()
    pyro.set_rng_seed(7)
    probs = Predictive(model, guide=guide, num_samples=5, return_sites=["probs"])(ids)["probs"]
    assert probs.shape == (5, 6, 4)
    pyro.set_rng_seed(7)
    # Predictive runs the guide twice (to guess plate nesting and site shapes), then draws.
    guide(ids), guide(ids)
    Cs = [poutine.trace(guide).get_trace(ids).nodes["C"]["value"] for _ in range(5)]
    by_hand = torch.stack([poutine.condition(model, data={"C": C})(ids).softmax(-1) for C in Cs])
    assert torch.allclose(probs, by_hand, atol=1e-6)
    assert torch.allclose(probs.mean(0), by_hand.mean(0), atol=1e-6)


def test_predict_proba_with_zero_samples_is_the_posterior_mean_prediction():
    model = make_model()
    guide = MeanFieldGuide(model, init_scale=0.3)
    with torch.no_grad():
        guide.loc.add_(0.1 * torch.randn_like(guide.loc))
    ids, _ = batch()
    expected = poutine.condition(model, data={"C": guide.loc})(ids).softmax(-1)
    assert torch.allclose(predict_proba(model, guide, ids, num_samples=0), expected)
    sampled = predict_proba(model, guide, ids, num_samples=3)
    assert sampled.shape == (6, 4) and not torch.allclose(sampled, expected)


def test_count_formula_and_ratio_to_blob_at_llama_7b_shapes():
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=32, vocab_size=32000)
    with torch.device("meta"):
        base = LlamaForCausalLM(config)
        model = MeLoRAModel(base, MeLoRAConfig(rank=8, gauge="none"), [319, 350, 315, 360])
        guide = MeanFieldGuide(model)
    L, r, n, m = 64, 8, 4096, 4096
    assert count_adapter_state(model, guide) == L * (r * n + r * m + 2 * r * r)
    blob = L * (2 * r * n + r * m)
    assert round(count_adapter_state(model, guide) / blob, 3) == 0.668
    assert count_adapter_state(model, IdentityGuide(model)) == L * (r * n + r * m)


@pytest.mark.parametrize("kwargs,field", [
    (dict(rank=0), "rank"), (dict(prior_std=0.0), "prior_std"), (dict(prior_std=-1.0), "prior_std"),
    (dict(kl="weird"), "kl"), (dict(dropout=1.0), "dropout"), (dict(prior_noise=-0.1), "prior_noise"),
    (dict(alpha=float("nan")), "alpha"),
])
def test_invalid_config_names_field_and_value(kwargs, field):
    with pytest.raises(ValueError, match=f"MeLoRAConfig.{field} .*got"):
        MeLoRAConfig(**kwargs)


@pytest.mark.parametrize("build,message", [
    (lambda: make_model(target_modules=("k_proj_typo",)), r"\['k_proj_typo'\] match no nn.Linear"),
    (lambda: make_model(rank=17), r"rank 17 exceeds min\(n, m\) = 16"),
    (lambda: MeLoRAModel(tiny_llama(), MeLoRAConfig(rank=2), [1, 128]), r"\[128\] are outside the vocabulary"),
    (lambda: MeLoRAModel(tiny_llama(), MeLoRAConfig(rank=2), [1, 1]), "duplicates"),
    (lambda: MeLoRAModel(tiny_llama(), MeLoRAConfig(rank=2), []), "empty"),
])
def test_bad_model_input_raises_value_error(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_bad_batches_raise_value_error():
    model = make_model()
    ids, y = batch()
    with pytest.raises(ValueError, match="non-empty"):
        model(ids[:0])
    with pytest.raises(ValueError, match=r"labels must lie in 0..3"):
        model(ids, None, torch.full_like(y, 4))
