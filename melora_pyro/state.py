"""Size accounting of the adapter training state."""
from torch import nn


def count_adapter_state(model: nn.Module, guide: nn.Module | None = None) -> int:
    """Number of trainable numbers in the adapters plus the guide.

    For mean-field Me-LoRA with L adapted ``m x n`` matrices this is ``L (r n + r m + 2 r^2)``;
    the training state in bytes is about four times that in float32 times (1 + 1 + 2) for
    parameter, gradient and Adam's two moments.
    """
    modules = [model] + ([guide] if guide is not None else [])
    return sum(p.numel() for module in modules for p in module.parameters() if p.requires_grad)
