"""Pyro guides for ``melora_pyro.MeLoRAModel``.

Every guide is called with the model's arguments and provides the ``"C"`` site in the
``"adapters"`` plate, so one model object trains under any of them and A, B carry over when the
guide is switched (e.g. MAP first, then variational inference). ``posterior_mean()`` returns
``{site: value}``, which ``melora_pyro.predict_proba(num_samples=0)`` and the merged export use.
"""
from .point import DeltaGuide, IdentityGuide
from .mean_field import MeanFieldGuide

__all__ = ["MeanFieldGuide", "DeltaGuide", "IdentityGuide"]
