"""Baselines and ablations of Me-LoRA in one framework (see ``melora_pyro.methods`` for the registry).

- :mod:`.method`: ``PyroMethod`` (model + guide + ELBO trained by the shared loop), ``PointMethod``;
- :mod:`.ensemble`: deep ensembles of adapter sets;
- :mod:`.laplace`: post-hoc diagonal Laplace over A and B;
- :mod:`.blob`: BLoB (Bayesian A, KL re-weighting) as a Pyro model and guide;
- :mod:`.diagonal`: Me-LoRA with a diagonal latent C and its restricted full-weight prior;
- :mod:`.zero_shot`: the base model without adapters.
"""
from .blob import BLoBELBO, BLoBGuide, BLoBModel, KLScheduleELBO, blob_kl_weight
from .diagonal import (DiagonalFullWeightNormal, DiagonalGuide, DiagonalMeLoRAModel,
                       diagonal_full_weight_kl, diagonal_full_weight_kl_terms)
from .ensemble import EnsembleMethod
from .laplace import LaplaceMethod
from .method import PointMethod, PyroMethod, set_adapter_dropout
from .zero_shot import ZeroShotMethod

__all__ = [
    "PyroMethod", "PointMethod", "set_adapter_dropout", "EnsembleMethod", "LaplaceMethod",
    "BLoBModel", "BLoBGuide", "BLoBELBO", "KLScheduleELBO", "blob_kl_weight",
    "DiagonalMeLoRAModel", "DiagonalGuide", "DiagonalFullWeightNormal", "diagonal_full_weight_kl",
    "diagonal_full_weight_kl_terms", "ZeroShotMethod",
]
