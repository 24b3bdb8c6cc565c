"""Closed-form KLs against brute force, torch and Monte Carlo."""
import math

import pytest
import torch
import pyro.distributions as dist
from torch.distributions import Normal, kl_divergence

from melora_pyro.kl import elementwise_kl, full_weight_kl
from melora_pyro.priors import FullWeightNormal


def _brute_force_full_weight_kl(M, omega, A, B, sigma, scale):
    """KL in weight space: q(dW) and N(0, sigma^2 I) restricted to the span of s (A^T kron B)."""
    J = scale * torch.kron(A.T.contiguous(), B)         # vec(dW) = J vec(C), column-major vec
    U, _, _ = torch.linalg.svd(J, full_matrices=False)  # orthonormal basis of the reachable subspace
    vec = lambda X: X.T.reshape(-1)  # noqa: E731
    mean = U.T @ J @ vec(M)
    cov = U.T @ J @ torch.diag(vec(omega) ** 2) @ J.T @ U
    d = mean.numel()
    return 0.5 * (torch.trace(cov) / sigma**2 + mean @ mean / sigma**2 - d
                  + d * math.log(sigma**2) - torch.logdet(cov))


@pytest.mark.parametrize("r,n,m", [(2, 5, 4), (3, 7, 6), (4, 6, 9)])
def test_full_weight_kl_matches_weight_space_brute_force(r, n, m):
    g = torch.Generator().manual_seed(r * 100 + n)
    kw = dict(dtype=torch.float64, generator=g)
    M, A, B = torch.randn(r, r, **kw), torch.randn(r, n, **kw), torch.randn(m, r, **kw)
    omega = torch.rand(r, r, **kw) + 0.1
    sigma, scale = 0.3, 2.0
    closed = full_weight_kl(M, omega, A, B, sigma, scale)
    brute = _brute_force_full_weight_kl(M, omega, A, B, sigma, scale)
    assert abs(closed - brute) / abs(brute) < 1e-10


def test_full_weight_kl_sums_a_batch_of_layers():
    g = torch.Generator().manual_seed(0)
    kw = dict(dtype=torch.float64, generator=g)
    M, A, B = torch.randn(3, 2, 2, **kw), torch.randn(3, 2, 5, **kw), torch.randn(3, 4, 2, **kw)
    omega = torch.rand(3, 2, 2, **kw) + 0.1
    batched = full_weight_kl(M, omega, A, B, 0.2, 2.0)
    looped = sum(full_weight_kl(M[i], omega[i], A[i], B[i], 0.2, 2.0) for i in range(3))
    assert torch.allclose(batched, looped, rtol=1e-12)


def test_elementwise_kl_matches_torch():
    g = torch.Generator().manual_seed(1)
    M = torch.randn(3, 4, 4, dtype=torch.float64, generator=g)
    omega = torch.rand(3, 4, 4, dtype=torch.float64, generator=g) + 0.05
    expected = kl_divergence(Normal(M, omega), Normal(torch.zeros_like(M), 0.2)).sum()
    assert torch.allclose(elementwise_kl(M, omega, 0.2), expected, rtol=1e-12)


def test_elbo_kl_term_matches_monte_carlo():
    """kl_divergence(q, FullWeightNormal) (what the ELBO uses) against E_q[log q - log p]."""
    torch.manual_seed(0)
    L, r = 2, 3
    A, B = torch.randn(L, r, 6, dtype=torch.float64), torch.randn(L, 5, r, dtype=torch.float64)
    M = torch.randn(L, r, r, dtype=torch.float64)
    omega = torch.rand(L, r, r, dtype=torch.float64) * 0.5 + 0.1
    p = FullWeightNormal(A @ A.mT, B.mT @ B, sigma=0.5, scale=2.0)
    q = dist.Normal(M, omega).to_event(2)
    exact = kl_divergence(q, p).sum()
    samples = q.sample((40000,))
    log_ratio = (q.log_prob(samples) - p.log_prob(samples)).sum(-1)
    mc, stderr = log_ratio.mean(), log_ratio.std() / math.sqrt(len(log_ratio))
    assert abs(exact - mc) < 4 * stderr
    assert torch.allclose(exact, full_weight_kl(M, omega, A, B, 0.5, 2.0))


def test_full_weight_prior_samples_have_the_stated_covariance():
    torch.manual_seed(0)
    r = 2
    A, B = torch.randn(1, r, 4, dtype=torch.float64), torch.randn(1, 3, r, dtype=torch.float64)
    p = FullWeightNormal(A @ A.mT, B.mT @ B, sigma=0.5, scale=2.0)
    C = p.sample((200000,))[:, 0]                       # (S, r, r)
    vec = C.mT.reshape(C.shape[0], -1)                  # column-major vec(C)
    empirical = vec.T @ vec / vec.shape[0]
    c = 2.0**2 / 0.5**2
    expected = torch.linalg.inv(c * torch.kron(A[0] @ A[0].T, B[0].T @ B[0]))
    assert torch.allclose(empirical, expected, rtol=0.05, atol=0.02 * expected.abs().max())
