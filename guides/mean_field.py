"""Mean-field Gaussian guide over the stacked latent C."""
import math

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from melora_pyro._params import pyro_param


class MeanFieldGuide(nn.Module):
    """``q(C) = N(M, diag(Omega^2))`` elementwise, for each of the model's L adapters.

    Holds ``loc`` = M ``(L, r, r)``, started at the identity so that B C A starts as B A (M = 0
    would zero every gradient and make the full-weight KL infinite), and ``log_scale`` = log Omega
    ``(L, r, r)``, started at ``log(init_scale)``.
    """

    def __init__(self, model, init_scale: float = 1e-2):
        super().__init__()
        if init_scale <= 0:
            raise ValueError(f"init_scale must be > 0, got {init_scale}")
        L, r = model.num_adapters, model.rank
        self.prefix = f"{model.name}.guide"
        device = model.lora_A[0].device
        self.loc = nn.Parameter(torch.eye(r, device=device).repeat(L, 1, 1))
        self.log_scale = nn.Parameter(torch.full((L, r, r), math.log(init_scale), device=device))

    @property
    def scale(self) -> torch.Tensor:
        """Omega ``(L, r, r)``."""
        return self.log_scale.exp()

    def forward(self, *args, **kwargs):
        loc = pyro_param(f"{self.prefix}.loc", self.loc)
        scale = pyro_param(f"{self.prefix}.log_scale", self.log_scale).exp()
        with pyro.plate("adapters", loc.shape[0]):
            return pyro.sample("C", dist.Normal(loc, scale).to_event(2))

    def posterior_mean(self) -> dict[str, torch.Tensor]:
        """``{"C": M}``, the posterior mean ``(L, r, r)``."""
        return {"C": self.loc}
