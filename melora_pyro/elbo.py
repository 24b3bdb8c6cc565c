"""``FullWeightELBO``: Monte Carlo likelihood plus the closed-form KL of the prior on C; ``KLScheduleELBO``:
the same with the KL weighted per step."""
from __future__ import annotations

import contextlib
from collections.abc import Callable

import pyro.poutine as poutine
import torch
from pyro.distributions import Delta
from pyro.distributions.util import scale_and_mask
from pyro.infer import Trace_ELBO
from pyro.infer.util import is_validation_enabled, torch_item
from pyro.poutine.util import site_is_subsample
from pyro.util import check_model_guide_match, warn_if_nan
from torch.distributions import kl_divergence

from .antithetic import mirror, random_sites
from .flipout import flipout


class FullWeightELBO(Trace_ELBO):
    """The negative ELBO ``-E_q[log p(y | x, C)] + KL(q(C) || p(C))`` with an analytic KL.

    Estimator: per particle, one reparameterised draw of every latent from the guide gives the
    likelihood term (the observed sites, scaled by their plates, e.g. ``num_data / batch``); each
    latent contributes ``kl(model_site, guide_site)`` instead of ``log q - log p``:

    - a distribution guide: ``kl_divergence(q, p)`` in closed form. With the full-weight prior
      the KL depends on A and B, so its gradient reaches them (DESIGN.md section 3);
    - ``Delta`` guide: ``-log p(C_map)``, so the objective is MAP;
    - a site marked ``infer={"fixed": True}`` (``IdentityGuide``): nothing, the likelihood alone.

    Assumptions: every latent is reparameterisable and has a guide site; a KL site's scale is
    taken from the model site, so ``poutine.scale`` must wrap model and guide alike. Only the
    observed sites' log-probabilities are computed (no unused ``log_prob`` of the latents).
    ``loss()`` and the gradients use the same estimate.

    ``flipout=True`` runs each call (all its particles) in one ``melora_pyro.flipout`` block: a model that
    supports it (``MeLoRAModel``, ``BLoBModel``) then applies its Normal latents by Flipout, with the
    noise decorrelated across examples and tokens; the KL is unchanged.

    ``antithetic=True`` follows each of the ``num_particles`` draws by its mirror ``2 M - C``
    (``melora_pyro.antithetic``) and averages the pair: the same objective, an unbiased estimate whose
    gradient in the guide's scale loses the noise of the likelihood's gradient at M. It costs one more
    forward and backward per draw, except for a guide without random sites (MAP), which is run once.
    It does not combine with ``flipout`` (the model draws Flipout's noise itself).
    """

    def __init__(self, *, flipout: bool = False, antithetic: bool = False, **kwargs):
        super().__init__(**kwargs)
        if flipout and antithetic:
            raise ValueError("antithetic draws do not combine with flipout (the model draws its own noise)")
        self.flipout, self.antithetic = flipout, antithetic

    def _get_traces(self, model, guide, args, kwargs):
        if not self.antithetic:
            yield from super()._get_traces(model, guide, args, kwargs)
            return
        for _ in range(self.num_particles):
            model_trace, guide_trace = self._get_trace(model, guide, args, kwargs)
            yield model_trace, guide_trace
            names = random_sites(guide_trace)
            if names:  # the mirror handler wraps the guide alone: the replayed model takes its values
                yield self._get_trace(model, mirror(guide_trace, names)(guide), args, kwargs)

    def _get_trace(self, model, guide, args, kwargs):
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
        if is_validation_enabled():
            check_model_guide_match(model_trace, guide_trace)
        return model_trace, guide_trace

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        return self.loss_terms(model, guide, *args, **kwargs)["loss"]

    def loss(self, model, guide, *args, **kwargs) -> float:
        with torch.no_grad():
            return torch_item(self.differentiable_loss(model, guide, *args, **kwargs))

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        if loss.requires_grad:
            loss.backward()
        return torch_item(loss)

    def loss_terms(self, model, guide, *args, **kwargs) -> dict:
        """``loss = nll + kl`` averaged over particles (and their mirrors), with ``probs`` ``(batch, K)`` of the last one."""
        nll = kl = 0.0
        count = 0
        with flipout() if self.flipout else contextlib.nullcontext():
            for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
                particle_nll, particle_kl = self.particle_terms(model_trace, guide_trace)
                nll, kl, count = nll + particle_nll, kl + particle_kl, count + 1
        nll, kl = nll / count, kl / count
        loss = nll + kl
        if is_validation_enabled():  # reading the value synchronises a GPU
            warn_if_nan(loss, "loss")
        probs = model_trace.nodes["probs"]["value"] if "probs" in model_trace.nodes else None
        return {"loss": loss, "nll": nll, "kl": kl, "probs": probs}

    def particle_terms(self, model_trace, guide_trace) -> tuple[torch.Tensor, torch.Tensor]:
        """``(-log p(y | x, C), KL)`` for one particle."""
        nll = kl = torch.zeros(())
        for name, site in model_trace.nodes.items():
            if site["type"] != "sample" or site_is_subsample(site) or site["infer"].get("_deterministic"):
                continue
            if site["is_observed"]:
                nll = nll - self.log_likelihood(site)
            else:
                kl = kl + self.kl(site, guide_trace.nodes[name])
        return nll, kl

    def log_likelihood(self, site) -> torch.Tensor:
        """Scaled and masked ``log p(value)`` of an observed site, summed."""
        log_p = site["fn"].log_prob(site["value"])
        return scale_and_mask(log_p, site["scale"], site["mask"]).sum()

    def kl(self, model_site, guide_site) -> torch.Tensor:
        """The prior term of one latent site (see the class docstring)."""
        if guide_site["infer"].get("fixed"):
            return guide_site["value"].new_zeros(())
        q, p = guide_site["fn"], model_site["fn"]
        if isinstance(q, Delta):
            term = -p.log_prob(guide_site["value"])
        else:
            if not q.has_rsample:
                raise NotImplementedError(f"FullWeightELBO needs a reparameterised guide at site "
                                          f"{guide_site['name']!r}, got {type(q).__name__}")
            term = kl_divergence(q, p)
        return scale_and_mask(term, model_site["scale"]).sum()


class KLScheduleELBO(FullWeightELBO):
    """``FullWeightELBO`` whose KL is multiplied by ``kl_weight(step, num_data, batch_size)``: BLoB's
    re-weighting cycle (``baselines.BLoBELBO``), or a constant ``w`` (:func:`constant_kl_weight`, the
    ``kl_weight`` option of the Me-LoRA methods: ``w < 1`` a tempered, ``w > 1`` a prior-heavier posterior).

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


def constant_kl_weight(weight: float) -> Callable[[int, int, int], float]:
    """The schedule of :class:`KLScheduleELBO` that is ``weight`` at every step."""
    return lambda step, num_data, batch_size: weight
