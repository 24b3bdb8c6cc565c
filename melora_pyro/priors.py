"""Priors on the stacked latent ``C`` (L adapters x r x r) and the distribution they induce.

A prior is a small callable object: given the adapters' Gram matrices it returns the distribution
of the ``"C"`` site, batch shape ``(L,)`` (the ``"adapters"`` plate), event shape ``(r, r)``.
Swap one on a model with ``model.prior = ElementwisePrior(std=0.1)``; the ELBO finds the matching
closed-form KL through ``torch.distributions.kl_divergence``.
"""
from __future__ import annotations

import math

import pyro.distributions as dist
import torch
from pyro.distributions.torch_distribution import TorchDistribution
from torch.distributions import constraints, register_kl
from torch.distributions.independent import Independent
from torch.distributions.normal import Normal

from .kl import full_weight_kl_terms, spd_logdet


class _RandomisedStd:
    """``sigma = std + U(0, noise)``, drawn afresh at every call (plain torch randomness, not a site)."""

    def __init__(self, std: float = 0.2, noise: float = 0.0):
        if std <= 0 or noise < 0:
            raise ValueError(f"prior std must be > 0 and noise >= 0, got std={std}, noise={noise}")
        self.std, self.noise = float(std), float(noise)

    def sigma(self) -> float:
        return self.std + self.noise * torch.rand(()).item() if self.noise else self.std

    def __repr__(self):
        return f"{type(self).__name__}(std={self.std}, noise={self.noise})"


class ElementwisePrior(_RandomisedStd):
    """``C_ij ~ N(0, sigma^2)`` independently; with ``noise > 0`` sigma is randomised per call."""

    def __call__(self, gram_a: torch.Tensor, gram_b: torch.Tensor, scale: float):
        zero = gram_a.new_zeros(gram_a.shape)
        return dist.Normal(zero, self.sigma()).to_event(2)


class FullWeightPrior(_RandomisedStd):
    """Isotropic ``N(0, sigma^2 I)`` on ``dW = s B C A``, pulled back to C (DESIGN.md section 2)."""

    def __call__(self, gram_a: torch.Tensor, gram_b: torch.Tensor, scale: float):
        return FullWeightNormal(gram_a, gram_b, self.sigma(), scale)


def prior_from_config(config) -> ElementwisePrior | FullWeightPrior:
    kind = FullWeightPrior if config.kl == "full_weight" else ElementwisePrior
    return kind(config.prior_std, config.prior_noise)


class FullWeightNormal(TorchDistribution):
    """Zero-mean Gaussian on ``C (r x r)`` with precision ``c (Ga kron Gb)`` on column-major vec(C).

    Args:
        gram_a: ``(L, r, r)`` = A A^T, gram_b: ``(L, r, r)`` = B^T B (both positive definite).
        sigma: prior std of dW entries; scale: LoRA scaling s; ``c = s^2 / sigma^2``.

    Batch shape ``(L,)``, event shape ``(r, r)``. The log density is
    ``-c/2 tr(C^T Gb C Ga) + 1/2 logdet(c Ga kron Gb) - r^2/2 log(2 pi)``.
    """

    arg_constraints = {}
    support = constraints.independent(constraints.real, 2)
    has_rsample = True

    def __init__(self, gram_a, gram_b, sigma, scale, validate_args=None):
        self.gram_a, self.gram_b = gram_a, gram_b
        self.sigma, self.scale = sigma, scale
        self.log_c = 2 * math.log(scale / sigma)
        r = gram_a.shape[-1]
        super().__init__(gram_a.shape[:-2], torch.Size((r, r)), validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        if batch_shape == self.batch_shape:
            return self
        return FullWeightNormal(self.gram_a.expand(batch_shape + self.gram_a.shape[-2:]),
                                self.gram_b.expand(batch_shape + self.gram_b.shape[-2:]),
                                self.sigma, self.scale)

    def log_prob(self, value):
        r = value.shape[-1]
        quad = (value * (self.gram_b @ value @ self.gram_a)).sum((-2, -1))
        logdet = r * r * self.log_c + r * spd_logdet(self.gram_a) + r * spd_logdet(self.gram_b)
        return 0.5 * (-math.exp(self.log_c) * quad + logdet - r * r * math.log(2 * math.pi))

    def rsample(self, sample_shape=torch.Size()):
        # C = Lb^{-T} Z La^{-1} / sqrt(c) has covariance (Ga^{-1} kron Gb^{-1}) / c.
        chol_a = torch.linalg.cholesky(self.gram_a)
        chol_b = torch.linalg.cholesky(self.gram_b)
        z = torch.randn(self._extended_shape(sample_shape), dtype=self.gram_a.dtype,
                        device=self.gram_a.device)
        x = torch.linalg.solve_triangular(chol_b.mT, z, upper=True)
        x = torch.linalg.solve_triangular(chol_a, x, upper=False, left=False)
        return x * math.exp(-0.5 * self.log_c)


def _mean_field_parts(q):
    """(M, omega) of an ``Independent(Normal, 2)`` guide distribution, else None."""
    if isinstance(q, Independent) and q.reinterpreted_batch_ndims == 2 and isinstance(q.base_dist, Normal):
        return q.base_dist.loc, q.base_dist.scale
    return None


@register_kl(Independent, FullWeightNormal)
def _kl_mean_field_full_weight(q, p):
    parts = _mean_field_parts(q)
    if parts is None:
        raise NotImplementedError(f"no closed-form KL from {type(q).__name__} to FullWeightNormal")
    M, omega = parts
    return full_weight_kl_terms(M, omega, p.gram_a, p.gram_b, p.log_c)
