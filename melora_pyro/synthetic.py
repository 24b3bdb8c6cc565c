"""Synthetic problems with known answers, for tests and the posterior studies (``experiments``).

- :func:`marked_token_task`: a 4-way classification a tiny LLaMA can learn (the label is marked by one
  token), with 10% label noise so no classifier reaches 100%;
- :class:`LinearGaussianModel` / :func:`linear_gaussian_problem`: a likelihood linear-Gaussian in C under
  the full-weight prior, whose mean-field ELBO optimum ``(M, Omega)`` is known in closed form.

Both yield ``(input, target)`` pairs that :func:`collate_pairs` batches for :func:`melora_pyro.train.train`.
"""
from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from .priors import FullWeightNormal

MARKED_TASK_LABELS = [10, 11, 12, 13]  # the label tokens of marked_token_task's four classes


def marked_token_task(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids (n, 8), labels (n,))``: label k is marked by token ``20 + k`` at a random position
    among random tokens 40..127; 10% of the labels are then redrawn at random."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(40, 128, (n, 8), generator=g)
    labels = torch.randint(0, 4, (n,), generator=g)
    ids[torch.arange(n), torch.randint(0, 7, (n,), generator=g)] = 20 + labels
    flip = torch.rand(n, generator=g) < 0.1
    labels[flip] = torch.randint(0, 4, (int(flip.sum()),), generator=g)
    return ids, labels


def collate_pairs(pairs: list) -> dict:
    """``{"input_ids", "labels"}``: the inputs and the targets of ``(input, target)`` pairs, stacked."""
    return {"input_ids": torch.stack([x for x, _ in pairs]), "labels": torch.stack([torch.as_tensor(y) for _, y in pairs])}


class LinearGaussianModel(nn.Module):
    """``y_n = X_n vec(C) + N(0, noise^2 I)`` (``X_n``: outputs x r^2) with the full-weight prior on C
    (std ``prior_std``, scale ``scale``) through fixed A (r x n), B (m x r): the posterior over C is
    Gaussian and known in closed form (:meth:`optimum`). Same call signature as ``MeLoRAModel``
    (``input_ids`` are the ``X_n``, ``labels`` the ``y_n``), so the guides, ELBO and ``train()`` apply."""

    name, num_adapters = "linear_gaussian", 1

    def __init__(self, A: torch.Tensor, B: torch.Tensor, noise: float = 0.3, prior_std: float = 0.2,
                 scale: float = 2.0):
        super().__init__()
        self.rank, self.noise, self.prior_std, self.scale = A.shape[0], noise, prior_std, scale
        self.gram_a, self.gram_b = (A @ A.mT)[None], (B.mT @ B)[None]

    def prior(self):
        return FullWeightNormal(self.gram_a, self.gram_b, self.prior_std, self.scale)

    def initial_c(self):
        return torch.zeros(1, self.rank, self.rank)

    def forward(self, input_ids, attention_mask=None, labels=None, num_data=None, choice_mask=None):
        with pyro.plate("adapters", 1):
            C = pyro.sample("C", self.prior())
        mean = input_ids @ C.reshape(-1)
        with pyro.plate("data", size=num_data, subsample=torch.arange(len(input_ids))):
            pyro.sample("y", dist.Normal(mean, self.noise).to_event(1), obs=labels)

    def optimum(self, X: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean-field optimum ``(M, Omega)`` (each r x r) of the ELBO on all of ``X``, ``y``: the exact
        posterior mean and ``Omega_k = Lambda_kk^(-1/2)`` for the posterior precision Lambda (the
        prior's Hessian by autograd)."""
        r = self.rank
        neg_log_prior = lambda c: -self.prior().log_prob(c.reshape(1, r, r)).sum()  # noqa: E731
        prior_precision = torch.autograd.functional.hessian(neg_log_prior, torch.zeros(r * r))
        design = X.reshape(-1, r * r)
        precision = prior_precision + design.T @ design / self.noise**2
        mean = torch.linalg.solve(precision, design.T @ y.reshape(-1) / self.noise**2)
        return mean.reshape(r, r), precision.diagonal().rsqrt().reshape(r, r)


def linear_gaussian_problem(seed: int = 0, n: int = 8, rank: int = 3, outputs: int = 6
                            ) -> tuple[LinearGaussianModel, torch.Tensor, torch.Tensor]:
    """``(model, X (n, outputs, rank^2), y (n, outputs))``, all drawn from ``seed``: A (rank x 5),
    B (4 x rank), a true C and y from the model. Column k of the design is scaled by ``5^(k/8 - 1/2)``,
    so the optimal Omega spreads over a factor of about 5."""
    g = torch.Generator().manual_seed(seed)
    A, B = torch.randn(rank, 5, generator=g), torch.randn(4, rank, generator=g)
    X = torch.randn(n, outputs, rank * rank, generator=g) * 5.0 ** (torch.arange(rank * rank) / 8 - 0.5)
    C = torch.randn(rank, rank, generator=g)
    model = LinearGaussianModel(A, B)
    y = X @ C.reshape(-1) + model.noise * torch.randn(n, outputs, generator=g)
    return model, X, y
