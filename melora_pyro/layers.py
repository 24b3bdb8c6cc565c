"""The adapted linear layer and its injection into a transformers model."""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from .errors import ConfigError
from .flipout import flipout_perturbation


class Binding(NamedTuple):
    """What a ``MeLoRALinear`` is bound to for one forward: ``A (r, n)``, ``BC = B @ C (m, r)`` and
    optional Flipout noise (``melora_pyro.flipout``): ``a_noise (r, n)`` on A (BLoB: ``A`` is then A's
    mean), or ``c_noise (r, r)`` on C with ``B (m, r)`` (Me-LoRA: ``BC`` is then ``B @ M``, M C's mean)."""

    A: torch.Tensor
    BC: torch.Tensor
    a_noise: torch.Tensor | None = None
    B: torch.Tensor | None = None
    c_noise: torch.Tensor | None = None


class MeLoRALinear(nn.Module):
    """``y = W0 x + s * (B C) A x`` around a frozen ``nn.Linear`` (W0: m x n).

    The adapter tensors are not owned here: the model binds, before each forward, this layer's
    :class:`Binding` (a tuple ``(A, BC, ...)``), slices of its stacked parameters and sampled C, so all
    layers share one Pyro sample site. ``dropout`` acts on the adapter input, as in peft. With Flipout
    noise on A the layer adds ``s BC (((x o r) E^T) o s')``, on C ``s B (((z o r) E^T) o s')`` with
    ``z = A x``; fresh signs per example and token (``melora_pyro.flipout``).
    """

    def __init__(self, base: nn.Linear, scaling: float, dropout: float = 0.0):
        super().__init__()
        self.base = base
        self.scaling = scaling
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.bound: tuple[torch.Tensor, ...] | None = None

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bound is None:
            raise RuntimeError("MeLoRALinear called outside MeLoRAModel.forward: no adapter bound "
                               "(call the MeLoRAModel, or export with melora_pyro.merge_adapters)")
        bound = Binding(*self.bound)
        x_in = self.dropout(x).to(bound.A.dtype)
        low_rank = x_in @ bound.A.mT
        if bound.a_noise is not None:
            low_rank = low_rank + flipout_perturbation(x_in, bound.a_noise)
        update = low_rank @ bound.BC.mT
        if bound.c_noise is not None:
            update = update + flipout_perturbation(low_rank, bound.c_noise) @ bound.B.mT
        return self.base(x) + (self.scaling * update).to(x.dtype)


def inject_adapters(model: nn.Module, target_modules, rank: int, scaling: float, dropout: float
                    ) -> dict[str, MeLoRALinear]:
    """Replace every ``nn.Linear`` whose name matches ``target_modules`` by a ``MeLoRALinear``.

    A target matches the last component of a module path (``"q_proj"``) or a whole path
    (``"lm_head"``, ``"model.layers.0.self_attn.q_proj"``). Returns ``{path: layer}`` in module order.
    Raises ``errors.ConfigError`` (a ValueError) for a target that matches no ``nn.Linear`` or a rank
    above min(n, m).
    """
    targets = set(target_modules)
    found = {name: module for name, module in model.named_modules()
             if isinstance(module, nn.Linear) and (name in targets or name.rsplit(".", 1)[-1] in targets)}
    matched = {t for t in targets for name in found if name == t or name.rsplit(".", 1)[-1] == t}
    missing = sorted(targets - matched)
    if missing:
        linear_names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ConfigError(f"target_modules {missing} match no nn.Linear in {type(model).__name__}; "
                          f"its linear modules are named {linear_names}")
    for name, linear in found.items():  # every check before the first replacement: none or all are adapted
        if rank > min(linear.in_features, linear.out_features):
            raise ConfigError(f"rank {rank} exceeds min(n, m) = {min(linear.in_features, linear.out_features)} "
                              f"of {name} ({linear.out_features} x {linear.in_features})")
    adapted = {}
    for name, linear in found.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        adapted[name] = MeLoRALinear(linear, scaling, dropout)
        setattr(parent, child, adapted[name])
    return adapted
