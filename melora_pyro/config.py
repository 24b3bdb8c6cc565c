"""Configuration of Me-LoRA adapters, validated on construction."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .errors import ConfigError

KL_KINDS = ("full_weight", "elementwise")
LR_SCHEDULES = ("constant", "linear")
GAUGES = ("none", "unit")


@dataclass(frozen=True)
class MeLoRAConfig:
    """Hyper-parameters of the adapters ``W0 x + s * B C A x`` with ``s = alpha / rank``.

    Args:
        rank: r, the inner dimension of A (r x n), C (r x r) and B (m x r).
        alpha: LoRA scaling numerator; the adapter output is scaled by ``alpha / rank``.
        target_modules: names of the ``nn.Linear`` modules to adapt, matched against the last
            component of the module path (``"q_proj"``) or the whole path (``"lm_head"``).
        prior_std: sigma_p, the standard deviation of the prior (on C for the elementwise KL, on
            the weight update dW for the full-weight KL). Default 1.0, chosen by the sweep on ARC-Easy
            validation (0.05 / 0.2 / 1.0); BLoB's 0.2 is what the ``blob`` methods use.
        prior_noise: upper bound of the uniform noise added to the prior std at every model call
            (the randomised prior of the Me-LoRA paper); 0 turns it off.
        kl: ``"full_weight"`` (KL between the weight-space distributions, depends on A and B) or
            ``"elementwise"`` (KL between q(C) and an isotropic prior on C).
        dropout: dropout probability on the adapter input (training mode only).
        init_b_std: standard deviation of B's Gaussian initialisation with ``gauge="none"``; it must be
            non-zero (B = 0 makes the full-weight KL infinite and, with M = I, every gradient vanish).
        gauge: how A and B enter ``dW = s B C A``. ``"unit"``: the rows of A and the columns of B are
            normalised to unit length (the stored tensors are free), so C carries the magnitude and
            starts at 0 (``dW = 0``); this removes the flat directions ``B -> B D1, A -> D2 A,
            C -> D1^-1 C D2^-1`` along which training with the full-weight KL switched the adapter off
            (DESIGN.md section 3). ``"none"``: A and B as stored, C starts at the identity (plain
            LoRA when C is fixed at I: ``guides.IdentityGuide`` needs it).
        init_scale: the initial standard deviation of every entry of the variational guide's Omega
            (``guides.MeanFieldGuide``, the ``melora`` family); point methods ignore it.
    """

    rank: int = 8
    alpha: float = 16.0
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    prior_std: float = 1.0  # chosen on ARC-Easy dev (results/sweep_arc-e_dev.md); BLoB's own is 0.2
    prior_noise: float = 0.0
    kl: str = "full_weight"
    dropout: float = 0.0
    init_b_std: float = 1e-3
    gauge: str = "none"
    init_scale: float = 1e-2

    def __post_init__(self):
        if isinstance(self.target_modules, str):
            object.__setattr__(self, "target_modules", (self.target_modules,))
        if isinstance(self.target_modules, (list, tuple)):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        else:
            raise ConfigError(f"MeLoRAConfig.target_modules must be a non-empty sequence of module names, "
                              f"got {self.target_modules!r:.80}")
        checks = [
            ("rank", isinstance(self.rank, int) and not isinstance(self.rank, bool) and self.rank >= 1,
             "a positive integer"),
            ("alpha", _is_number(self.alpha) and self.alpha > 0, "a positive number"),
            ("target_modules", len(self.target_modules) > 0
             and all(isinstance(t, str) and t for t in self.target_modules),
             "a non-empty sequence of module names"),
            ("prior_std", _is_number(self.prior_std) and self.prior_std > 0, "a positive number"),
            ("prior_noise", _is_number(self.prior_noise) and self.prior_noise >= 0,
             "a number >= 0"),
            ("kl", isinstance(self.kl, str) and self.kl in KL_KINDS, f"one of {KL_KINDS}"),
            ("dropout", _is_number(self.dropout) and 0 <= self.dropout < 1, "a number in [0, 1)"),
            ("init_b_std", _is_number(self.init_b_std) and self.init_b_std > 0, "a positive number"),
            ("gauge", isinstance(self.gauge, str) and self.gauge in GAUGES, f"one of {GAUGES}"),
            ("init_scale", _is_number(self.init_scale) and self.init_scale > 0, "a positive number"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise ConfigError(f"MeLoRAConfig.{name} must be {expected}, got {getattr(self, name)!r:.80}")

    @property
    def scaling(self) -> float:
        """s = alpha / rank."""
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["target_modules"] = list(self.target_modules)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "MeLoRAConfig":
        """Build from a dict (a JSON or TOML table); unknown keys or bad values raise ``ConfigError``."""
        if not isinstance(d, dict):
            raise ConfigError(f"MeLoRAConfig: expected a table of settings, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(map(str, set(d) - known))
        if unknown:
            raise ConfigError(f"MeLoRAConfig: unknown keys {unknown}; known keys are {sorted(known)}")
        return cls(**d)


def check_train_config(config) -> None:
    """Validate a ``train.TrainConfig`` (called by its ``__post_init__``); raises ``ConfigError``."""
    checks = {
        "steps": (_is_int(config.steps) and config.steps >= 1, "a positive integer"),
        "batch_size": (_is_int(config.batch_size) and config.batch_size >= 1, "a positive integer"),
        "grad_accum": (_is_int(config.grad_accum) and config.grad_accum >= 1, "a positive integer"),
        "lr": (_is_number(config.lr) and config.lr >= 0, "a finite number >= 0"),
        "guide_lr": (_is_number(config.guide_lr) and config.guide_lr >= 0, "a finite number >= 0 (0: frozen)"),
        "guide_scale_lr": (_is_number(config.guide_scale_lr) and config.guide_scale_lr >= 0,
                           "a finite number >= 0 (0: frozen)"),
        "weight_decay": (_is_number(config.weight_decay) and config.weight_decay >= 0, "a finite number >= 0"),
        "max_grad_norm": (config.max_grad_norm is None
                          or _is_number(config.max_grad_norm) and config.max_grad_norm >= 0,
                          "None or a finite number >= 0 (0: no clipping)"),
        "seed": (_is_int(config.seed) and 0 <= config.seed < 2 ** 32, "an integer in [0, 2**32)"),  # numpy's range
        "log_every": (_is_int(config.log_every) and config.log_every >= 1, "a positive integer"),
        "checkpoint_every": (_is_int(config.checkpoint_every) and config.checkpoint_every >= 0,
                             "an integer >= 0 (0: only at the end)"),
        "lr_schedule": (config.lr_schedule in LR_SCHEDULES, f"one of {LR_SCHEDULES}"),
        "warmup_ratio": (_is_number(config.warmup_ratio) and 0 <= config.warmup_ratio < 1, "a number in [0, 1)"),
        "adam_eps": (_is_number(config.adam_eps) and config.adam_eps > 0, "a positive number"),
        "whole_epochs": (isinstance(config.whole_epochs, bool), "true or false"),
    }
    for name, (ok, expected) in checks.items():
        if not ok:
            raise ConfigError(f"TrainConfig.{name} must be {expected}, got {getattr(config, name)!r:.80}")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x and abs(x) != float("inf")


AGGREGATIONS = ("logits", "probs")
FISHERS = ("ggn", "empirical")
PREDICTIVES = ("glm", "weights")
PRECISION_RULES = ("marglik", "validation")


@dataclass(frozen=True)
class MethodOptions:
    """The knobs of single methods (``build_method``'s options of the same names); ``None`` leaves the
    method's default. A set option the run's method does not take is refused (``RunSettings``).

    Args:
        ensemble_size: ``ensemble``: the number of members (default 3).
        aggregate: ``ensemble``: ``"logits"`` (softmax of the mean member logits, the reference's) or
            ``"probs"`` (mean of member probabilities).
        eps: ``blob`` / ``blob-adamw``: the std parameter starts uniform in ``[eps / sqrt 2, eps]``
            (default 0.05).
        kl_lr: ``blob``: the learning rate of the SGD step on the KL (default 0.01).
        kl_reweighting: ``blob`` / ``blob-adamw``: the cycle's KL weights ``pi_i`` (default true).
        dataset_rescaling: ``blob``: the KL cycle length from the dataset size (default true).
        prior_precision: ``laplace``: ``"marglik"`` (default), ``"validation"`` (NLL on the validation
            split, as ``map-ts`` takes it) or a fixed positive number.
        fisher: ``laplace``: ``"ggn"`` (default) or ``"empirical"``.
        max_fisher_examples: ``laplace``: the curvature on a seeded subset of this many training examples
            (default: all).
        val_samples: ``laplace``: weight-space draws per candidate of the validation search (default 4).
        predictive: ``laplace``: ``"glm"`` (default, linearised) or ``"weights"`` (weight-space Monte Carlo,
            ``eval_samples`` draws); ``melora`` / ``melora-elementwise`` / ``melora-noise``: ``"weights"``
            (default: ``eval_samples`` draws of C) or ``"glm"`` (q(C) linearised,
            ``baselines.GLMPredictiveMethod``).
        glm_samples: ``laplace`` and the Me-LoRA variants: logit draws per example of the GLM predictive
            (default 100,000).
        posterior_scale: the Me-LoRA variants with ``predictive="glm"``: q(C)'s std multiplied by this
            positive number at prediction (default 1: the trained posterior), or ``"validation"`` (chosen
            by NLL on the validation split, as ``map-ts`` takes it).
        flipout: ``melora`` / ``melora-elementwise`` / ``melora-noise``: C applied by Flipout, signs per
            example and token, in training and prediction (default false: one C per draw for the batch).
        kl_weight: ``melora`` / ``melora-elementwise`` / ``melora-noise`` / ``melora-diag``: the loss is
            ``nll + kl_weight * KL`` (default 0.1, ``methods.DEFAULT_KL_WEIGHT``, chosen on ARC-Easy dev:
            a tempered posterior; 1: the ELBO; above 1 one pulled towards the prior), ``elbo.KLScheduleELBO``.
        antithetic: the Me-LoRA variants: each training draw of C followed by its mirror ``2 M - C``
            (``melora_pyro.antithetic``; twice the training compute; default true, false with ``flipout``).
    """

    ensemble_size: int | None = None
    aggregate: str | None = None
    eps: float | None = None
    kl_lr: float | None = None
    kl_reweighting: bool | None = None
    dataset_rescaling: bool | None = None
    prior_precision: str | float | None = None
    fisher: str | None = None
    max_fisher_examples: int | None = None
    val_samples: int | None = None
    predictive: str | None = None
    glm_samples: int | None = None
    posterior_scale: str | float | None = None
    flipout: bool | None = None
    kl_weight: float | None = None
    antithetic: bool | None = None

    def __post_init__(self):
        checks = {
            "ensemble_size": (_is_int(self.ensemble_size) and self.ensemble_size >= 1, "a positive integer"),
            "aggregate": (self.aggregate in AGGREGATIONS, f"one of {AGGREGATIONS}"),
            "eps": (_is_number(self.eps) and self.eps > 0, "a positive number"),
            "kl_lr": (_is_number(self.kl_lr) and self.kl_lr >= 0, "a number >= 0"),
            "kl_reweighting": (isinstance(self.kl_reweighting, bool), "true or false"),
            "dataset_rescaling": (isinstance(self.dataset_rescaling, bool), "true or false"),
            "prior_precision": (self.prior_precision in PRECISION_RULES
                                or _is_number(self.prior_precision) and self.prior_precision > 0,
                                f"one of {PRECISION_RULES} or a positive number"),
            "fisher": (self.fisher in FISHERS, f"one of {FISHERS}"),
            "max_fisher_examples": (_is_int(self.max_fisher_examples) and self.max_fisher_examples >= 1,
                                    "a positive integer"),
            "val_samples": (_is_int(self.val_samples) and self.val_samples >= 1, "a positive integer"),
            "predictive": (self.predictive in PREDICTIVES, f"one of {PREDICTIVES}"),
            "glm_samples": (_is_int(self.glm_samples) and self.glm_samples >= 1, "a positive integer"),
            "posterior_scale": (self.posterior_scale == "validation"
                                or _is_number(self.posterior_scale) and self.posterior_scale > 0,
                                "'validation' or a positive number"),
            "flipout": (isinstance(self.flipout, bool), "true or false"),
            "kl_weight": (_is_number(self.kl_weight) and self.kl_weight > 0, "a positive number"),
            "antithetic": (isinstance(self.antithetic, bool), "true or false"),
        }
        for name, (ok, expected) in checks.items():
            if getattr(self, name) is not None and not ok:
                raise ConfigError(f"MethodOptions.{name} must be {expected}, got {getattr(self, name)!r:.80}")

    def given(self) -> dict:
        """The options that are set: ``{name: value}``, to pass to ``build_method``."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}
