"""Registering module-owned tensors with Pyro's global parameter store."""
import pyro
import torch


def pyro_param(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """``pyro.param(name, tensor)`` that always returns ``tensor`` itself.

    Plain ``pyro.param`` returns whatever the store already holds under ``name``, so a model
    rebuilt in the same process would silently train the old tensors while computing with the new
    ones. Here the module owns its parameters and a stale entry is replaced. ``tensor`` must be an
    unconstrained leaf (constraints are applied by the caller, e.g. ``omega = log_omega.exp()``).
    A tensor the module froze (``requires_grad=False``, e.g. A and B under ``--freeze-ab``) stays
    frozen: the store would switch its gradient on.
    """
    store = pyro.get_param_store()
    if name in store and store[name] is not tensor:
        del store[name]
    frozen = not tensor.requires_grad
    value = pyro.param(name, tensor)
    if frozen:
        tensor.requires_grad_(False)
    return value
