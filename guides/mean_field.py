"""Mean-field Gaussian guide over the stacked latent C."""
import math

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from melora_pyro._params import pyro_param


class MeanFieldGuide(nn.Module):
    """``q(C) = N(M, diag(Omega^2))`` elementwise, for each of the model's L adapters.

    Holds ``loc`` = M ``(L, r, r)``, started at ``model.initial_c()`` (0 in the unit gauge, the
    identity with ``gauge="none"``), and ``log_scale`` = log Omega ``(L, r, r)``, started at
    ``log(init_scale)``. ``param_roles`` lets the training loop give each its own learning rate.
    """

    def __init__(self, model, init_scale: float = 1e-2):
        super().__init__()
        if init_scale <= 0:
            raise ValueError(f"init_scale must be > 0, got {init_scale}")
        self.prefix = f"{model.name}.guide"
        self.loc = nn.Parameter(model.initial_c())
        self.log_scale = nn.Parameter(torch.full_like(self.loc, math.log(init_scale)))

    @property
    def scale(self) -> torch.Tensor:
        """Omega ``(L, r, r)``."""
        return self.log_scale.exp()

    def forward(self, *args, **kwargs):
        loc = pyro_param(f"{self.prefix}.loc", self.loc)
        scale = pyro_param(f"{self.prefix}.log_scale", self.log_scale).exp()
        with pyro.plate("adapters", loc.shape[0]):
            return pyro.sample("C", dist.Normal(loc, scale).to_event(2))

    def param_roles(self) -> dict[str, list[nn.Parameter]]:
        """M and log Omega for ``train.make_optimizer``'s ``guide_lr`` and ``guide_scale_lr`` groups."""
        return {"loc": [self.loc], "scale": [self.log_scale]}

    def posterior_mean(self) -> dict[str, torch.Tensor]:
        """``{"C": M}``, the posterior mean ``(L, r, r)``."""
        return {"C": self.loc}

    def posterior_std(self) -> dict[str, torch.Tensor]:
        """``{"C": Omega}``, the posterior std ``(L, r, r)`` (the GLM predictive's variance)."""
        return {"C": self.scale}
