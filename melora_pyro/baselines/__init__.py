"""Baselines and ablations of Me-LoRA in one framework (see ``melora_pyro.methods`` for the registry).

- :mod:`.method`: ``PyroMethod`` (model + guide + ELBO trained by the shared loop), ``PointMethod``;
- :mod:`.ensemble`: deep ensembles of adapter sets;
- :mod:`.laplace`: post-hoc diagonal Laplace over A and B;
- :mod:`.blob`: BLoB (Bayesian A, Flipout, KL re-weighting, its two optimisers) as a Pyro model and guide;
- :mod:`.diagonal`: Me-LoRA with a diagonal latent C and its restricted full-weight prior;
- :mod:`.zero_shot`: the base model without adapters.
- :mod:`.temperature`: temperature scaling on top of any method (``map-ts``).
- :mod:`.glm_predictive`: Me-LoRA's linearised (GLM) predictive (``predictive="glm"``).
"""
from .blob import (BLoBELBO, BLoBGuide, BLoBModel, BLoBNLLELBO, BLoBUpdate, blob_kl,
                   blob_kl_cycle, blob_kl_weight, blob_pi)
from .diagonal import (DiagonalFullWeightNormal, DiagonalGuide, DiagonalMeLoRAModel,
                       diagonal_full_weight_kl, diagonal_full_weight_kl_terms)
from .ensemble import EnsembleMethod
from .glm_predictive import GLMPredictiveMethod
from .laplace import LaplaceMethod
from .method import PointMethod, PyroMethod, set_adapter_dropout
from .temperature import TemperatureScaledMethod
from .zero_shot import ZeroShotMethod

__all__ = [
    "PyroMethod", "PointMethod", "set_adapter_dropout", "TemperatureScaledMethod", "EnsembleMethod", "LaplaceMethod", "GLMPredictiveMethod",
    "BLoBModel", "BLoBGuide", "BLoBELBO", "BLoBNLLELBO", "BLoBUpdate",
    "blob_kl", "blob_kl_cycle", "blob_kl_weight", "blob_pi",
    "DiagonalMeLoRAModel", "DiagonalGuide", "DiagonalFullWeightNormal", "diagonal_full_weight_kl",
    "diagonal_full_weight_kl_terms", "ZeroShotMethod",
]
