"""Diagonal C (a ScalaBL-style ablation of Me-LoRA): ``dW = s B diag(c) A`` with ``c`` latent in R^r.

Full-weight prior restricted to diagonal C. With ``C = diag(c)``, ``dW = s sum_j c_j b_j a_j^T``
(``b_j`` the j-th column of B, ``a_j^T`` the j-th row of A), so

    |dW|_F^2 = s^2 sum_jk c_j c_k <b_j a_j^T, b_k a_k^T>_F = s^2 sum_jk c_j c_k (b_j . b_k)(a_j . a_k)
             = s^2 c^T (Ga o Gb) c,           Ga = A A^T, Gb = B^T B, o the Hadamard product.

The isotropic prior ``N(0, sigma^2 I)`` on dW, restricted to the r-dimensional subspace
``{s B diag(c) A}`` that dW can reach, pulls back to ``c ~ N(0, P^-1)`` with precision

    P = (s^2 / sigma^2) (Ga o Gb)          (positive definite by the Schur product theorem).

As the map c -> dW is linear and injective (A full row rank, B full column rank), the KL between the
pushed-forward distributions of dW equals the KL on c. For the guide ``q(c) = N(m, diag(w^2))``:

    KL = 1/2 [ k sum_j w_j^2 (Ga)_jj (Gb)_jj + k m^T (Ga o Gb) m - r - r log k
               - logdet(Ga o Gb) - sum_j log w_j^2 ],       k = s^2 / sigma^2.

Cost O(r^3 + r^2 (m + n)) per layer. Adapter state per layer: ``r n + r m + 2 r``.
"""
from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
from torch import nn
from torch.distributions import register_kl
from torch.distributions.independent import Independent
from torch.distributions.normal import Normal

from .._params import pyro_param
from ..kl import spd_logdet
from ..model import MeLoRAModel


class DiagonalFullWeightNormal(dist.MultivariateNormal):
    """``N(0, P^-1)`` on ``c`` ``(..., r)`` with ``P = (scale^2 / sigma^2) (gram_a o gram_b)``.

    Args:
        gram_a, gram_b: ``(L, r, r)`` Gram matrices ``A A^T`` and ``B^T B``.
        sigma: prior std of the dW entries; scale: the LoRA scaling s.
    Batch shape ``(L,)``, event shape ``(r,)``.
    """

    def __init__(self, gram_a, gram_b, sigma, scale, validate_args=None):
        self.gram_a, self.gram_b, self.sigma, self.scale = gram_a, gram_b, sigma, scale
        self.log_c = 2 * math.log(scale / sigma)
        precision = math.exp(self.log_c) * gram_a * gram_b
        super().__init__(gram_a.new_zeros(gram_a.shape[:-1]), precision_matrix=precision,
                         validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        if batch_shape == self.batch_shape:
            return self
        r = self.gram_a.shape[-1]
        return DiagonalFullWeightNormal(self.gram_a.expand(batch_shape + (r, r)),
                                        self.gram_b.expand(batch_shape + (r, r)), self.sigma, self.scale)


def diagonal_full_weight_kl_terms(m, w, gram_a, gram_b, log_c) -> torch.Tensor:
    """KL(N(m, diag(w^2)) || N(0, P^-1)) per layer, shape ``(...)`` (module docstring).

    Args:
        m, w: ``(..., r)`` guide mean and std (w > 0); gram_a, gram_b: ``(..., r, r)``;
        log_c: ``log(scale^2 / sigma^2)``, a float or tensor broadcastable to ``(...)``.
    """
    r = m.shape[-1]
    hadamard = gram_a * gram_b
    c = torch.as_tensor(log_c, dtype=m.dtype, device=m.device).exp()
    trace = (w.square() * hadamard.diagonal(dim1=-2, dim2=-1)).sum(-1)
    quad = (m * (hadamard @ m.unsqueeze(-1)).squeeze(-1)).sum(-1)
    return 0.5 * (c * (trace + quad) - r - r * torch.log(c) - spd_logdet(hadamard) - 2 * w.log().sum(-1))


def diagonal_full_weight_kl(m, w, A, B, sigma=0.2, scale=1.0) -> torch.Tensor:
    """The diagonal-C full-weight KL summed over layers, from ``A (..., r, n)``, ``B (..., m, r)``."""
    log_c = 2 * math.log(scale / sigma)
    return diagonal_full_weight_kl_terms(m, w, A @ A.mT, B.mT @ B, log_c).sum()


@register_kl(Independent, DiagonalFullWeightNormal)
def _kl_mean_field_diagonal(q, p):
    if not (isinstance(q.base_dist, Normal) and q.reinterpreted_batch_ndims == 1):
        raise NotImplementedError(f"no closed-form KL from {type(q).__name__} to DiagonalFullWeightNormal")
    return diagonal_full_weight_kl_terms(q.base_dist.loc, q.base_dist.scale, p.gram_a, p.gram_b, p.log_c)


class DiagonalMeLoRAModel(MeLoRAModel):
    """Me-LoRA with ``C = diag(c)``: site ``"C_diag"`` ``(L, r)`` in plate ``"adapters"``.

    Prior: with ``config.kl == "full_weight"`` the restricted full-weight prior
    :class:`DiagonalFullWeightNormal`; with ``"elementwise"``, ``c_j ~ N(0, sigma^2)``. The prior std
    is randomised by ``config.prior_noise`` as for Me-LoRA. Use with :class:`DiagonalGuide`.
    """

    def __init__(self, base_model, config, readout, name: str = "melora_diag"):
        super().__init__(base_model, config, readout, name=name)

    def sample_adapters(self):
        A, B = self.adapter_params()
        sigma = self.prior.sigma()
        if self.config.kl == "full_weight":
            prior = DiagonalFullWeightNormal(*self.gram_matrices(A, B), sigma, self.config.scaling)
        else:
            prior = dist.Normal(B[0].new_zeros(self.num_adapters, self.rank), sigma).to_event(1)
        with pyro.plate("adapters", self.num_adapters):
            c = pyro.sample("C_diag", prior)
        return A, B, torch.diag_embed(c)


class DiagonalGuide(nn.Module):
    """``q(c) = N(m, diag(w^2))`` per adapter: ``loc`` = m ``(L, r)`` started at ones (C = I) and
    ``log_scale`` = log w ``(L, r)`` started at ``log(init_scale)``."""

    def __init__(self, model: DiagonalMeLoRAModel, init_scale: float = 1e-2):
        super().__init__()
        if init_scale <= 0:
            raise ValueError(f"init_scale must be > 0, got {init_scale}")
        self.prefix = f"{model.name}.guide"
        device = model.lora_A[0].device
        self.loc = nn.Parameter(torch.ones(model.num_adapters, model.rank, device=device))
        self.log_scale = nn.Parameter(torch.full((model.num_adapters, model.rank), math.log(init_scale),
                                                 device=device))

    def forward(self, *args, **kwargs):
        loc = pyro_param(f"{self.prefix}.loc", self.loc)
        scale = pyro_param(f"{self.prefix}.log_scale", self.log_scale).exp()
        with pyro.plate("adapters", loc.shape[0]):
            return pyro.sample("C_diag", dist.Normal(loc, scale).to_event(1))

    def posterior_mean(self) -> dict[str, torch.Tensor]:
        """``{"C_diag": m}`` ``(L, r)``."""
        return {"C_diag": self.loc}
