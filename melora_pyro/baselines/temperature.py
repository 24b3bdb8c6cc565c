"""``map-ts``: a trained method's probabilities with one temperature fitted on a validation split."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ..calibration import apply_temperature, fit_temperature, temperature_nll
from ..data import holdout_validation
from ..train import TrainConfig, evaluate
from .method import Batch


class TemperatureScaledMethod:
    """Any method (``base``: ``fit`` / ``predict``) followed by temperature scaling (``calibration``).

    ``fit`` trains ``base`` on the training examples, scores the validation examples with it and fits
    the temperature T on them by NLL; ``predict`` returns ``softmax(log p / T)`` of ``base.predict``.
    The validation examples are ``val_examples`` when given (a dataset's dev split: the pipeline
    passes it), else a seeded hold-out of the training examples (``data.holdout_validation``), which
    ``base`` then does not train on. ``validation`` describes which, for tables; the test split is
    never seen. After ``fit``: ``temperature`` (float) and ``validation_nll`` (before/after, nats).
    """

    def __init__(self, base, val_examples: Sequence | None = None, validation: str = "",
                 val_samples: int = 0, name: str = "map-ts"):
        if val_examples is not None and not val_examples:
            raise ValueError("val_examples is empty: give the validation examples, or None for a hold-out of train")
        self.base, self.name = base, name
        self.val_examples, self.validation, self.val_samples = val_examples, validation, val_samples
        self.temperature: float | None = None
        self.validation_nll: dict[str, float] = {}

    def fit(self, examples: Sequence, collate: Callable[[list], Batch], train_config: TrainConfig,
            run_dir: str | Path | None = None, resume: bool = False, progress: bool = False) -> list[dict]:
        """Train ``base``, then fit the temperature on the validation examples; returns ``base``'s log."""
        val = self.val_examples
        if val is None:
            examples, val, self.validation = holdout_validation(examples, train_config.seed)
        history = self.base.fit(examples, collate, train_config, run_dir=run_dir, resume=resume, progress=progress)
        self.calibrate(collate, val)
        return history

    def calibrate(self, collate: Callable[[list], Batch], val_examples: Sequence | None = None,
                  progress: bool = False) -> float:
        """Fit the temperature of the (trained) ``base`` on ``val_examples`` (default: the ones given
        at construction); returns it."""
        val = self.val_examples if val_examples is None else val_examples
        if not val:
            raise ValueError(f"{self.name}: no validation examples to fit the temperature on")
        probs, labels = evaluate(lambda batch: self.base.predict(batch, self.val_samples), val, collate,
                                 progress=progress)
        self.temperature = fit_temperature(probs, labels)
        self.validation_nll = {"before": temperature_nll(probs, labels, 1.0),
                               "after": temperature_nll(probs, labels, self.temperature)}
        return self.temperature

    @torch.no_grad()
    def predict(self, batch: Batch, num_samples: int) -> torch.Tensor:
        """``base.predict(batch, num_samples)`` at the fitted temperature, ``(batch, K)``."""
        return self.rescale(self.base.predict(batch, num_samples))

    def rescale(self, probs: torch.Tensor) -> torch.Tensor:
        """``base``'s probabilities ``(N, K)`` (scored already) at the fitted temperature, ``(N, K)``."""
        if self.temperature is None:
            raise RuntimeError(f"{self.name}: call fit before predict (the temperature is not fitted yet)")
        return apply_temperature(probs, self.temperature)

    def adapter_state(self) -> int:
        """``base``'s trainable numbers (the temperature adds one number, not counted)."""
        return self.base.adapter_state()

    @property
    def units(self):
        return self.base.units

    def unit_dirs(self, run_dir) -> list[Path]:
        """``base``'s checkpoint directories (the temperature is refitted on load, deterministically)."""
        return self.base.unit_dirs(run_dir)

    def __repr__(self):
        return f"TemperatureScaledMethod(base={self.base!r}, temperature={self.temperature})"

