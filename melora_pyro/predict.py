"""Posterior-averaged prediction (the Bayesian model average over guide samples)."""
from __future__ import annotations

import pyro.poutine as poutine
import torch


@torch.no_grad()
def predict_proba(model, guide, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                  num_samples: int = 10, choice_mask: torch.Tensor | None = None, **readout_inputs) -> torch.Tensor:
    """Mean over ``num_samples`` guide draws of the model's label probabilities, ``(batch, K)``.

    Each draw costs one forward pass of the base model (the readout's positions only);
    ``readout_inputs`` are the readout's extra batch tensors (``melora_pyro.packing.pack_batch``). ``num_samples=0``
    uses the posterior mean (``guide.posterior_mean()``) instead: one deterministic forward.
    Equivalent to ``Predictive(model, guide=guide, num_samples=N, return_sites=["probs"])``
    averaged over samples, without Predictive's extra model run to guess plate nesting.
    """
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask, choice_mask=choice_mask, **readout_inputs)
    if num_samples == 0:
        return _probs(poutine.condition(model, data=guide.posterior_mean()), inputs)
    total = 0.0
    for _ in range(num_samples):
        guide_trace = poutine.trace(guide).get_trace(**inputs)
        total = total + _probs(poutine.replay(model, trace=guide_trace), inputs)
    return total / num_samples


def _probs(model, inputs) -> torch.Tensor:
    return poutine.trace(model).get_trace(**inputs).nodes["probs"]["value"]
