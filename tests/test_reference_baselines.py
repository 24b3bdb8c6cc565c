"""The baselines as their reference code runs them (docs/baselines.md), pinned on tiny models.

BLoB: github.com/Wang-ML-Lab/bayesian-peft ``modelwrappers/blob.py``; the ensemble: its
``modelwrappers/deepensemble.py``; the schedule: its ``wrapperbase.get_linear_schedule_with_warmup``;
Laplace: github.com/adamxyang/laplace-lora ``run_gpt_laplace.py`` (the GLM predictive).
"""
import json
import math
import shutil

import pyro.poutine as poutine
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from melora_pyro import MeLoRAConfig
from melora_pyro.errors import ConfigError
from melora_pyro.baselines import blob_kl_cycle, blob_pi
from melora_pyro.flipout import flipout, flipout_parameters, flipout_perturbation
from melora_pyro.methods import build_method
from melora_pyro.models import tiny_llama
from melora_pyro.train import BatchOrder, TrainConfig, lr_factor, total_steps

try:
    from .test_methods import CONFIG, LABEL_IDS, _examples, collate
except ImportError:
    from test_methods import CONFIG, LABEL_IDS, _examples, collate


def _reference_lambda(num_warmup_steps, num_training_steps):
    """The reference's warmup + linear decay multiplier, written out from its definition."""
    def lr_lambda(current_step):
        if current_step < num_warmup_steps:
            return float(current_step) / float(max(1, num_warmup_steps))
        return max(0.0, float(num_training_steps - current_step) / float(max(1, num_training_steps - num_warmup_steps)))
    return lr_lambda


