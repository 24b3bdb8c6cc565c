"""The linearised (GLM) predictive of a Gaussian posterior over some parameters ``theta``.

Linearising the label logits around the posterior mean, ``f(theta) ~ f(m) + J (theta - m)``, turns a
posterior ``N(m, diag(v))`` into Gaussian label logits ``N(f(m), J diag(v) J^T)`` per example, ``J``
``(K, P)`` the Jacobian of the offered labels' logits (one backward pass per offered label); the
predictive is the mean softmax of logit draws ``f(m) + chol(J diag(v) J^T + jitter I) z``. The mean
prediction is ``f(m)``'s, so a wider posterior softens the probabilities without moving the argmax much.
Laplace-LoRA's predictive (``baselines.laplace``, ``theta = (A, B)``) and Me-LoRA's
(``baselines.method.PyroMethod`` with ``predictive="glm"``, ``theta = C``) are this.

Assumptions: the posterior is diagonal in ``theta``; labels a question does not offer have logit
``-inf`` and get zero rows and columns in the covariance.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

GLM_SAMPLES = 100_000  # logit draws per example, as Laplace-LoRA's run_gpt_laplace.py
GLM_JITTER = 1e-6      # added to the logit covariance's diagonal before its Cholesky factor, as the reference
SAMPLE_CHUNK = 8_192   # logit draws held in memory at once per example


def label_jacobian(logits_fn: Callable[[], torch.Tensor], params: Sequence[torch.Tensor]):
    """``(logits (1, K), jacobian (n, P), offered (n,))`` of a one-example batch: ``logits_fn()`` the
    label logits (differentiable in ``params``, ``-inf`` for labels not offered), ``jacobian`` the
    derivatives of the ``n`` offered labels' logits in the flattened ``params`` (``P`` numbers)."""
    with torch.enable_grad():
        logits = logits_fn()
        row = logits[0]
        offered = row.isfinite().nonzero().flatten()
        jacobian = logits.new_zeros(len(offered), sum(p.numel() for p in params))
        for n, k in enumerate(offered.tolist()):
            grads = torch.autograd.grad(row[k], params, retain_graph=n + 1 < len(offered), allow_unused=True)
            jacobian[n] = torch.cat([(g if g is not None else torch.zeros_like(p)).flatten()
                                     for g, p in zip(grads, params)])
    return logits.detach(), jacobian, offered


def logit_covariance(jacobian: torch.Tensor, offered: torch.Tensor, variance: torch.Tensor,
                     num_labels: int) -> torch.Tensor:
    """``J diag(variance) J^T`` placed on the offered labels, ``(1, K, K)``; ``variance`` ``(P,)``."""
    covariance = jacobian.new_zeros(1, num_labels, num_labels)
    covariance[0, offered[:, None], offered] = (jacobian * variance) @ jacobian.T
    return covariance


def gaussian_softmax_mean(mean: torch.Tensor, covariance: torch.Tensor, num_samples: int = GLM_SAMPLES) -> torch.Tensor:
    """Mean softmax of ``num_samples`` draws of ``N(mean, covariance)`` logits (``(b, K)``, ``(b, K, K)``),
    ``(b, K)``; labels with ``-inf`` mean get probability 0. Drawn in chunks of ``SAMPLE_CHUNK``."""
    eye = torch.eye(mean.shape[-1], dtype=covariance.dtype, device=covariance.device)
    factor = torch.linalg.cholesky(covariance + GLM_JITTER * eye)
    total = mean.new_zeros(mean.shape)
    for start in range(0, num_samples, SAMPLE_CHUNK):
        z = torch.randn(min(SAMPLE_CHUNK, num_samples - start), *mean.shape, 1, dtype=mean.dtype, device=mean.device)
        total += (mean + (factor @ z).squeeze(-1)).softmax(-1).sum(0)
    return total / num_samples
