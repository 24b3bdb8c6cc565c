"""BLoB (Wang et al., NeurIPS 2024) as a Pyro model and guide in the Me-LoRA framework.

BLoB makes LoRA's ``A`` Bayesian and keeps ``B`` a point estimate: ``y = W0 x + s B A x`` with
``q(A) = N(M_A, diag(G^2)^2)`` elementwise (BLoB parameterises the std as the square of a parameter
``G``), the prior ``A_ij ~ N(0, sigma_p^2)`` with ``sigma_p = 0.2`` and the closed-form Gaussian KL.
Here ``C`` is fixed at the identity (there is no ``"C"`` site) and each shape group ``g`` of adapted
layers has one stacked site ``"A.g"`` of shape ``(L_g, r, n)`` in plate ``"adapters.g"``.

Adapter state per adapted ``m x n`` matrix: ``2 r n + r m`` (mean and std of A, and B).

Deviations from BLoB's code, stated plainly:

- **No Flipout.** BLoB perturbs A with Flipout (per-example random sign flips of one shared noise
  draw, Wen et al. 2018). Here one ``A`` is drawn per batch from ``q(A)`` (the plain reparameterised
  estimator: same expectation, higher gradient variance). Prediction with ``N`` samples draws ``N``
  matrices, each shared by the batch.
- **One optimiser.** BLoB takes the KL gradient with a separate SGD optimiser; here the KL is part of
  the one loss minimised by the shared AdamW loop.
- **KL re-weighting** (BLoB's ``--bayes-klreweighting``): within each cycle of ``M`` steps (``M`` =
  steps per epoch, ``ceil(N / batch)``), step ``i = 1..M`` weights the KL by
  ``pi_i = 2^i / (2^(M+1) - 1)`` against the *mean* batch NLL. The shared ELBO scales the batch NLL to
  the whole data set (``N x`` mean NLL), so :class:`KLScheduleELBO` multiplies the KL by ``N pi_i``:
  the per-step objective is BLoB's times ``N``.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from .._params import pyro_param
from ..config import MeLoRAConfig
from ..elbo import FullWeightELBO
from ..model import MeLoRAModel

BLOB_EPS = 0.05  # BLoB's --bayes-eps: G starts uniform in [eps / sqrt(2), eps], so std = G^2 in [eps^2/2, eps^2]


class BLoBModel(MeLoRAModel):
    """Plain LoRA ``s B A`` with a latent ``A``: sites ``"A.g"`` ``(L_g, r, n)``, prior
    ``Normal(0, config.prior_std)`` (BLoB: 0.2) elementwise; ``B`` params; ``C = I`` (no ``"C"`` site).

    The point-estimate A stacks of ``MeLoRAModel`` are dropped: A's mean lives in :class:`BLoBGuide`.
    ``config.kl``, ``prior_noise`` and ``dropout`` other than their defaults are not used by BLoB.
    """

    def __init__(self, base_model: nn.Module, config: MeLoRAConfig, readout,
                 name: str = "blob"):
        super().__init__(base_model, config, readout, name=name)
        self.a_shapes = [tuple(a.shape) for a in self.lora_A]
        self.lora_A = nn.ParameterList()  # A is latent: its mean and std belong to the guide
        device = self.lora_B[0].device
        self.register_buffer("_zero", torch.zeros((), device=device), persistent=False)
        self.register_buffer("_identity", torch.eye(config.rank, device=device).expand(
            self.num_adapters, config.rank, config.rank), persistent=False)

    def sample_adapters(self):
        """Sample every ``"A.g"`` from the prior (replayed from the guide under inference); returns
        ``(A, B, C = I)`` for ``label_logits``."""
        B = [pyro_param(f"{self.name}.lora_B.{g}", b) for g, b in enumerate(self.lora_B)]
        A = []
        for g, shape in enumerate(self.a_shapes):
            prior = dist.Normal(self._zero.expand(shape[1:]), self.config.prior_std).to_event(2)
            with pyro.plate(f"adapters.{g}", shape[0]):
                A.append(pyro.sample(f"A.{g}", prior))
        return A, B, self._identity


class BLoBGuide(nn.Module):
    """``q(A.g) = N(M_g, diag(G_g^2)^2)``: mean ``M_g`` ``(L_g, r, n)`` started as LoRA's A
    (peft's Kaiming-uniform), ``G_g`` started uniform in ``[eps / sqrt(2), eps]``, ``eps = 0.05``."""

    def __init__(self, model: BLoBModel, eps: float = BLOB_EPS):
        super().__init__()
        self.prefix = f"{model.name}.guide"
        device = model.lora_B[0].device
        self.loc, self.sqrt_scale = nn.ParameterList(), nn.ParameterList()
        for shape in model.a_shapes:
            loc = torch.empty(shape, device=device)
            for a in loc:
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            self.loc.append(nn.Parameter(loc))
            self.sqrt_scale.append(nn.Parameter(torch.empty(shape, device=device).uniform_(eps / math.sqrt(2), eps)))

    def scales(self) -> list[torch.Tensor]:
        """The standard deviations ``G_g^2``, each ``(L_g, r, n)``."""
        return [g.square() for g in self.sqrt_scale]

    def forward(self, *args, **kwargs):
        for g, (loc, sqrt_scale) in enumerate(zip(self.loc, self.sqrt_scale)):
            loc = pyro_param(f"{self.prefix}.A_loc.{g}", loc)
            scale = pyro_param(f"{self.prefix}.A_sqrt_scale.{g}", sqrt_scale).square()
            with pyro.plate(f"adapters.{g}", loc.shape[0]):
                pyro.sample(f"A.{g}", dist.Normal(loc, scale).to_event(2))

    def posterior_mean(self) -> dict[str, torch.Tensor]:
        """``{"A.g": M_g}``."""
        return {f"A.{g}": loc for g, loc in enumerate(self.loc)}


def blob_kl_weight(step: int, num_data: int, batch_size: int) -> float:
    """BLoB's KL weight at (1-based) ``step``, in the units of the shared ELBO: ``N pi_i`` with
    ``pi_i = 2^i / (2^(M+1) - 1)``, ``i = ((step - 1) mod M) + 1``, ``M = ceil(N / batch_size)``."""
    steps_per_epoch = math.ceil(num_data / batch_size)
    i = (step - 1) % steps_per_epoch + 1
    # 2^i / (2^(M+1) - 1) = 2^(i-M-1) / (1 - 2^-(M+1)), evaluated without overflow
    pi = math.ldexp(1.0, i - steps_per_epoch - 1) / (1.0 - math.ldexp(1.0, -steps_per_epoch - 1))
    return num_data * pi


class KLScheduleELBO(FullWeightELBO):
    """``FullWeightELBO`` whose KL is multiplied by ``kl_weight(step, num_data, batch_size)``.

    ``step`` is a 1-based counter that advances on every gradient-enabled call of ``loss_terms`` (one
    per micro-batch of the training loop; evaluation under ``torch.no_grad`` does not advance it);
    ``num_data`` and ``batch_size`` are read from the model arguments ``(input_ids, attention_mask,
    labels, num_data)``. The logged ``kl`` stays the unweighted KL; ``loss = nll + kl_weight * kl``, and
    ``kl_weight`` is returned with the terms. Resuming from a checkpoint restarts the counter (set
    ``elbo.step`` to continue the schedule).
    """

    def __init__(self, kl_weight: Callable[[int, int, int], float], **kwargs):
        super().__init__(**kwargs)
        self.kl_weight, self.step = kl_weight, 0

    def loss_terms(self, model, guide, input_ids, attention_mask=None, labels=None, num_data=None,
                   **kwargs) -> dict:
        terms = super().loss_terms(model, guide, input_ids, attention_mask, labels, num_data, **kwargs)
        if torch.is_grad_enabled():
            self.step += 1
        batch_size = input_ids.shape[0]
        weight = self.kl_weight(max(self.step, 1), num_data or batch_size, batch_size)
        return {**terms, "loss": terms["nll"] + weight * terms["kl"], "kl_weight": weight}


class BLoBELBO(KLScheduleELBO):
    """BLoB's re-weighted ELBO (:func:`blob_kl_weight`)."""

    def __init__(self, **kwargs):
        super().__init__(blob_kl_weight, **kwargs)
