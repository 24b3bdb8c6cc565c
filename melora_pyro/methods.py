"""Every method of the benchmark, selectable by name, built on one model / training loop / evaluation.

    method = build_method("melora", base_model, MeLoRAConfig(), ClozeReadout())
    method.fit(train_examples, collate, TrainConfig(steps=100))   # melora_pyro.train.train inside
    probs = method.predict(batch, num_samples=10)                 # (batch, K)
    method.adapter_state()                                        # trainable numbers

``batch`` is what ``collate`` returns: ``input_ids`` (b, T), ``attention_mask`` (b, T), ``labels`` (b,),
``choice_mask`` (b, K) bool. The methods (``METHODS``):

==========================  ================================================================  =============================
name                        what                                                              adapter state per m x n layer
==========================  ================================================================  =============================
``zero-shot``               the base model, no adapters (``baselines.ZeroShotMethod``)          0
``mle``                     plain LoRA (``guides.IdentityGuide``, C = I), weight decay 0       r n + r m
``map``                     plain LoRA, AdamW weight decay ``MAP_WEIGHT_DECAY`` = 1e-5         r n + r m
``map-ts``                  ``map`` + one temperature fitted by NLL on a validation split      r n + r m (+ 1)
                            (``baselines.temperature``; ``val_examples`` or a hold-out of train)
``mcdropout``               plain LoRA (MLE) with adapter-input dropout 0.1, kept on at test;  r n + r m
                            prediction = mean over ``num_samples`` dropout masks
``ensemble``                3 plain LoRA adapters, initialised with seeds seed+k, weight      3 (r n + r m)
                            decay 0, trained on the same batches; prediction = softmax of
                            the mean of the members' label logits
``laplace``                 post-hoc diagonal Laplace over A, B of a ``map`` adapter          r n + r m (+ as many
                            (``baselines.laplace``: exact GGN diagonal, prior precision by    curvature numbers after
                            marginal likelihood, linearised (GLM) predictive)                 training)
``blob``                    BLoB as its code runs it: latent A ~ N(M, G^4), prior             2 r n + r m
                            N(0, 0.2^2), Flipout, C = I; AdamW on the mean NLL, then SGD
                            on pi_i KL (``baselines.blob``)
``blob-adamw``              BLoB's model and Flipout, the re-weighted ELBO in one AdamW       2 r n + r m
``melora``                  Me-LoRA, mean-field q(C), full-weight KL, no prior noise           r n + r m + 2 r^2
``melora-elementwise``      Me-LoRA with the elementwise KL on C                               r n + r m + 2 r^2
``melora-noise``            Me-LoRA, full-weight KL, randomised prior std sigma_p + U(0, eta)  r n + r m + 2 r^2
                            with eta = ``config.prior_noise`` or ``DEFAULT_PRIOR_NOISE`` = 0.05
``melora-diag``             C = diag(c), restricted full-weight prior (``baselines.diagonal``) r n + r m + 2 r
==========================  ================================================================  =============================

The base model: a fresh transformers model (its linears get adapters in place), or a zero-argument
callable returning one. The ensemble needs one base per member, so it requires the callable
(``base_factory``); every other method accepts either and calls a factory once.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch
from torch import nn

from guides import IdentityGuide, MeanFieldGuide

from .baselines import (BLoBELBO, BLoBGuide, BLoBModel, BLoBNLLELBO, BLoBUpdate, DiagonalGuide,
                        DiagonalMeLoRAModel, EnsembleMethod, GLMPredictiveMethod, LaplaceMethod, PointMethod, PyroMethod, TemperatureScaledMethod,
                        ZeroShotMethod)
from .config import MeLoRAConfig
from .elbo import FullWeightELBO, KLScheduleELBO, constant_kl_weight
from .errors import ConfigError
from .model import MeLoRAModel
from .readouts import as_readout

METHODS = ("zero-shot", "mle", "map", "map-ts", "mcdropout", "ensemble", "laplace", "blob", "blob-adamw",
           "melora", "melora-elementwise", "melora-noise", "melora-diag")
MAP_WEIGHT_DECAY = 1e-5       # AdamW's decoupled weight decay on A and B for map / laplace (BLoB's map scripts)
ENSEMBLE_WEIGHT_DECAY = 0.0   # the deep-ensemble scripts set none
MC_DROPOUT = 0.1              # adapter-input dropout of mcdropout, in training and at test
ENSEMBLE_SIZE = 3
BLOB_PRIOR_STD = 0.2          # BLoB's prior N(0, 0.2^2) on A (its scripts' --bayes-prior-sigma), whatever Me-LoRA's default
DEFAULT_PRIOR_NOISE = 0.05    # eta of melora-noise when config.prior_noise is 0
# The Me-LoRA variants' defaults, chosen on ARC-Easy dev (results/sweep_arc-e_dev.md: NLL -0.077 against one
# draw and the ELBO, CI -0.116 to -0.038): C drawn in antithetic pairs (not with Flipout), the KL weighted 0.1.
DEFAULT_ANTITHETIC = True
DEFAULT_KL_WEIGHT = 0.1
VALIDATION_METHODS = ("map-ts",)  # methods that fit something on validation data (option val_examples)

BaseSource = nn.Module | Callable[[], nn.Module]

# The settings a method is defined by (a different value given for one is refused) and the defaults
# it brings for the knobs it has (taken unless the setting is given; ``method_options`` passes them
# on). Keys are ``MeLoRAConfig`` fields or ``TrainConfig.weight_decay``.
DEFINED_BY = {
    "mle": {"weight_decay": 0.0},
    "mcdropout": {"weight_decay": 0.0},
    "melora": {"kl": "full_weight", "prior_noise": 0.0},
    "melora-elementwise": {"kl": "elementwise", "prior_noise": 0.0},
    "melora-noise": {"kl": "full_weight"},
}
METHOD_DEFAULTS = {
    "map": {"weight_decay": MAP_WEIGHT_DECAY},
    "ensemble": {"weight_decay": MAP_WEIGHT_DECAY},
    "laplace": {"weight_decay": MAP_WEIGHT_DECAY},
    "mcdropout": {"dropout": MC_DROPOUT},
    "melora-noise": {"prior_noise": DEFAULT_PRIOR_NOISE},
    "blob": {"prior_std": BLOB_PRIOR_STD},
    "blob-adamw": {"prior_std": BLOB_PRIOR_STD},
}
_NEEDS_POSITIVE = {"mcdropout": "dropout", "melora-noise": "prior_noise"}


def build_method(name: str, base_model: BaseSource, config: MeLoRAConfig, readout, **options):
    """Build method ``name`` (one of ``METHODS``) on ``base_model`` (a fresh model or a zero-arg factory).

    ``readout`` is how answers are scored (``melora_pyro.readouts``: ``ClozeReadout(...)`` or
    ``LetterReadout(label_token_ids)``); a list of label token ids means the letter readout.

    ``config`` gives the adapter shape (rank, alpha, targets, prior std); each method pins the fields it
    is defined by (e.g. ``melora-elementwise`` sets ``kl="elementwise"``, the plain-LoRA methods and
    ``blob`` use ``gauge="none"``) and keeps the rest.

    Options (all optional):
        seed (0): seed of the adapter initialisation (ensemble member k uses ``seed + k``); the global
            RNG is left untouched.
        weight_decay: for ``map`` / ``laplace`` (default ``MAP_WEIGHT_DECAY``), ``ensemble``
            (``ENSEMBLE_WEIGHT_DECAY``), ``blob`` / ``blob-adamw`` (0).
        dropout: for ``mcdropout`` (default ``MC_DROPOUT``).
        ensemble_size, aggregate: for ``ensemble`` (default 3, ``"logits"``; ``"probs"`` averages
            probabilities).
        prior_noise: for ``melora-noise`` (default ``config.prior_noise`` or 0.05).
        init_scale: initial std of the variational guides (default ``config.init_scale``, 1e-2).
        kl_weight: for the Me-LoRA variants, the loss ``nll + kl_weight * KL`` (default ``DEFAULT_KL_WEIGHT``,
            0.1: a tempered posterior, ``elbo.KLScheduleELBO`` with that constant weight; 1 is the ELBO,
            ``FullWeightELBO``).
        flipout: for ``melora`` / ``melora-elementwise`` / ``melora-noise``: C applied by Flipout
            (``melora_pyro.flipout``: the mean path plus ``B (((A x o r) E^T) o s')``, ``E = Omega o eps``,
            signs per example and token) in training and prediction (default False: one C per draw).
        predictive, posterior_scale, glm_samples, val_examples: for ``melora`` / ``melora-elementwise`` /
            ``melora-noise``: ``predictive="glm"`` predicts with q(C) linearised, its std times
            ``posterior_scale`` (a float, default 1, or ``"validation"``: chosen by NLL on ``val_examples``)
            (``baselines.GLMPredictiveMethod``); default ``"weights"``, Monte Carlo draws of C.
        antithetic: for the Me-LoRA variants, each training draw of C followed by its mirror ``2 M - C``
            (``FullWeightELBO(antithetic=True)``: twice the training compute, a lower-variance gradient
            of the guide's scale; default ``DEFAULT_ANTITHETIC``, and False with Flipout).
        eps: for ``blob`` / ``blob-adamw``, the std parameter's initial scale (``BLOB_EPS``).
        kl_lr, kl_reweighting, dataset_rescaling: for ``blob`` (see ``baselines.BLoBUpdate``).
        kl_reweighting: for ``blob-adamw`` (default True; False: the plain ELBO, KL weight 1).
        prior_precision, fisher, max_fisher_examples, val_examples, val_samples, predictive, glm_samples:
            for ``laplace`` (see ``baselines.LaplaceMethod``).
        val_examples, validation: for ``map-ts``, the validation examples the temperature is fitted on
            and how to describe them in tables (default: a seeded 10% hold-out of the training examples).
    Returns an object with ``fit``, ``predict``, ``adapter_state`` (``PyroMethod``, ``EnsembleMethod``
    or ``LaplaceMethod``). Raises ``ValueError`` for an unknown name or option.
    """
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid names: {list(METHODS)}")
    check_options(name, options)
    return _BUILDERS[name][0](base_model, config, as_readout(readout), options)


def methods_taking(option: str) -> list[str]:
    """The methods that take ``build_method`` option ``option``."""
    return [name for name in METHODS if option in _BUILDERS[name][1]]


def check_options(name: str, options) -> None:
    """``ValueError`` naming the options (names) that method ``name`` does not take."""
    allowed = _BUILDERS[name][1]
    unknown = sorted(set(options) - set(allowed) - {"seed"})
    if unknown:
        raise ValueError(f"method {name!r}: unknown options {unknown}; it takes {sorted(allowed) + ['seed']}")
    glm_only = sorted({"posterior_scale", "glm_samples"} & set(options))
    if name.startswith("melora") and glm_only and options.get("predictive") != "glm":
        raise ValueError(f"method {name!r}: options {glm_only} need predictive='glm'")


def method_settings(name: str, config: MeLoRAConfig, train_config, given: set[str] | None = None):
    """``(config, train_config)`` as method ``name`` runs them: its defining values and its defaults in
    place, what was ``given`` (field names; None: every field whose value differs from the dataclass
    default) kept. ``ConfigError`` for a given value that contradicts the method's definition, e.g.
    ``kl="elementwise"`` for ``melora`` (that is ``melora-elementwise``)."""
    configs = {"adapter": config, "train": train_config}

    def section(key):
        return "train" if key == "weight_decay" else "adapter"

    def is_given(key):
        if given is not None:
            return key in given
        default = next(f.default for f in dataclasses.fields(configs[section(key)]) if f.name == key)
        return getattr(configs[section(key)], key) != default

    updates = {"adapter": {}, "train": {}}
    for key, value in DEFINED_BY.get(name, {}).items():
        if is_given(key) and getattr(configs[section(key)], key) != value:
            raise ConfigError(f"method {name!r} is defined with {key}={value!r}; "
                              f"{key}={getattr(configs[section(key)], key)!r} contradicts it{_instead(name, key)}")
        updates[section(key)][key] = value
    for key, value in METHOD_DEFAULTS.get(name, {}).items():
        if not is_given(key):
            updates[section(key)][key] = value
    config = dataclasses.replace(config, **updates["adapter"])
    train_config = dataclasses.replace(train_config, **updates["train"])
    knob = _NEEDS_POSITIVE.get(name)
    if knob and not getattr(config, knob) > 0:
        raise ConfigError(f"method {name!r} needs {knob} > 0, got {getattr(config, knob)!r}")
    return config, train_config


def _instead(name: str, key: str) -> str:
    alternatives = {"kl": " (use method 'melora-elementwise' or 'melora')", "prior_noise": " (use method 'melora-noise')",
                    "weight_decay": " (use method 'map')"}
    return alternatives.get(key, "")


def method_options(name: str, config: MeLoRAConfig, train_config) -> dict:
    """The ``build_method`` options that carry the method's knobs (``METHOD_DEFAULTS``) from the settings."""
    return {key: getattr(train_config if key == "weight_decay" else config, key)
            for key in METHOD_DEFAULTS.get(name, {}) if key in _BUILDERS[name][1]}  # the rest travel in config


def _seeded(seed: int, build: Callable[[], object]):
    """``build()`` with the torch RNG seeded by ``seed``, the global RNG state restored afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _fresh_base(base_model: BaseSource) -> nn.Module:
    return base_model if isinstance(base_model, nn.Module) else base_model()


def _zero_b(model: MeLoRAModel) -> MeLoRAModel:
    """peft's LoRA start ``B = 0`` (the reference baselines'); Me-LoRA keeps ``B ~ N(0, init_b_std^2)``,
    which its full-weight KL needs."""
    with torch.no_grad():
        for b in model.lora_B:
            b.zero_()
    return model


def _point(base_model, config, ids, weight_decay: float, seed: int, name: str, dropout_at_test=False) -> PointMethod:
    config = dataclasses.replace(config, gauge="none")  # plain LoRA: C = I, A and B as stored

    def build():
        model = _zero_b(MeLoRAModel(_fresh_base(base_model), config, ids, name=name))
        return PointMethod(model, IdentityGuide(model), train_overrides={"weight_decay": weight_decay},
                           dropout_at_test=dropout_at_test, name=name)
    return _seeded(seed, build)


def _mle(base_model, config, ids, options):
    return _point(base_model, config, ids, 0.0, options.get("seed", 0), "mle")


def _map(base_model, config, ids, options):
    return _point(base_model, config, ids, options.get("weight_decay", MAP_WEIGHT_DECAY), options.get("seed", 0), "map")


def _map_ts(base_model, config, ids, options):
    base = _map(base_model, config, ids, options)
    val = options.get("val_examples")
    return TemperatureScaledMethod(base, val_examples=val, validation=options.get(
        "validation", "given validation examples" if val is not None else ""))


def _mcdropout(base_model, config, ids, options):
    config = dataclasses.replace(config, dropout=options.get("dropout", MC_DROPOUT))
    return _point(base_model, config, ids, 0.0, options.get("seed", 0), "mcdropout", dropout_at_test=True)


def _ensemble(base_model, config, ids, options):
    if isinstance(base_model, nn.Module):
        raise ValueError("method 'ensemble' needs one base model per member: pass a zero-argument "
                         "factory (base_factory) instead of a model")
    seed, decay = options.get("seed", 0), options.get("weight_decay", ENSEMBLE_WEIGHT_DECAY)
    members = [_point(base_model, config, ids, decay, seed + k, f"ensemble.{k}")
               for k in range(options.get("ensemble_size", ENSEMBLE_SIZE))]
    return EnsembleMethod(members, **{"aggregate": options["aggregate"]} if "aggregate" in options else {})


def _laplace(base_model, config, ids, options):
    map_method = _point(base_model, config, ids, options.get("weight_decay", MAP_WEIGHT_DECAY),
                        options.get("seed", 0), "laplace")
    keys = ("prior_precision", "fisher", "max_fisher_examples", "val_examples", "val_samples", "predictive",
            "glm_samples")
    return LaplaceMethod(map_method, **{k: options[k] for k in keys if k in options})


def _blob(base_model, config, ids, options):
    """BLoB's two-optimiser scheme (``baselines.BLoBUpdate``)."""
    def build():
        model = _zero_b(BLoBModel(_fresh_base(base_model), config, ids))
        guide = BLoBGuide(model, **_picked(options, "eps"))
        update = BLoBUpdate(model, guide, **_picked(options, "kl_lr", "kl_reweighting", "dataset_rescaling"))
        return PyroMethod(model, guide, elbo=BLoBNLLELBO(), update=update, flipout=True, name="blob",
                          train_overrides={"weight_decay": options.get("weight_decay", 0.0)})
    return _seeded(options.get("seed", 0), build)


def _blob_adamw(base_model, config, ids, options):
    """BLoB's model, guide and Flipout with the re-weighted ELBO in the shared loop's one AdamW."""
    def build():
        model = _zero_b(BLoBModel(_fresh_base(base_model), config, ids, name="blob_adamw"))
        guide = BLoBGuide(model, **_picked(options, "eps"))
        elbo = BLoBELBO() if options.get("kl_reweighting", True) else BLoBELBO(kl_weight=lambda *_: 1.0)
        return PyroMethod(model, guide, elbo=elbo, flipout=True, name="blob-adamw",
                          train_overrides={"weight_decay": options.get("weight_decay", 0.0)})
    return _seeded(options.get("seed", 0), build)


def _picked(options: dict, *keys) -> dict:
    return {k: options[k] for k in keys if k in options}


def _variational(model_class, guide_class, name, **pinned):
    """Builder of a Me-LoRA variant: ``config`` with ``pinned`` fields, ``model_class`` + ``guide_class``."""
    def builder(base_model, config, ids, options):
        fields = {k: (v(config, options) if callable(v) else v) for k, v in pinned.items()}
        config = dataclasses.replace(config, **fields)

        def build():
            model = model_class(_fresh_base(base_model), config, ids, name=name.replace("-", "_"))
            guide = guide_class(model, init_scale=options.get("init_scale", config.init_scale))
            flip, weight = options.get("flipout", False), options.get("kl_weight", DEFAULT_KL_WEIGHT)
            pairs = options.get("antithetic", DEFAULT_ANTITHETIC and not flip)
            elbo = (FullWeightELBO(flipout=flip, antithetic=pairs) if weight == 1.0
                    else KLScheduleELBO(constant_kl_weight(weight), flipout=flip, antithetic=pairs))
            return PyroMethod(model, guide, elbo=elbo, flipout=flip, name=name)
        return _with_predictive(_seeded(options.get("seed", 0), build), options)
    return builder


def _with_predictive(method: PyroMethod, options: dict):
    """``method``, or its GLM predictive (``baselines.GLMPredictiveMethod``) for ``predictive="glm"``."""
    if options.get("predictive", "weights") == "weights":
        return method
    return GLMPredictiveMethod(method, **{k: options[k] for k in ("posterior_scale", "glm_samples", "val_examples")
                                          if k in options})


def _noise(config, options) -> float:
    return options.get("prior_noise", config.prior_noise or DEFAULT_PRIOR_NOISE)


def _zero_shot(base_model, config, readout, options):
    return ZeroShotMethod(_fresh_base(base_model), readout)


_GUIDE_OPTIONS = ("init_scale", "kl_weight", "antithetic")
# Flipout and the GLM predictive need MeLoRAModel's one Normal site "C" (MeanFieldGuide)
_MELORA_OPTIONS = _GUIDE_OPTIONS + ("flipout", "predictive", "posterior_scale", "glm_samples", "val_examples")
_LAPLACE_OPTIONS = ("weight_decay", "prior_precision", "fisher", "max_fisher_examples", "val_examples", "val_samples",
                    "predictive", "glm_samples")
_BUILDERS = {
    "zero-shot": (_zero_shot, ()),
    "mle": (_mle, ()),
    "map": (_map, ("weight_decay",)),
    "map-ts": (_map_ts, ("weight_decay", "val_examples", "validation")),
    "mcdropout": (_mcdropout, ("dropout",)),
    "ensemble": (_ensemble, ("weight_decay", "ensemble_size", "aggregate")),
    "laplace": (_laplace, _LAPLACE_OPTIONS),
    "blob": (_blob, ("eps", "weight_decay", "kl_lr", "kl_reweighting", "dataset_rescaling")),
    "blob-adamw": (_blob_adamw, ("eps", "weight_decay", "kl_reweighting")),
    "melora": (_variational(MeLoRAModel, MeanFieldGuide, "melora", kl="full_weight", prior_noise=0.0),
               _MELORA_OPTIONS),
    "melora-elementwise": (_variational(MeLoRAModel, MeanFieldGuide, "melora-elementwise", kl="elementwise",
                                        prior_noise=0.0), _MELORA_OPTIONS),
    "melora-noise": (_variational(MeLoRAModel, MeanFieldGuide, "melora-noise", kl="full_weight",
                                  prior_noise=_noise), _MELORA_OPTIONS + ("prior_noise",)),
    "melora-diag": (_variational(DiagonalMeLoRAModel, DiagonalGuide, "melora-diag"), _GUIDE_OPTIONS),
}
