"""BLoB (Wang et al., NeurIPS 2024) as its official code runs it, as a Pyro model and guide.

BLoB makes LoRA's ``A`` Bayesian and keeps ``B`` a point estimate: ``y = W0 x + s B A x`` with
``q(A) = N(M, diag(G^2)^2)`` elementwise (the std is the square of a parameter ``G``, BLoB's
``lora_A_rho``, started uniform in ``[eps / sqrt 2, eps]``, ``eps = 0.05``), the prior
``A_ij ~ N(0, sigma_p^2)``, ``sigma_p = 0.2`` (``--bayes-beta``). ``C`` is fixed at the identity (no
``"C"`` site); each shape group ``g`` of adapted layers has one stacked site ``"A.g"`` ``(L_g, r, n)``.
Adapter state per adapted ``m x n`` matrix: ``2 r n + r m``.

Reference: ``modelwrappers/blob.py`` of github.com/Wang-ML-Lab/bayesian-peft, run by
``scripts/blob/blob-llama-all.sh``. What is matched (``docs/baselines.md`` has the whole table):

- **Flipout** at training and evaluation (:mod:`melora_pyro.flipout`): the mean path ``x M^T`` plus
  ``((x o r) E^T) o s`` with ``E = G^2 o eps`` drawn once per forward and layer and signs per example
  and token.
- **Two optimisers** (:class:`BLoBUpdate`, method ``blob``): each step, backward of the *mean* batch
  NLL, an AdamW step on ``M`` and ``B`` only (``G`` is not in AdamW), AdamW's gradients cleared, then
  backward of ``pi_i KL`` and an SGD step (lr ``kl_lr`` = 0.01, the scripts' ``--bayes-kllr``, same
  schedule) on every parameter: ``G`` moves by its NLL gradient plus ``pi_i dKL/dG``, ``M`` also by
  ``pi_i dKL/dM``. The KL is BLoB's ``kl_div_stable`` (float64, ``1e-6`` guards), taken after the AdamW
  step as in the reference.
- **KL re-weighting** ``pi_i = 2^i / (2^(M+1) - 1)``, ``i = ((step - 1) mod M) + 1``, with the cycle
  length of ``--bayes-datasetrescaling`` (on in the scripts): ``M = int(100 N^(pi / gamma) /
  num_processes / batch)``, ``gamma = 8`` (:func:`blob_kl_cycle`; ``pi`` there is 3.14159...).

Method ``blob-adamw`` keeps the single-optimiser ELBO (:class:`BLoBELBO`): the same model, guide,
Flipout and cycle, the KL (Gaussian closed form) weighted by ``N pi_i`` against the data-set-scaled
NLL in the one AdamW of the shared loop, i.e. BLoB's per-step objective times ``N``.
"""
from __future__ import annotations

import dataclasses

import math
from collections.abc import Callable, Sequence

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from .._params import pyro_param
from ..config import MeLoRAConfig
from ..elbo import FullWeightELBO, KLScheduleELBO
from ..flipout import flipout_noise, flipout_parameters
from ..model import MeLoRAModel
from ..train import TrainConfig, UpdateRule

BLOB_EPS = 0.05    # --bayes-eps: G starts uniform in [eps / sqrt(2), eps], so std = G^2 in [eps^2/2, eps^2]
BLOB_KL_LR = 0.01  # --bayes-kllr of scripts/blob/*.sh (the argument parser's default is 0.02)
BLOB_GAMMA = 8.0   # --bayes-gamma
_KL_GUARD = 1e-6   # the eps of BLoB's kl_div_stable


class BLoBModel(MeLoRAModel):
    """Plain LoRA ``s B A`` with a latent ``A``: sites ``"A.g"`` ``(L_g, r, n)``, prior
    ``Normal(0, config.prior_std)`` (BLoB: 0.2) elementwise; ``B`` params; ``C = I`` (no ``"C"`` site).

    The point-estimate A stacks of ``MeLoRAModel`` are dropped: A's mean lives in :class:`BLoBGuide`.
    Inside a ``melora_pyro.flipout`` block the layers get A's mean and Flipout noise instead of the
    sample. ``config.kl``, ``prior_noise`` and ``dropout`` other than their defaults are not used by BLoB.
    """

    def __init__(self, base_model: nn.Module, config: MeLoRAConfig, readout,
                 name: str = "blob"):
        # C = I: A and B as stored (the unit gauge would fix the update's size).
        super().__init__(base_model, dataclasses.replace(config, gauge="none"), readout, name=name)
        self.a_shapes = [tuple(a.shape) for a in self.lora_A]
        self.lora_A = nn.ParameterList()  # A is latent: its mean and std belong to the guide
        device = self.lora_B[0].device
        self.register_buffer("_zero", torch.zeros((), device=device), persistent=False)
        self.register_buffer("_identity", torch.eye(config.rank, device=device).expand(
            self.num_adapters, config.rank, config.rank), persistent=False)

    def sample_adapters(self):
        """Sample every ``"A.g"`` from the prior (replayed from the guide under inference); returns
        ``(A, B, C = I)``, or under Flipout ``(mean of A, B, I, noise)``, for ``label_logits``."""
        B = [pyro_param(f"{self.name}.lora_B.{g}", b) for g, b in enumerate(self.lora_B)]
        A = []
        for g, shape in enumerate(self.a_shapes):
            prior = dist.Normal(self._zero.expand(shape[1:]), self.config.prior_std).to_event(2)
            with pyro.plate(f"adapters.{g}", shape[0]):
                A.append(pyro.sample(f"A.{g}", prior))
        sources = [flipout_parameters(a) for a in A]
        if all(source is not None for source in sources):
            return [loc for loc, _ in sources], B, self._identity, [flipout_noise(scale) for _, scale in sources]
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


