"""Closed-form KL divergences between the mean-field guide q(C) and the priors on C.

q(C) = N(M, diag(omega^2)) elementwise on the r x r matrix C. Both functions accept a leading
batch of layers ``(..., r, r)`` and return the KL summed over everything as a 0-dim tensor.
"""
from __future__ import annotations

import math

import torch


def elementwise_kl(M: torch.Tensor, omega: torch.Tensor, sigma) -> torch.Tensor:
    """KL(N(M, omega^2) || N(0, sigma^2)) summed over all entries.

    Args:
        M, omega: ``(..., r, r)`` guide mean and standard deviation (omega > 0).
        sigma: prior std, a float or a tensor broadcastable to ``(..., 1, 1)``.
    """
    sigma = torch.as_tensor(sigma, dtype=M.dtype, device=M.device)
    kl = torch.log(sigma / omega) + (omega.square() + M.square()) / (2 * sigma.square()) - 0.5
    return kl.sum()


def full_weight_kl(M, omega, A=None, B=None, sigma=0.2, scale=1.0, *, gram_a=None, gram_b=None):
    """KL between q(C) and the full-weight prior, in closed form (DESIGN.md section 3).

    The prior is N(0, sigma^2 I) on dW = scale * B C A restricted to the r^2-dimensional subspace
    dW can reach; on C it is Gaussian with precision ``c (A A^T kron B^T B)``, ``c = scale^2/sigma^2``:

        KL = 1/2 [ c sum_ij omega_ij^2 Gb_ii Ga_jj + c tr(M^T Gb M Ga)
                   - r^2 - r^2 log c - r logdet Ga - r logdet Gb - sum_ij log omega_ij^2 ]

    with Ga = A A^T, Gb = B^T B. Cost O(r^3 + r^2 (m + n)); dW is never formed.

    Args:
        M, omega: ``(..., r, r)``.
        A: ``(..., r, n)``, B: ``(..., m, r)``; or their Gram matrices ``gram_a``, ``gram_b``
            ``(..., r, r)`` directly (the model computes them once per step).
        sigma: prior std on dW entries, float or tensor broadcastable to ``(...)``.
        scale: the LoRA scaling s = alpha / r.
    """
    if gram_a is None:
        gram_a = A @ A.mT
    if gram_b is None:
        gram_b = B.mT @ B
    log_c = 2 * torch.log(torch.as_tensor(scale / sigma, dtype=M.dtype, device=M.device))
    return full_weight_kl_terms(M, omega, gram_a, gram_b, log_c).sum()


def full_weight_kl_terms(M, omega, gram_a, gram_b, log_c) -> torch.Tensor:
    """The full-weight KL per layer, shape ``(...)``; ``log_c = log(scale^2 / sigma^2)``."""
    r = M.shape[-1]
    trace_cov = (omega.square() * gram_b.diagonal(dim1=-2, dim2=-1)[..., :, None]
                 * gram_a.diagonal(dim1=-2, dim2=-1)[..., None, :]).sum((-2, -1))
    trace_mean = (M * (gram_b @ M @ gram_a)).sum((-2, -1))
    c = math.exp(log_c) if isinstance(log_c, float) else log_c.exp()
    return 0.5 * (c * (trace_cov + trace_mean) - r * r - r * r * log_c
                  - r * spd_logdet(gram_a) - r * spd_logdet(gram_b)
                  - 2 * omega.log().sum((-2, -1)))


def spd_logdet(gram: torch.Tensor) -> torch.Tensor:
    """log det of symmetric positive-definite ``(..., r, r)`` matrices via Cholesky; returns ``(...)``.

    A matrix that is not positive definite (the Gram matrix of a diverged, inf or NaN, A or B) gives
    NaN instead of an exception, so the training loop reports a ``NumericalError`` in the KL.
    """
    chol, info = torch.linalg.cholesky_ex(gram)
    logdet = 2 * chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    return torch.where(info == 0, logdet, torch.full_like(logdet, float("nan")))