def test_linear_schedule_is_the_reference_warmup_then_decay():
    config = TrainConfig(steps=50, lr_schedule="linear", warmup_ratio=0.06)
    reference = _reference_lambda(50 * 0.06, 50)
    assert [lr_factor(k, config) for k in range(60)] == [reference(k) for k in range(60)]
    assert lr_factor(0, config) == 0.0 and lr_factor(50, config) == 0.0
    assert all(lr_factor(k, TrainConfig(steps=50)) == 1.0 for k in range(60))  # constant: unchanged behaviour
    # whole epochs: 40 examples / batch 8 = 5 steps per epoch; 12 steps -> 3 epochs
    assert total_steps(TrainConfig(steps=12, batch_size=4, grad_accum=2, whole_epochs=True), 40, 1) == 15
    assert total_steps(TrainConfig(steps=12, batch_size=4), 40, 1) == 12
    for bad in ({"lr_schedule": "cosine"}, {"warmup_ratio": 1.0}, {"adam_eps": 0.0}, {"whole_epochs": 1}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            TrainConfig(**bad)


def test_kl_cycle_length_and_weights():
    # N = 2^8 makes N^(pi/8) = 2^pi: M = int(100 * 2^pi / processes / batch)
    assert blob_kl_cycle(256, 4, 1) == int(100 * 2 ** math.pi / 4) == 220
    assert blob_kl_cycle(256, 4, 2) == 110  # the scripts' 2 processes x batch 4
    assert blob_kl_cycle(80, 4, 2, gamma=math.pi) == 1000  # gamma = pi: M = 100 N / (2 x 4)
    M = 7
    weights = [blob_pi(step, M) for step in range(1, 3 * M + 1)]
    assert weights[:M] == weights[M:2 * M] == weights[2 * M:]  # restarts every M steps
    assert weights[:M] == [2 ** i / (2 ** (M + 1) - 1) for i in range(1, M + 1)]
    assert sum(weights[:M]) == pytest.approx((2 ** (M + 1) - 2) / (2 ** (M + 1) - 1))
    assert blob_pi(220, 220) == pytest.approx(0.5)  # 2^M / (2^(M+1) - 1), no overflow at large M


def test_flipout_signs_are_independent_per_example_and_token_with_the_right_moments():
    torch.manual_seed(0)
    b, T, n, r, trials = 2, 3, 6, 4, 20000
    x = torch.randn(n).expand(b, T, n)  # the same input at every example and token
    sigma = torch.rand(r, n) * 0.5 + 0.1
    draws = torch.stack([flipout_perturbation(x, sigma * torch.randn(r, n)) for _ in range(trials)])
    flat = draws.reshape(trials, b * T, r)
    assert flat.mean(0).abs().max() < 4 * flat.std(0).max() / math.sqrt(trials)  # zero mean
    expected_var = (sigma.square() * x[0, 0].square()).sum(-1)  # Var(x E^T)_j = sum_i sigma_ji^2 x_i^2
    assert torch.allclose(flat.var(0), expected_var.expand(b * T, r), rtol=0.06)
    correlation = torch.corrcoef(flat[:, :, 0].T)  # positions (example, token) x positions
    off_diagonal = correlation[~torch.eye(b * T, dtype=torch.bool)]
    assert off_diagonal.abs().max() < 0.05  # one shared E, yet uncorrelated across examples and tokens
    shared = torch.stack([x @ (sigma * torch.randn(r, n)).T for _ in range(200)]).reshape(200, b * T, r)
    assert torch.corrcoef(shared[:, :, 0].T).min() > 0.999  # without the signs: one weight for all


def test_flipout_finds_each_samples_own_parameters_across_many_samples_in_one_block():
    """Several posterior samples in one ``flipout`` block (a prediction): each value maps to the loc and
    scale it was drawn from, also after earlier samples were freed (their ids are reused by CPython;
    keyed by id alone, a stale entry handed group 2's loc to group 0 and left a layer unbound)."""
    import pyro
    import pyro.distributions as dist

    shapes = [(2, 3, 5), (2, 3, 5), (1, 3, 5)]
    with flipout():
        for trial in range(40):
            for g, shape in enumerate(shapes):
                loc, scale = torch.randn(shape), torch.rand(shape) + 0.1
                value = pyro.sample(f"A.{g}.{trial}", dist.Normal(loc, scale).to_event(2))
                found = flipout_parameters(value)
                assert found is not None and found[0] is loc and found[1] is scale
                del value, loc, scale
                assert flipout_parameters(torch.randn(shape)) is None  # a tensor it did not record


def test_blob_predicts_under_flipout_per_example():
    method = build_method("blob", tiny_llama, CONFIG, LABEL_IDS)
    with torch.no_grad():
        for b in method.model.lora_B:
            b.normal_(0, 1.0)
        for g in method.guide.sqrt_scale:
            g.fill_(0.7)  # a visible std
    x, _ = _examples(1)[0]
    batch = collate([(x, 0)] * 3)
    batch["attention_mask"][0] = 1
    batch["choice_mask"][:] = True
    torch.manual_seed(0)
    probs = method.predict(batch, num_samples=1)
    assert not torch.allclose(probs[0], probs[1]) and not torch.allclose(probs[1], probs[2])  # own signs per row
    mean = method.predict(batch, num_samples=0)  # the posterior mean: no noise, identical rows
    assert torch.allclose(mean[0], mean[1]) and torch.allclose(mean[1], mean[2])


def test_melora_flipout_on_c_has_the_moments_of_a_sampled_c_and_decorrelates_tokens():
    """Flipout on C: each (example, token) row sees ``B (M + E o (s r^T)) A x``, a draw distributed as
    ``B C A x`` with ``C ~ N(M, Omega^2)``; two rows of one forward are uncorrelated (a shared C couples them)."""
    from melora_pyro.layers import MeLoRALinear

    torch.manual_seed(0)
    n, m, r, trials = 6, 5, 3, 20000
    layer = MeLoRALinear(torch.nn.Linear(n, m, bias=False), scaling=1.0)
    A, B, M, omega = torch.randn(r, n), torch.randn(m, r), torch.randn(r, r), 0.5 + torch.rand(r, r)
    x = torch.randn(2, 2, n)  # (example, token, n)
    base = layer.base(x)

    def update(binding):
        layer.bound = binding
        with torch.no_grad():
            return layer(x) - base

    flip = torch.stack([update((A, B @ M, None, B, omega * torch.randn(r, r))) for _ in range(trials)])
    shared = torch.stack([update((A, B @ (M + omega * torch.randn(r, r)))) for _ in range(trials)])
    assert torch.allclose(flip.mean(0), shared.mean(0), atol=0.1)
    assert torch.allclose(flip.mean(0), (x @ A.mT) @ (B @ M).mT, atol=0.1)
    assert torch.allclose(flip.var(0), shared.var(0), rtol=0.06)
    rows_flip, rows_shared = flip[:, 0, 0, 0], flip[:, 1, 1, 0]
    corr_flip = torch.corrcoef(torch.stack([rows_flip, rows_shared]))[0, 1]
    corr_shared = torch.corrcoef(torch.stack([shared[:, 0, 0, 0], shared[:, 1, 1, 0]]))[0, 1]
    assert abs(corr_flip) < 0.05 and abs(corr_shared) > 0.2


def test_melora_with_flipout_trains_its_scale_and_predicts_per_example():
    method = build_method("melora", tiny_llama, CONFIG, LABEL_IDS, flipout=True, init_scale=0.5)
    assert method.elbo.flipout and method.flipout
    scale_before = method.guide.scale.detach().clone()
    method.fit(_examples(16), collate, TrainConfig(steps=3, batch_size=4, lr=1e-2, guide_scale_lr=0.1))
    assert not torch.allclose(method.guide.scale.detach(), scale_before)  # the NLL gradient reaches Omega
    with torch.no_grad():
        for b in method.model.lora_B:
            b.normal_(0, 1.0)
    x, _ = _examples(1)[0]
    batch = collate([(x, 0)] * 3)
    batch["choice_mask"][:] = True
    torch.manual_seed(0)
    probs = method.predict(batch, num_samples=1)
    assert not torch.allclose(probs[0], probs[1]) and not torch.allclose(probs[1], probs[2])  # own signs per row
    plain = build_method("melora", tiny_llama, CONFIG, LABEL_IDS)
    assert not plain.flipout and not plain.elbo.flipout


def _official_kl(loc, sigma, prior_std, eps=1e-6):
    """BLoB's kl_div_stable, written out from its definition (float64)."""
    sigma, loc = sigma.double(), loc.double()
    return (math.log(prior_std + eps) - torch.log(sigma + eps) + (sigma ** 2 + loc ** 2) / (2 * prior_std ** 2 + eps)
            - 0.5).sum()


def test_two_optimiser_blob_update_equals_a_hand_written_official_step():
    steps, lr, kl_lr, seed, examples = 3, 1e-2, 0.05, 3, _examples(16)
    config = TrainConfig(steps=steps, batch_size=4, lr=lr, seed=seed, lr_schedule="linear", warmup_ratio=0.34,
                         adam_eps=1e-6)
    ours = build_method("blob", tiny_llama, CONFIG, LABEL_IDS, kl_lr=kl_lr)
    ours.fit(examples, collate, config)

    ref = build_method("blob", tiny_llama, CONFIG, LABEL_IDS, kl_lr=kl_lr)  # the same initial values
    model, guide = ref.model, ref.guide
    B, M, G = list(model.lora_B), list(guide.loc), list(guide.sqrt_scale)
    adamw = torch.optim.AdamW([*B, *M], lr=lr, eps=1e-6, weight_decay=0.0)  # the std G is not in AdamW
    sgd = torch.optim.SGD([*B, *M, *G], lr=kl_lr)
    schedules = [torch.optim.lr_scheduler.LambdaLR(opt, _reference_lambda(steps * 0.34, steps)) for opt in (adamw, sgd)]
    cycle = int(100 * len(examples) ** (math.pi / 8) / 1 / 4)
    torch.manual_seed(seed)
    order = BatchOrder(len(examples), 4, seed)
    for i in range(1, steps + 1):
        batch = collate([examples[k] for k in order.next()])
        with flipout():
            guide_trace = poutine.trace(guide).get_trace()
            logits = poutine.replay(model, trace=guide_trace)(batch["input_ids"], batch["attention_mask"],
                                                              batch["labels"], choice_mask=batch["choice_mask"])
        F.cross_entropy(logits, batch["labels"]).backward()  # the mean NLL
        adamw.step()
        adamw.zero_grad()
        schedules[0].step()
        pi = 2 ** i / (2 ** (cycle + 1) - 1)
        (pi * sum(_official_kl(m, g ** 2, CONFIG.prior_std) for m, g in zip(M, G))).backward()
        sgd.step()
        sgd.zero_grad()
        schedules[1].step()
    for name, a, b in [("B", ours.model.lora_B, B), ("M", ours.guide.loc, M), ("G", ours.guide.sqrt_scale, G)]:
        for x, y in zip(a, b):
            assert torch.allclose(x, y, rtol=1e-5, atol=1e-7), name
    assert not torch.allclose(ours.guide.sqrt_scale[0], build_method("blob", tiny_llama, CONFIG, LABEL_IDS)
                              .guide.sqrt_scale[0])  # the std did move


def test_blob_resume_with_the_schedule_is_exact(tmp_path):
    examples = _examples(16)
    config = dict(steps=4, batch_size=4, lr=1e-2, lr_schedule="linear", warmup_ratio=0.3, adam_eps=1e-6,
                  checkpoint_every=2, log_every=1)
    straight, split = tmp_path / "straight", tmp_path / "split"
    build_method("blob", tiny_llama, CONFIG, LABEL_IDS).fit(examples, collate, TrainConfig(**config),
                                                            run_dir=straight)
    build_method("blob", tiny_llama, CONFIG, LABEL_IDS).fit(examples, collate, TrainConfig(**config),
                                                            run_dir=split)
    shutil.rmtree(split / "checkpoints/step-00000004")  # train steps 3 and 4 again from the step-2 checkpoint
    build_method("blob", tiny_llama, CONFIG, LABEL_IDS).fit(examples, collate, TrainConfig(**config),
                                                            run_dir=split, resume=True)
    for name in ("adapters.safetensors", "state.safetensors"):
        ours, theirs = (load_file(d / "checkpoints/step-00000004" / name) for d in (split, straight))
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs), name
    groups = [json.loads((d / "checkpoints/step-00000004/trainer.json").read_text())["optimizer_param_groups"]
              for d in (split, straight)]
    assert groups[0] == groups[1] and groups[0][0]["lr"] == 1e-2 * lr_factor(3, TrainConfig(**config))


