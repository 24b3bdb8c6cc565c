"""Every method through the one entry point (build_method -> fit / predict), on a tiny LLaMA."""
import math

import pytest
import torch
from torch.distributions import kl_divergence

from melora_pyro import FullWeightELBO, MeLoRAConfig
from melora_pyro.baselines import (BLoBELBO, DiagonalFullWeightNormal, blob_kl_cycle, blob_kl_weight, blob_pi,
                                   diagonal_full_weight_kl, diagonal_full_weight_kl_terms)
from melora_pyro.methods import METHODS, build_method
from melora_pyro.models import tiny_llama
from melora_pyro.train import TrainConfig

LABEL_IDS = [10, 11, 12]
CONFIG = MeLoRAConfig(rank=2, target_modules=("q_proj", "v_proj"))
SEQ = 6


def _examples(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 128, (SEQ,), generator=g), int(torch.randint(0, 3, (), generator=g)))
            for _ in range(n)]


def collate(examples):
    """The shared batch layout; the last example of a batch offers only 2 of the 3 labels."""
    labels = torch.tensor([min(y, 1) if i == len(examples) - 1 else y for i, (_, y) in enumerate(examples)])
    choice_mask = torch.ones(len(examples), 3, dtype=torch.bool)
    choice_mask[-1, 2] = False
    mask = torch.ones(len(examples), SEQ, dtype=torch.long)
    mask[0, :2] = 0  # left padding
    return {"input_ids": torch.stack([x for x, _ in examples]), "attention_mask": mask, "labels": labels,
            "choice_mask": choice_mask}


def _expected_state(name, L_q=2, L_v=2, r=2, n=32, m_q=32, m_v=16):
    lora = L_q * (r * n + r * m_q) + L_v * (r * n + r * m_v)
    extra = {"blob": (L_q + L_v) * r * n, "blob-adamw": (L_q + L_v) * r * n, "melora-diag": (L_q + L_v) * 2 * r}
    if name.startswith("melora") and name != "melora-diag":
        return lora + (L_q + L_v) * 2 * r * r
    return lora * (3 if name == "ensemble" else 1) + extra.get(name, 0)


TRAINED = [name for name in METHODS if name != "zero-shot"]


@pytest.mark.parametrize("name", TRAINED)
def test_every_method_trains_and_predicts_through_one_entry_point(name):
    method = build_method(name, tiny_llama, CONFIG, LABEL_IDS, seed=0)
    history = method.fit(_examples(), collate, TrainConfig(steps=2, batch_size=4, lr=1e-2))
    assert len(history) == 2 * (3 if name == "ensemble" else 1)
    assert all(math.isfinite(r["loss"]) for r in history)
    batch = collate(_examples(4, seed=1))
    probs = method.predict(batch, num_samples=2)
    assert probs.shape == (4, 3)
    assert torch.allclose(probs.sum(-1), torch.ones(4), atol=1e-5)
    assert probs[-1, 2] == 0  # a label the question does not offer
    assert method.adapter_state() == _expected_state(name)


def test_zero_shot_is_the_base_model_untouched():
    base = tiny_llama()
    method = build_method("zero-shot", base, CONFIG, LABEL_IDS)
    assert method.fit(_examples(), collate, TrainConfig(steps=2, batch_size=4)) == []
    batch = collate(_examples(4, seed=1))
    with torch.no_grad():
        logits = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, -1, LABEL_IDS]
    expected = logits.masked_fill(~batch["choice_mask"], float("-inf")).softmax(-1)
    torch.testing.assert_close(method.predict(batch, num_samples=3), expected)
    assert method.adapter_state() == 0 and not any(p.requires_grad for p in base.parameters())


def test_mc_dropout_samples_differ_but_mle_is_deterministic():
    batch = collate(_examples(4, seed=2))
    dropout = build_method("mcdropout", tiny_llama(), CONFIG, LABEL_IDS, dropout=0.5)
    mle = build_method("mle", tiny_llama(), CONFIG, LABEL_IDS)
    for method in (dropout, mle):  # move B off its near-zero start so the adapter matters
        with torch.no_grad():
            for b in method.model.lora_B:
                b.normal_(0, 1.0)
    torch.manual_seed(0)
    assert not torch.allclose(dropout.predict(batch, 1), dropout.predict(batch, 1))
    assert torch.equal(mle.predict(batch, 3), mle.predict(batch, 1))


def test_ensemble_needs_a_factory_and_unknown_names_are_refused():
    with pytest.raises(ValueError, match="factory"):
        build_method("ensemble", tiny_llama(), CONFIG, LABEL_IDS)
    with pytest.raises(ValueError, match="unknown method"):
        build_method("lora", tiny_llama(), CONFIG, LABEL_IDS)
    with pytest.raises(ValueError, match="unknown options"):
        build_method("mle", tiny_llama(), CONFIG, LABEL_IDS, dropout=0.1)


def test_blob_kl_matches_the_gaussian_closed_form():
    method = build_method("blob", tiny_llama(), CONFIG, LABEL_IDS, kl_reweighting=False)
    batch = collate(_examples(4))
    terms = FullWeightELBO().loss_terms(method.model, method.guide, batch["input_ids"], batch["attention_mask"],
                                        batch["labels"], 16, choice_mask=batch["choice_mask"])
    sigma = CONFIG.prior_std
    by_hand = sum((math.log(sigma) - s.double().log() + (s.double() ** 2 + mu.double() ** 2) / (2 * sigma ** 2)
                   - 0.5).sum() for mu, s in zip(method.guide.loc, method.guide.scales()))
    assert torch.allclose(terms["kl"].double(), by_hand, rtol=1e-5)
    assert not any(site.startswith("C") for site in method.guide.posterior_mean())


