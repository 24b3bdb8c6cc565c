"""melora-pyro: memory-efficient Bayesian LoRA (Me-LoRA) for Hugging Face causal LMs, in Pyro."""
from . import kl, metrics
from .config import MeLoRAConfig
from .elbo import FullWeightELBO, KLScheduleELBO
from .errors import ConfigError, MeLoRAError
from .io import CheckpointError, load_adapters, merge_adapters, save_adapters
from .model import MeLoRAModel
from .predict import predict_proba
from .priors import ElementwisePrior, FullWeightPrior
from .state import count_adapter_state

__all__ = [
    "MeLoRAConfig", "MeLoRAModel", "FullWeightELBO", "KLScheduleELBO", "ElementwisePrior", "FullWeightPrior",
    "predict_proba", "count_adapter_state", "save_adapters", "load_adapters", "merge_adapters",
    "CheckpointError", "MeLoRAError", "ConfigError", "kl", "metrics",
]