def test_ensemble_is_the_softmax_of_the_mean_member_logits_of_lockstep_members():
    examples, config = _examples(), TrainConfig(steps=2, batch_size=4, lr=1e-2)
    method = build_method("ensemble", tiny_llama, CONFIG, LABEL_IDS, ensemble_size=2, seed=5)
    method.fit(examples, collate, config)
    batch = collate(_examples(4, seed=3))
    logits = torch.stack([m.mean_logits(batch) for m in method.members]).detach()
    assert torch.allclose(method.predict(batch, 1), logits.mean(0).softmax(-1))
    assert not torch.allclose(method.predict(batch, 1), logits.softmax(-1).mean(0))  # not the mean of probabilities
    # member k is a plain LoRA run of its own seed, weight decay 0, on the same batch sequence
    alone = build_method("mle", tiny_llama, CONFIG, LABEL_IDS, seed=5 + 1)
    alone.fit(examples, collate, config)
    assert all(torch.equal(a, b) for a, b in zip(alone.model.lora_A, method.members[1].model.lora_A))
    probs = build_method("ensemble", tiny_llama, CONFIG, LABEL_IDS, ensemble_size=2, aggregate="probs")
    assert torch.allclose(probs.predict(batch, 1), torch.stack([m.predict(batch, 1) for m in probs.members]).mean(0))


