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
``map``                     plain LoRA, AdamW weight decay ``MAP_WEIGHT_DECAY`` = 1e-2         r n + r m
``mcdropout``               plain LoRA (MLE) with adapter-input dropout 0.1, kept on at test;  r n + r m
                            prediction = mean over ``num_samples`` dropout masks
``ensemble``                3 independently initialised ``map`` adapters (seeds seed+k),       3 (r n + r m)
                            prediction = mean of the members' probabilities
``laplace``                 post-hoc diagonal Laplace over A, B of a ``map`` adapter            r n + r m (+ as many
                            (``baselines.laplace``: exact GGN diagonal, prior precision by     curvature numbers after
                            marginal likelihood, Monte Carlo predictive)                        training)
``blob``                    BLoB: latent A ~ N(M, G^4), prior N(0, 0.2^2), KL re-weighting,    2 r n + r m
                            C = I, no Flipout (``baselines.blob``)
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

from .baselines import (BLoBELBO, BLoBGuide, BLoBModel, DiagonalGuide, DiagonalMeLoRAModel, EnsembleMethod,
                        LaplaceMethod, PointMethod, PyroMethod, ZeroShotMethod)
from .config import MeLoRAConfig
from .model import MeLoRAModel
from .readouts import as_readout

METHODS = ("zero-shot", "mle", "map", "mcdropout", "ensemble", "laplace", "blob",
           "melora", "melora-elementwise", "melora-noise", "melora-diag")
MAP_WEIGHT_DECAY = 1e-2       # AdamW's decoupled weight decay on A and B for map / ensemble / laplace
MC_DROPOUT = 0.1              # adapter-input dropout of mcdropout, in training and at test
ENSEMBLE_SIZE = 3
DEFAULT_PRIOR_NOISE = 0.05    # eta of melora-noise when config.prior_noise is 0

BaseSource = nn.Module | Callable[[], nn.Module]


def build_method(name: str, base_model: BaseSource, config: MeLoRAConfig, readout, **options):
    """Build method ``name`` (one of ``METHODS``) on ``base_model`` (a fresh model or a zero-arg factory).

    ``readout`` is how answers are scored (``melora_pyro.readouts``: ``ClozeReadout(...)`` or
    ``LetterReadout(label_token_ids)``); a list of label token ids means the letter readout.

    ``config`` gives the adapter shape (rank, alpha, targets, prior std); each method pins the fields it
    is defined by (e.g. ``melora-elementwise`` sets ``kl="elementwise"``) and keeps the rest.

    Options (all optional):
        seed (0): seed of the adapter initialisation (ensemble member k uses ``seed + k``); the global
            RNG is left untouched.
        weight_decay: for ``map`` / ``ensemble`` / ``laplace`` (default ``MAP_WEIGHT_DECAY``).
        dropout: for ``mcdropout`` (default ``MC_DROPOUT``).
        ensemble_size: for ``ensemble`` (default 3).
        prior_noise: for ``melora-noise`` (default ``config.prior_noise`` or 0.05).
        init_scale: initial std of the variational guides (default 1e-2).
        kl_reweighting: for ``blob``, BLoB's KL schedule (default True; False: the plain ELBO).
        prior_precision, fisher, max_fisher_examples, val_examples, val_samples: for ``laplace``
            (see ``baselines.LaplaceMethod``).
    Returns an object with ``fit``, ``predict``, ``adapter_state`` (``PyroMethod``, ``EnsembleMethod``
    or ``LaplaceMethod``). Raises ``ValueError`` for an unknown name or option.
    """
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid names: {list(METHODS)}")
    builder, allowed = _BUILDERS[name]
    unknown = sorted(set(options) - set(allowed) - {"seed"})
    if unknown:
        raise ValueError(f"method {name!r}: unknown options {unknown}; it takes {sorted(allowed) + ['seed']}")
    return builder(base_model, config, as_readout(readout), options)


