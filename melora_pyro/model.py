"""``MeLoRAModel``: a transformers causal LM with Me-LoRA adapters, as a Pyro model."""
from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
from pyro.infer.util import is_validation_enabled
import torch
from torch import nn

from ._params import pyro_param
from .config import MeLoRAConfig
from .flipout import flipout_noise, flipout_parameters
from .layers import MeLoRALinear, inject_adapters
from .priors import prior_from_config
from .readouts import LetterReadout, as_readout


class MeLoRAModel(nn.Module):
    """Me-LoRA on a causal LM: ``W0 x + s B C A x`` in every target linear, C latent.

    Calling the model is the Pyro model (use it with any guide of the ``guides`` package)::

        model(input_ids, attention_mask=None, labels=None, num_data=None, choice_mask=None, **readout_inputs)

    samples the stacked latent ``C`` (site ``"C"``, shape ``(L, r, r)`` in plate ``"adapters"``),
    binds the adapters, asks the readout for the K answer scores, records ``probs`` (site
    ``"probs"``, ``(batch, K)``, their softmax) and observes ``labels`` (site ``"y"``) in
    ``pyro.plate("data", num_data)``. Returns the scores ``(batch, K)``. ``choice_mask``
    ``(batch, K)`` bool marks the choices each question offers (a 3-choice question among 5-choice
    ones); the others get probability 0. ``readout_inputs`` are the readout's extra batch tensors
    (the packed cloze layout, ``melora_pyro.packing.pack_batch``).

    The readout (``melora_pyro.readouts``) says how scores are read: ``LetterReadout`` (the label
    tokens' next-token logits at the last position; built from a list of label token ids) or
    ``ClozeReadout`` (each choice's continuation log-likelihood, packed).

    A and B are stacked per shape group (layers with equal ``(n, m)`` share one ``(L_g, r, n)``
    tensor) so that a step touches a handful of Pyro sites however many layers are adapted. With
    ``config.gauge == "unit"`` the layers use A with unit rows and B with unit columns
    (:meth:`fix_gauge`) and C starts at 0; with ``"none"`` (the default) they use A and B as stored
    and C starts at the identity (:meth:`initial_c`).

    Args:
        base_model: a transformers causal LM (its parameters are frozen); inputs must be left-padded.
        config: ``MeLoRAConfig``.
        readout: a readout object, or the K vocabulary ids of the answer labels (distinct), which
            means ``LetterReadout(ids)``.
        name: prefix of the Pyro parameter names.
    """

    def __init__(self, base_model: nn.Module, config: MeLoRAConfig, readout, name: str = "melora"):
        super().__init__()
        if any(isinstance(m, MeLoRALinear) for m in base_model.modules()):
            raise ValueError("base_model already carries Me-LoRA adapters; load a fresh copy of it")
        self.config, self.name = config, name
        self.readout = as_readout(readout)
        if isinstance(self.readout, LetterReadout):
            _check_label_ids(self.readout.label_token_ids, _vocab_size(base_model))
        layers = inject_adapters(base_model, config.target_modules, config.rank, config.scaling,
                                 config.dropout)  # checks everything first: a failure leaves base_model as it was
        self.base = base_model.requires_grad_(False)
        self.prior = prior_from_config(config)

        # Group layers by shape; the order of self.layer_names is the order of C's first axis.
        groups: dict[tuple[int, int], list[str]] = {}
        for path, layer in layers.items():
            groups.setdefault((layer.in_features, layer.out_features), []).append(path)
        self.layer_names = [path for paths in groups.values() for path in paths]
        self._layers = [layers[p] for p in self.layer_names]
        self._group_sizes = [len(paths) for paths in groups.values()]
        r = config.rank
        device = next(base_model.parameters()).device
        self.lora_A = nn.ParameterList()
        self.lora_B = nn.ParameterList()
        for (n, m), paths in groups.items():
            A = torch.empty(len(paths), r, n, device=device)
            for a in A:  # peft's LoRA initialisation of A
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            self.lora_A.append(nn.Parameter(A))
            self.lora_B.append(nn.Parameter(self._initial_b(len(paths), m, r, device)))

    def _initial_b(self, num_layers: int, m: int, r: int, device) -> torch.Tensor:
        """``(L_g, m, r)``: small Gaussian (``init_b_std``) as stored; in the unit gauge only B's
        directions count, so B^T is drawn like A (a tiny B would turn each Adam step into a large rotation)."""
        if self.config.gauge == "none":
            return torch.randn(num_layers, m, r, device=device) * self.config.init_b_std
        B_t = torch.empty(num_layers, r, m, device=device)
        for b in B_t:
            nn.init.kaiming_uniform_(b, a=math.sqrt(5))
        return B_t.mT.contiguous()

    @classmethod
    def from_peft(cls, base_model: nn.Module, adapter_dir, readout, name: str = "melora",
                  **config_fields) -> "MeLoRAModel":
        """Me-LoRA on a LoRA adapter trained with peft: A and B from ``adapter_dir``, C latent.

        Rank, alpha, target modules and dropout come from the adapter's ``adapter_config.json``;
        ``config_fields`` set the rest of ``MeLoRAConfig`` (``prior_std``, ``kl``, ...). With C at the
        identity (every guide's start) the model computes exactly what the peft adapter does; fit q(C)
        post hoc, with A and B frozen (``requires_grad_(False)``) or trained on. ``base_model`` must be
        a fresh copy of the adapter's base; ``readout`` as for the constructor. Raises
        ``io.CheckpointError`` for an adapter that is not a plain LoRA of this base (see ``peft_format``).
        """
        from .peft_format import load_peft_adapter, read_peft_config

        model = cls(base_model, read_peft_config(adapter_dir, **config_fields), readout, name=name)
        load_peft_adapter(model, adapter_dir)
        return model

    def lora_layers(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{module path: (A_l (r, n), B_l (m, r))}`` in C's layer order: views of the stacked
        parameters (writing into them under ``torch.no_grad()`` sets the adapter)."""
        return dict(zip(self.layer_names, zip(_unbind_all(self.lora_A), _unbind_all(self.lora_B))))

    @torch.no_grad()
    def posterior_mean_layers(self, guide: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{module path: (A_l (r, n), B_l C_l (m, r))}`` with every latent at ``guide``'s posterior mean:
        the plain LoRA factors of the posterior-mean model (layer l adds ``s (B_l C_l) A_l`` to W0).
        Variants with other latents (``sample_adapters`` overridden) are covered alike."""
        A, B, C = poutine.condition(self.sample_adapters, data=guide.posterior_mean())()
        BC = [b @ c for b, c in zip(B, C.split(self._group_sizes))]
        return dict(zip(self.layer_names, zip(_unbind_all(A), _unbind_all(BC))))

    @property
    def num_adapters(self) -> int:
        """L, the number of adapted linear layers."""
        return len(self.layer_names)

    @property
    def rank(self) -> int:
        return self.config.rank

    @property
    def label_token_ids(self) -> list[int] | None:
        """The label tokens of a letter readout; None for other readouts."""
        return getattr(self.readout, "label_token_ids", None)

    def adapter_params(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Register A and B with Pyro; returns the per-group stacks ``A_g (L_g, r, n)``, ``B_g (L_g, m, r)``
        as the layers use them (:meth:`fix_gauge`)."""
        A = [pyro_param(f"{self.name}.lora_A.{g}", a) for g, a in enumerate(self.lora_A)]
        B = [pyro_param(f"{self.name}.lora_B.{g}", b) for g, b in enumerate(self.lora_B)]
        return self.fix_gauge(A, B)

    def fix_gauge(self, A: list[torch.Tensor], B: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The stacks the layers use: in the unit gauge rows of A and columns of B scaled to length 1
        (differentiably, so their lengths get no gradient), else ``(A, B)`` unchanged."""
        if self.config.gauge == "none":
            return A, B
        return [a / a.norm(dim=-1, keepdim=True) for a in A], [b / b.norm(dim=-2, keepdim=True) for b in B]

    def initial_c(self) -> torch.Tensor:
        """Where a guide starts C, ``(L, r, r)``: 0 in the unit gauge (``dW = 0``, and the gradient in C
        does not vanish since A and B have unit length), the identity with ``gauge="none"`` (``dW = s B A``,
        small as B is)."""
        eye = torch.eye(self.rank, device=self.lora_B[0].device).repeat(self.num_adapters, 1, 1)
        return eye if self.config.gauge == "none" else torch.zeros_like(eye)

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The trainable adapter tensors ``{"lora_A.g": (L_g, r, n), "lora_B.g": (L_g, m, r)}``."""
        return {f"lora_{x}.{g}": t for x, stacks in (("A", self.lora_A), ("B", self.lora_B))
                for g, t in enumerate(stacks)}

    def gram_matrices(self, A, B) -> tuple[torch.Tensor, torch.Tensor]:
        """``A A^T`` and ``B^T B`` of every layer, each ``(L, r, r)`` in C's layer order."""
        return torch.cat([a @ a.mT for a in A]), torch.cat([b.mT @ b for b in B])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, num_data: int | None = None,
                choice_mask: torch.Tensor | None = None, **readout_inputs) -> torch.Tensor:
        batch = _check_batch(input_ids, attention_mask, labels, num_data,
                             left_padded=isinstance(self.readout, LetterReadout))
        logits = self.label_logits(input_ids, attention_mask, *self.sample_adapters(), **readout_inputs)
        _check_choices(labels, choice_mask, batch, logits.shape[-1])
        if choice_mask is not None:
            logits = logits.masked_fill(~choice_mask, float("-inf"))
        # The batch is the subsample; its indices only fix the likelihood's scale num_data / batch.
        with pyro.plate("data", size=batch if num_data is None else num_data,
                        subsample=torch.arange(batch, device=input_ids.device)):
            pyro.deterministic("probs", logits.softmax(-1), event_dim=1)
            pyro.sample("y", dist.Categorical(logits=logits), obs=labels)
        return logits

    def sample_adapters(self):
        """Register A and B and sample the latent ``C`` ``(L, r, r)`` from the prior; returns ``(A, B, C)``
        as ``label_logits`` takes them, or inside a ``melora_pyro.flipout`` block ``(A, B, M, None, E)``:
        C's guide mean ``M`` and Flipout noise ``E = Omega o eps`` ``(L, r, r)``. Variants with other
        latents (``melora_pyro.baselines``) override it."""
        A, B = self.adapter_params()
        prior = self.prior(*self.gram_matrices(A, B), self.config.scaling)
        with pyro.plate("adapters", self.num_adapters):
            C = pyro.sample("C", prior)
        source = flipout_parameters(C)
        if source is not None:
            return A, B, source[0], None, flipout_noise(source[1])
        return A, B, C

    def label_logits(self, input_ids, attention_mask, A, B, C, a_noise=None, c_noise=None,
                     **readout_inputs) -> torch.Tensor:
        """The readout's answer scores ``(batch, K)`` with the adapters bound to (A, B, C) (and Flipout
        noise, see :meth:`bound`)."""
        with self.bound(A, B, C, a_noise, c_noise):
            return self.readout(self.base, input_ids, attention_mask, **readout_inputs)

    @contextlib.contextmanager
    def bound(self, A, B, C, a_noise=None, c_noise=None):
        """Bind every adapted layer to its slice of ``(A, B, C)`` (as ``sample_adapters`` returns them)
        for the duration of the block; the base model then computes ``W0 x + s B C A x``::

            with model.bound(*model.sample_adapters()):
                logits = model.base(input_ids).logits

        Optional Flipout noise (``melora_pyro.flipout``): ``a_noise``, stacks shaped like ``A`` (then
        ``A`` is A's mean), or ``c_noise`` ``(L, r, r)`` (then ``C`` is C's mean).
        """
        BC = [b @ c for b, c in zip(B, C.split(self._group_sizes))]
        bindings = [_unbind_all(A), _unbind_all(BC)]
        if a_noise is not None or c_noise is not None:
            missing = [None] * len(self._layers)
            bindings += [_unbind_all(a_noise) if a_noise is not None else missing,
                         _unbind_all(B) if c_noise is not None else missing,
                         c_noise.unbind(0) if c_noise is not None else missing]
        for layer, *binding in zip(self._layers, *bindings):
            layer.bound = tuple(binding)
        try:
            yield self.base
        finally:
            for layer in self._layers:  # drop references so the graph can be freed
                layer.bound = None


def _unbind_all(stacks):
    return [t for stack in stacks for t in stack.unbind(0)]


def _vocab_size(model) -> int:
    return model.get_output_embeddings().weight.shape[0]


def _check_label_ids(ids, vocab_size) -> list[int]:
    ids = [int(i) for i in ids]
    if not ids:
        raise ValueError("label_token_ids is empty: give the vocabulary ids of the K answer labels")
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise ValueError(f"label_token_ids {bad} are outside the vocabulary [0, {vocab_size})")
    if len(set(ids)) != len(ids):
        raise ValueError(f"label_token_ids {ids} contain duplicates; each label needs its own token")
    return ids


def _check_batch(input_ids, attention_mask, labels, num_data, left_padded: bool) -> int:
    """The batch size b of ``input_ids`` (b, T); ValueError for inputs that do not fit it (see ``forward``)."""
    if input_ids.dim() != 2 or input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be a non-empty (batch, seq) tensor, got shape {tuple(input_ids.shape)}")
    batch = input_ids.shape[0]
    if num_data is not None and not (isinstance(num_data, int) and not isinstance(num_data, bool) and num_data >= batch):
        raise ValueError(f"num_data must be an integer >= the batch size {batch} (the training set's size), "
                         f"got {num_data!r:.40}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
                         f"got {tuple(attention_mask.shape)}")
    if labels is not None and labels.shape != (batch,):
        raise ValueError(f"labels must have shape ({batch},), got {tuple(labels.shape)}")
    # The value check synchronises a GPU: under Pyro's validation only.
    if left_padded and is_validation_enabled() and attention_mask is not None and not attention_mask[:, -1].bool().all():
        rows = (~attention_mask[:, -1].bool()).nonzero().flatten().tolist()
        raise ValueError(f"attention_mask must keep the last position of every row (inputs are left-padded); "
                         f"rows {rows[:5]} mask it")
    return batch


def _check_choices(labels, choice_mask, batch: int, num_labels: int) -> None:
    """ValueError for a ``choice_mask`` not ``(b, K)`` or labels outside 0..K-1 or ruled out by it."""
    if choice_mask is not None and tuple(choice_mask.shape) != (batch, num_labels):
        raise ValueError(f"choice_mask must have shape ({batch}, {num_labels}), got {tuple(choice_mask.shape)}")
    if labels is None or not labels.numel() or not is_validation_enabled():
        return
    if labels.min() < 0 or labels.max() >= num_labels:
        raise ValueError(f"labels must lie in 0..{num_labels - 1}, got values {labels.unique().tolist()}")
    if choice_mask is not None and not choice_mask.gather(1, labels[:, None]).all():
        ruled_out = labels[~choice_mask.gather(1, labels[:, None]).squeeze(1)].tolist()
        raise ValueError(f"labels {ruled_out[:5]} are choices the choice_mask rules out (their probability is 0)")
