"""Point-mass guides: a learned C (MAP) and a fixed C = I (plain LoRA)."""
import pyro
import pyro.distributions as dist
import torch
from torch import nn

from melora_pyro._params import pyro_param


class DeltaGuide(nn.Module):
    """``q(C) = delta(M)``: the ELBO becomes the MAP objective log p(y | C) + log p(C)."""

    def __init__(self, model):
        super().__init__()
        self.prefix = f"{model.name}.guide"
        self.loc = nn.Parameter(model.initial_c())

    def forward(self, *args, **kwargs):
        loc = pyro_param(f"{self.prefix}.loc", self.loc)
        with pyro.plate("adapters", loc.shape[0]):
            return pyro.sample("C", dist.Delta(loc, event_dim=2))

    def posterior_mean(self) -> dict[str, torch.Tensor]:
        return {"C": self.loc}


class IdentityGuide(nn.Module):
    """C fixed at the identity, no latent and no prior term: the model is plain LoRA ``B A``.

    The site is marked ``infer={"fixed": True}``, which tells ``FullWeightELBO`` to skip its prior.
    It needs a model with ``MeLoRAConfig(gauge="none")``: in the unit gauge A and B have unit length,
    so a fixed C = I could not learn the update's size.
    """

    def __init__(self, model):
        super().__init__()
        if model.config.gauge != "none":
            raise ValueError(f"IdentityGuide (plain LoRA, C = I) needs MeLoRAConfig(gauge='none'), "
                             f"got gauge={model.config.gauge!r}: in that gauge C carries the update's size")
        self.register_buffer("loc", torch.eye(model.rank, device=model.lora_A[0].device)
                             .repeat(model.num_adapters, 1, 1))

    def forward(self, *args, **kwargs):
        with pyro.plate("adapters", self.loc.shape[0]):
            return pyro.sample("C", dist.Delta(self.loc, event_dim=2), infer={"fixed": True})

    def posterior_mean(self) -> dict[str, torch.Tensor]:
        return {"C": self.loc}