def test_glm_logit_covariance_is_j_sigma_jt_by_brute_force():
    method = build_method("laplace", tiny_llama, CONFIG, LABEL_IDS, prior_precision=3.0, max_fisher_examples=6)
    method.fit(_examples(), collate, TrainConfig(steps=2, batch_size=4, lr=1e-2))
    batch = collate(_examples(3, seed=4))  # the last example offers 2 of the 3 labels
    mean, covariance = method.glm_logits(batch)
    params = method.params
    variance = torch.diag(torch.cat([s.square().flatten() for s in method.posterior_std()]))  # dense Sigma
    logits = method.map.mean_logits(batch)
    rows = []
    for i in range(logits.shape[0]):  # the full Jacobian of every finite logit, row by row
        jac = torch.zeros(logits.shape[1], variance.shape[0])
        for k in range(logits.shape[1]):
            if torch.isfinite(logits[i, k]):
                jac[k] = torch.cat([g.flatten() for g in torch.autograd.grad(logits[i, k], params, retain_graph=True)])
        rows.append(jac)
    J = torch.stack(rows)  # (batch, K, P)
    brute = torch.einsum("bkp,pq,blq->bkl", J, variance, J)
    assert torch.allclose(covariance, brute, rtol=1e-4, atol=1e-10)
    assert covariance[-1, 2].abs().max() == 0 and torch.isinf(mean[-1, 2])
    # J itself against central finite differences along a random direction
    direction = [torch.randn_like(p) * 1e-3 for p in params]
    with torch.no_grad():
        shifted = []
        for sign in (1, -1):
            for p, d in zip(params, direction):
                p.add_(sign * d)
            shifted.append(method.map.mean_logits(batch))
            for p, d in zip(params, direction):
                p.sub_(sign * d)
    fd = (shifted[0] - shifted[1]) / 2
    jv = J @ torch.cat([d.flatten() for d in direction])
    finite = torch.isfinite(mean)
    assert torch.allclose(fd[finite], jv[finite], rtol=1e-2, atol=1e-6)
    probs = method.predict(batch, num_samples=1)  # GLM: Monte Carlo over the logits
    assert torch.allclose(probs.sum(-1), torch.ones(3), atol=1e-5) and probs[-1, 2] == 0