def test_blob_adamw_elbo_weights_the_kl_by_n_pi():
    num_data, batch = 40, 4
    cycle = blob_kl_cycle(num_data, batch)
    assert [blob_kl_weight(step, num_data, batch) for step in (1, cycle, cycle + 1)] == \
        [num_data * blob_pi(1, cycle), num_data * blob_pi(cycle, cycle), num_data * blob_pi(1, cycle)]
    elbo, method = BLoBELBO(), build_method("blob-adamw", tiny_llama(), CONFIG, LABEL_IDS)
    b = collate(_examples(4))
    terms = elbo.loss_terms(method.model, method.guide, b["input_ids"], b["attention_mask"], b["labels"], num_data)
    assert elbo.step == 1 and terms["kl_weight"] == blob_kl_weight(1, num_data, batch)
    assert torch.allclose(terms["loss"], terms["nll"] + terms["kl_weight"] * terms["kl"])


@pytest.mark.parametrize("name", ["melora", "melora-diag"])
def test_kl_weight_scales_the_kl_term_and_only_variational_methods_take_it(name):
    b = collate(_examples(4))
    losses = {}
    for weight in (1.0, 0.25):
        method = build_method(name, tiny_llama(), CONFIG, LABEL_IDS, kl_weight=weight)
        torch.manual_seed(0)  # the same draw of C under both weights
        losses[weight] = method.elbo.loss_terms(method.model, method.guide, b["input_ids"], b["attention_mask"],
                                                b["labels"], 40)
    plain, tempered = losses[1.0], losses[0.25]
    assert torch.allclose(plain["nll"], tempered["nll"]) and torch.allclose(plain["kl"], tempered["kl"])
    assert plain["kl"] > 0
    assert torch.allclose(tempered["loss"], plain["nll"] + 0.25 * plain["kl"])
    with pytest.raises(ValueError, match=r"unknown options \['kl_weight'\]"):
        build_method("map", tiny_llama(), CONFIG, LABEL_IDS, kl_weight=0.5)


def test_laplace_predictive_variance_shrinks_as_the_prior_precision_grows():
    method = build_method("laplace", tiny_llama, CONFIG, LABEL_IDS, max_fisher_examples=8)
    method.fit(_examples(), collate, TrainConfig(steps=2, batch_size=4, lr=1e-2))
    assert method.prior_precision in method.grid and len(method.fisher) == 2 * len(method.map.model.lora_A)
    assert all((f >= 0).all() for f in method.fisher)
    batch = collate(_examples(4, seed=4))
    variances = []
    # From lambda ~ 1e2 up: below it the perturbations saturate (the tiny random model's final RMSNorm
    # bounds its label logits), a regime where no Laplace approximation is meant to be used.
    for lam in (1e2, 1e3, 1e4, 1e5):
        torch.manual_seed(0)
        variances.append(method.predict_samples(batch, 16, prior_precision=lam).var(0).mean().item())
    assert all(a > b for a, b in zip(variances, variances[1:])), variances
    stds = [method.posterior_std(lam) for lam in (1e-2, 1.0)]
    assert all((small > large).all() for small, large in zip(*stds))
    # empirical Fisher and a fixed precision go through the same path
    fixed = build_method("laplace", tiny_llama, CONFIG, LABEL_IDS, fisher="empirical", prior_precision=10.0)
    fixed.fit(_examples(), collate, TrainConfig(steps=1, batch_size=4, lr=1e-2))
    assert fixed.prior_precision == 10.0


def _brute_force_diagonal_kl(m, w, A, B, sigma, scale):
    """KL in weight space: q(dW) vs N(0, sigma^2 I) restricted to the span of {s b_j a_j^T}."""
    r = m.shape[0]
    J = scale * torch.kron(A.T.contiguous(), B)[:, [j * r + j for j in range(r)]]  # vec(dW) = J c
    U, _, _ = torch.linalg.svd(J, full_matrices=False)
    mean, cov = U.T @ J @ m, U.T @ J @ torch.diag(w ** 2) @ J.T @ U
    return 0.5 * (torch.trace(cov) / sigma ** 2 + mean @ mean / sigma ** 2 - r + r * math.log(sigma ** 2)
                  - torch.logdet(cov))


@pytest.mark.parametrize("r,n,m", [(2, 5, 4), (3, 7, 6), (4, 6, 9)])
def test_diagonal_kl_matches_weight_space_brute_force(r, n, m):
    g = torch.Generator().manual_seed(r)
    kw = dict(dtype=torch.float64, generator=g)
    mu, A, B = torch.randn(r, **kw), torch.randn(r, n, **kw), torch.randn(m, r, **kw)
    w = torch.rand(r, **kw) + 0.1
    closed = diagonal_full_weight_kl(mu, w, A, B, sigma=0.3, scale=2.0)
    brute = _brute_force_diagonal_kl(mu, w, A, B, 0.3, 2.0)
    assert abs(closed - brute) / abs(brute) < 1e-10
    # the ELBO's kl_divergence dispatch reaches the same closed form
    p = DiagonalFullWeightNormal((A @ A.T)[None], (B.T @ B)[None], sigma=0.3, scale=2.0)
    q = torch.distributions.Independent(torch.distributions.Normal(mu[None], w[None]), 1)
    assert torch.allclose(kl_divergence(q, p).sum(), closed)
    assert torch.allclose(diagonal_full_weight_kl_terms(mu, w, A @ A.T, B.T @ B, 2 * math.log(2.0 / 0.3)), closed)
