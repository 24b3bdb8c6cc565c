"""Registering module-owned tensors with Pyro's global parameter store."""
import pyro
import torch


def pyro_param(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """``pyro.param(name, tensor)`` that always returns ``tensor`` itself.

    Plain ``pyro.param`` returns whatever the store already holds under ``name``, so a model
    rebuilt in the same process would silently train the old tensors while computing with the new
    ones. Here the module owns its parameters and a stale entry is replaced. ``tensor`` must be an
    unconstrained leaf (constraints are applied by the caller, e.g. ``omega = log_omega.exp()``).
    """
    store = pyro.get_param_store()
    if name in store and store[name] is not tensor:
        del store[name]
    return pyro.param(name, tensor)