def test_reference_defaults_of_the_baselines():
    """The scripts' settings: MAP weight decay 1e-5, ensemble and BLoB 0, peft's B = 0, BLoB's SGD lr 0.01
    and std parameter G in [eps / sqrt 2, eps], eps 0.05."""
    assert build_method("map", tiny_llama, CONFIG, LABEL_IDS).train_overrides["weight_decay"] == 1e-5
    ensemble = build_method("ensemble", tiny_llama, CONFIG, LABEL_IDS, ensemble_size=1)
    assert ensemble.members[0].train_overrides["weight_decay"] == 0.0 and ensemble.aggregate == "logits"
    blob = build_method("blob", tiny_llama, CONFIG, LABEL_IDS)
    assert blob.train_overrides["weight_decay"] == 0.0 and blob.update.kl_lr == 0.01
    G = torch.cat([g.detach().flatten() for g in blob.guide.sqrt_scale])
    assert G.min() >= 0.05 / math.sqrt(2) and G.max() <= 0.05
    for method in (blob, ensemble.members[0], build_method("laplace", tiny_llama, CONFIG, LABEL_IDS).map):
        assert all((b == 0).all() for b in method.model.lora_B)
    assert build_method("laplace", tiny_llama, CONFIG, LABEL_IDS).predictive == "glm"