def _seeded(seed: int, build: Callable[[], object]):
    """``build()`` with the torch RNG seeded by ``seed``, the global RNG state restored afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _fresh_base(base_model: BaseSource) -> nn.Module:
    return base_model if isinstance(base_model, nn.Module) else base_model()


def _point(base_model, config, ids, weight_decay: float, seed: int, name: str, dropout_at_test=False) -> PointMethod:
    def build():
        model = MeLoRAModel(_fresh_base(base_model), config, ids, name=name)
        return PointMethod(model, IdentityGuide(model), train_overrides={"weight_decay": weight_decay},
                           dropout_at_test=dropout_at_test, name=name)
    return _seeded(seed, build)


def _mle(base_model, config, ids, options):
    return _point(base_model, config, ids, 0.0, options.get("seed", 0), "mle")


def _map(base_model, config, ids, options):
    return _point(base_model, config, ids, options.get("weight_decay", MAP_WEIGHT_DECAY), options.get("seed", 0), "map")


def _mcdropout(base_model, config, ids, options):
    config = dataclasses.replace(config, dropout=options.get("dropout", MC_DROPOUT))
    return _point(base_model, config, ids, 0.0, options.get("seed", 0), "mcdropout", dropout_at_test=True)


def _ensemble(base_model, config, ids, options):
    if isinstance(base_model, nn.Module):
        raise ValueError("method 'ensemble' needs one base model per member: pass a zero-argument "
                         "factory (base_factory) instead of a model")
    seed, decay = options.get("seed", 0), options.get("weight_decay", MAP_WEIGHT_DECAY)
    members = [_point(base_model, config, ids, decay, seed + k, f"ensemble.{k}")
               for k in range(options.get("ensemble_size", ENSEMBLE_SIZE))]
    return EnsembleMethod(members)


def _laplace(base_model, config, ids, options):
    map_method = _point(base_model, config, ids, options.get("weight_decay", MAP_WEIGHT_DECAY),
                        options.get("seed", 0), "laplace")
    keys = ("prior_precision", "fisher", "max_fisher_examples", "val_examples", "val_samples")
    return LaplaceMethod(map_method, **{k: options[k] for k in keys if k in options})


def _blob(base_model, config, ids, options):
    def build():
        model = BLoBModel(_fresh_base(base_model), config, ids)
        elbo = BLoBELBO() if options.get("kl_reweighting", True) else None
        guide = BLoBGuide(model, **{"eps": options["eps"]} if "eps" in options else {})
        return PyroMethod(model, guide, elbo=elbo, name="blob")
    return _seeded(options.get("seed", 0), build)


def _variational(model_class, guide_class, name, **pinned):
    """Builder of a Me-LoRA variant: ``config`` with ``pinned`` fields, ``model_class`` + ``guide_class``."""
    def builder(base_model, config, ids, options):
        fields = {k: (v(config, options) if callable(v) else v) for k, v in pinned.items()}
        config = dataclasses.replace(config, **fields)

        def build():
            model = model_class(_fresh_base(base_model), config, ids, name=name.replace("-", "_"))
            guide = guide_class(model, **{"init_scale": options["init_scale"]} if "init_scale" in options else {})
            return PyroMethod(model, guide, name=name)
        return _seeded(options.get("seed", 0), build)
    return builder


def _noise(config, options) -> float:
    return options.get("prior_noise", config.prior_noise or DEFAULT_PRIOR_NOISE)


def _zero_shot(base_model, config, readout, options):
    return ZeroShotMethod(_fresh_base(base_model), readout)


_GUIDE_OPTIONS = ("init_scale",)
_LAPLACE_OPTIONS = ("weight_decay", "prior_precision", "fisher", "max_fisher_examples", "val_examples", "val_samples")
_BUILDERS = {
    "zero-shot": (_zero_shot, ()),
    "mle": (_mle, ()),
    "map": (_map, ("weight_decay",)),
    "mcdropout": (_mcdropout, ("dropout",)),
    "ensemble": (_ensemble, ("weight_decay", "ensemble_size")),
    "laplace": (_laplace, _LAPLACE_OPTIONS),
    "blob": (_blob, ("kl_reweighting", "eps")),
    "melora": (_variational(MeLoRAModel, MeanFieldGuide, "melora", kl="full_weight", prior_noise=0.0),
               _GUIDE_OPTIONS),
    "melora-elementwise": (_variational(MeLoRAModel, MeanFieldGuide, "melora-elementwise", kl="elementwise",
                                        prior_noise=0.0), _GUIDE_OPTIONS),
    "melora-noise": (_variational(MeLoRAModel, MeanFieldGuide, "melora-noise", kl="full_weight",
                                  prior_noise=_noise), _GUIDE_OPTIONS + ("prior_noise",)),
    "melora-diag": (_variational(DiagonalMeLoRAModel, DiagonalGuide, "melora-diag"), _GUIDE_OPTIONS),
}