def blob_kl(guide: BLoBGuide, prior_std: float) -> torch.Tensor:
    """BLoB's ``kl_div_stable`` summed over every A entry (float64): ``log(sigma_p + 1e-6) -
    log(sigma + 1e-6) + (sigma^2 + M^2) / (2 sigma_p^2 + 1e-6) - 1/2``, ``sigma = G^2``."""
    total = 0.0
    for loc, sigma in zip(guide.loc, guide.scales()):
        sigma, loc = sigma.double(), loc.double()
        total = total + (math.log(prior_std + _KL_GUARD) - torch.log(sigma + _KL_GUARD)
                         + (sigma ** 2 + loc ** 2) / (2 * prior_std ** 2 + _KL_GUARD) - 0.5).sum()
    return total


def blob_kl_cycle(num_data: int, batch_size: int, num_processes: int = 1, gamma: float = BLOB_GAMMA) -> int:
    """The re-weighting cycle ``M = int(100 N^(pi / gamma) / num_processes / batch_size)`` of BLoB's
    ``--bayes-datasetrescaling`` (``batch_size`` per process), at least 1."""
    return max(1, int(100 * (num_data ** (math.pi / gamma)) / num_processes / batch_size))


def blob_pi(step: int, cycle: int) -> float:
    """``pi_i = 2^i / (2^(M+1) - 1)`` at (1-based) ``step``, ``i = ((step - 1) mod M) + 1``, in exact
    integer arithmetic as the reference (one correctly rounded division)."""
    i = cycle if step % cycle == 0 else step % cycle
    return 2 ** i / (2 ** (cycle + 1) - 1)


def blob_kl_weight(step: int, num_data: int, batch_size: int) -> float:
    """The KL weight of :class:`BLoBELBO` at (1-based) ``step``: ``N pi_i`` with the cycle
    :func:`blob_kl_cycle` (``N pi_i`` against the shared ELBO's ``N x`` mean NLL is BLoB's ``pi_i``)."""
    return num_data * blob_pi(step, blob_kl_cycle(num_data, batch_size))


class BLoBELBO(KLScheduleELBO):
    """BLoB's re-weighted ELBO (``kl_weight``: :func:`blob_kl_weight`) under Flipout: method ``blob-adamw``."""

    def __init__(self, kl_weight: Callable[[int, int, int], float] = blob_kl_weight, **kwargs):
        super().__init__(kl_weight, **{"flipout": True, **kwargs})


class BLoBNLLELBO(FullWeightELBO):
    """The first half of BLoB's step: ``loss`` = the *mean* batch NLL under Flipout (the KL is stepped
    by :class:`BLoBUpdate`); ``nll`` and ``kl`` are logged as by ``FullWeightELBO``."""

    def __init__(self, **kwargs):
        super().__init__(**{"flipout": True, **kwargs})

    def loss_terms(self, model, guide, input_ids, attention_mask=None, labels=None, num_data=None,
                   **kwargs) -> dict:
        terms = super().loss_terms(model, guide, input_ids, attention_mask, labels, num_data, **kwargs)
        return {**terms, "loss": terms["nll"] / (num_data or input_ids.shape[0])}


class BLoBUpdate(UpdateRule):
    """BLoB's two optimisers (module docstring): AdamW (``lr``, ``adam_eps``, ``weight_decay`` of the
    ``TrainConfig``) on ``M`` and ``B``, then SGD (``kl_lr`` times the same schedule) on ``pi_i KL``.

    Args:
        kl_reweighting: ``pi_i`` of the cycle (True, the scripts) or ``1 / M`` every step.
        dataset_rescaling: cycle length :func:`blob_kl_cycle` (True, the scripts) or steps per epoch.
    The SGD has no state and ``pi_i`` is a function of the step, so resuming is exact.
    """

    def __init__(self, model: BLoBModel, guide: BLoBGuide, kl_lr: float = BLOB_KL_LR, kl_reweighting: bool = True,
                 dataset_rescaling: bool = True, gamma: float = BLOB_GAMMA):
        self.model, self.guide = model, guide
        self.kl_lr, self.kl_reweighting = kl_lr, kl_reweighting
        self.dataset_rescaling, self.gamma = dataset_rescaling, gamma
        self.cycle = 1

    def make_optimizer(self, model, guide, config: TrainConfig, num_data: int, num_processes: int):
        batch = config.batch_size * config.grad_accum
        self.cycle = (blob_kl_cycle(num_data, batch, num_processes, self.gamma) if self.dataset_rescaling
                      else math.ceil(num_data / (batch * num_processes)))
        self.kl_optimizer = torch.optim.SGD([p for m in (model, guide) for p in m.parameters() if p.requires_grad],
                                            lr=self.kl_lr)
        return torch.optim.AdamW([*model.lora_B, *guide.loc], lr=config.lr, eps=config.adam_eps,
                                 weight_decay=config.weight_decay, foreach=True)

    def kl_weight(self, step: int) -> float:
        return blob_pi(step, self.cycle) if self.kl_reweighting else 1.0 / self.cycle

    def step(self, optimizer, step: int, lr_factor: float) -> None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)  # M and B only: G keeps its NLL gradient for the SGD step
        (self.kl_weight(step) * blob_kl(self.guide, self.model.config.prior_std)).backward()
        for group in self.kl_optimizer.param_groups:
            group["lr"] = self.kl_lr * lr_factor
        self.kl_optimizer.step()
        self.kl_optimizer.zero_grad(set_to_none=True)
