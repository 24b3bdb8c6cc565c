"""Antithetic draws of a symmetric guide, as a Pyro effect handler.

For a guide ``q(C) = N(M, Omega^2)`` a draw ``C = M + Omega o eps`` has a mirror ``C' = M - Omega o eps``
(``2 M - C``) with the same distribution. Averaging the two, the reparameterised gradient of
``E_q[f(C)]`` with respect to Omega,

    (eps o (grad f(M + Omega o eps) - grad f(M - Omega o eps))) o Omega / 2,

loses the term ``eps o grad f(M) o Omega`` that dominates one draw's noise wherever the likelihood's
gradient at M is not zero (always, on a minibatch): for a quadratic ``f`` it cancels exactly, for a
smooth one up to third order. That noise does not average out: Adam's constant-rate steps then leave
log Omega fluctuating, and ``E[exp(2 log Omega)] > exp(2 E[log Omega])`` biases it low
(``experiments.known_optimum``).

Use::

    with mirror(first_guide_trace):          # around the guide only; the model replays its values
        guide(...)

Inside, each latent site of the recorded trace whose guide distribution is a symmetric Gaussian
(``Normal``, ``MultivariateNormal``, ``LowRankMultivariateNormal``, possibly ``.to_event``) takes
``2 mean - value`` instead of a fresh draw; a ``Delta`` site keeps its value (its mirror is itself).
"""
from __future__ import annotations

import pyro.distributions as dist
from pyro.poutine.messenger import Messenger
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import site_is_subsample

SYMMETRIC = (dist.Normal, dist.MultivariateNormal, dist.LowRankMultivariateNormal)


def is_mirrorable(fn) -> bool:
    """Whether a guide distribution is one whose draws :class:`MirrorMessenger` reflects."""
    while isinstance(fn, dist.Independent):
        fn = fn.base_dist
    return isinstance(fn, SYMMETRIC)


def random_sites(guide_trace: Trace) -> list[str]:
    """The latent sites of a guide trace that are random (not ``Delta``, not marked ``fixed``): the
    ones an antithetic draw changes. Raises ``ValueError`` for a random site that is not symmetric."""
    names = []
    for name, site in guide_trace.nodes.items():
        if (site["type"] != "sample" or site["is_observed"] or site["infer"].get("fixed")
                or site_is_subsample(site)):
            continue
        fn = site["fn"]
        while isinstance(fn, dist.Independent):
            fn = fn.base_dist
        if isinstance(fn, dist.Delta):
            continue
        if not is_mirrorable(fn):
            raise ValueError(f"antithetic draws need a symmetric Gaussian guide; site {name!r} is "
                             f"{type(fn).__name__}")
        names.append(name)
    return names


class MirrorMessenger(Messenger):
    """Replaces the draw of each site in ``names`` by the mirror ``2 mean - value`` of its value in
    ``trace`` (the same site of the first draw)."""

    def __init__(self, trace: Trace, names: list[str]):
        super().__init__()
        self.trace, self.names = trace, set(names)

    def _pyro_sample(self, msg):
        if msg["name"] not in self.names or msg["is_observed"]:
            return
        msg["value"] = 2 * msg["fn"].mean - self.trace.nodes[msg["name"]]["value"]


def mirror(trace: Trace, names: list[str] | None = None) -> MirrorMessenger:
    """The effect handler that draws the antithetic partner of ``trace`` (its ``random_sites`` by default)."""
    return MirrorMessenger(trace, random_sites(trace) if names is None else names)
