"""Flipout (Wen et al., 2018) for the adapters, as a Pyro effect handler in the spirit of TyXe's ``flipout``.

A weight ``A ~ N(M, diag(sigma^2))`` of a linear map ``x -> x A^T`` is applied as

    x M^T + ((x o r) E^T) o s,    E = sigma o eps  (one eps per layer and forward),

with independent random signs ``r`` (``..., n``) and ``s`` (``..., r``) for every example *and* token
(every leading index of ``x``). Each output row then sees its own weight ``M + E o (s r^T)``, a draw
with the same distribution as ``A`` (the signs leave a zero-mean symmetric ``E`` unchanged), while the
rows of a batch are decorrelated: the gradient variance of one shared draw falls by about the batch
size. This is BLoB's estimator (``modelwrappers/blob.py`` of Wang-ML-Lab/bayesian-peft), at training
and at evaluation.

Use::

    with flipout():                      # around the guide *and* the model (an ELBO or a prediction)
        ...guide(...); replay(model)(...)

Inside, a latent site whose guide distribution is a ``Normal`` (possibly ``.to_event``) is recorded
by its sampled value; the model asks :func:`flipout_parameters` for the ``(loc, scale)`` behind the
value it received and then binds ``loc`` and ``noise`` (:func:`flipout_noise`) to its layers, which add
:func:`flipout_perturbation` to their output. Outside a ``flipout`` block the model uses the sample.
"""
from __future__ import annotations

import pyro.distributions as dist
import torch
from pyro.poutine.messenger import Messenger
from pyro.poutine.runtime import _PYRO_STACK


class FlipoutMessenger(Messenger):
    """Records ``value -> (loc, scale)`` of every latent Normal site sampled inside the block.

    The first record of a value wins: the guide's ``q`` (sampled first), not the model's prior that
    the replayed model site carries with the same value. Entries are keyed by ``id`` and keep the value
    itself: alive, its id cannot be reused by a later sample of the block (several posterior samples
    in one prediction), and a lookup checks it is the same tensor.
    """

    def __init__(self):
        super().__init__()
        self.sources: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def _pyro_post_sample(self, msg):
        value = msg["value"]
        if msg["is_observed"] or self.lookup(value) is not None:
            return
        fn = msg["fn"]
        while isinstance(fn, dist.Independent):
            fn = fn.base_dist
        if isinstance(fn, dist.Normal):
            self.sources[id(value)] = (value, fn.loc, fn.scale)

    def lookup(self, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(loc, scale)`` recorded for this very tensor, or None."""
        entry = self.sources.get(id(value))
        return entry[1:] if entry is not None and entry[0] is value else None


def flipout() -> FlipoutMessenger:
    """A fresh :class:`FlipoutMessenger`, to be used as a context manager."""
    return FlipoutMessenger()


def flipout_parameters(value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(loc, scale)`` of the guide Normal that sampled ``value`` in the innermost active ``flipout``
    block, or ``None`` outside one (or for a value it did not record)."""
    for handler in reversed(_PYRO_STACK):
        if isinstance(handler, FlipoutMessenger):
            return handler.lookup(value)
    return None


def flipout_noise(scale: torch.Tensor) -> torch.Tensor:
    """``E = scale o eps``, ``eps ~ N(0, I)``: one draw shared by the examples and tokens of a forward."""
    return scale * torch.randn_like(scale)


def rademacher(shape, like: torch.Tensor) -> torch.Tensor:
    """Independent signs +-1 with probability 1/2, ``shape``, dtype and device of ``like``."""
    return torch.randint(0, 2, shape, device=like.device).to(like.dtype).mul_(2).sub_(1)


def flipout_perturbation(x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """``((x o r) noise^T) o s`` for ``x`` ``(..., n)`` and ``noise`` ``(r, n)``; returns ``(..., r)``.

    ``r`` (``..., n``) and ``s`` (``..., r``) are fresh signs for every leading index of ``x`` (example and
    token), drawn from the global torch RNG.
    """
    r = rademacher(x.shape, x)
    s = rademacher((*x.shape[:-1], noise.shape[0]), x)
    return ((x * r) @ noise.mT) * s
