"""``choice_loglikelihoods``: per-choice continuation log-likelihoods, the cloze building block.

The numbers to compare with another harness (lm-evaluation-harness's ``loglikelihood`` requests):
for each question and choice k, ``log p(continuation_k | context_k)`` under a model, summed over the
continuation's tokens (``normalization="sum"``) or divided by its length in characters (``"char"``)
or tokens (``"token"``). Questions are packed (``melora_pyro.packing``): the context is computed once
for its K choices and only continuation-predicting positions reach ``lm_head``.
"""
from __future__ import annotations

from collections.abc import Sequence

import pyro.poutine as poutine
import torch
from torch import nn
from tqdm.auto import tqdm

from .cloze import ClozeTemplate, template_for
from .data import Example, _bos_prefix
from .packing import pack_batch, pack_example
from .readouts import ClozeReadout


@torch.no_grad()
def choice_loglikelihoods(model, tokenizer, examples: Sequence[Example], normalization: str = "sum",
                          batch_size: int = 16, template: ClozeTemplate | str | None = None,
                          max_length: int = 2048, progress: bool = False) -> torch.Tensor:
    """Log-likelihoods ``(N, K_max)`` of each example's choices, ``-inf`` where it has fewer than K_max.

    Args:
        model: a transformers causal LM (plain), a ``MeLoRAModel`` (scored at its guide's posterior
            mean when ``model.guide`` is set by a method, else with C = I: the plain LoRA B A), or a
            method of ``melora_pyro.methods`` with ``.model`` and ``.guide`` (a ``PyroMethod``).
        tokenizer: the model's tokenizer.
        examples: the questions.
        normalization: ``"sum"``, ``"char"`` or ``"token"`` (see the module docstring).
        batch_size: questions per forward pass.
        template: a ``ClozeTemplate`` or a dataset name (``melora_pyro.cloze.TEMPLATES``); default ARC's
            ``"Question: {question}\\nAnswer:"`` + ``" {choice}"``.
        max_length: longest packed row in tokens (longer passages are shortened from their start).
    """
    template = template if isinstance(template, ClozeTemplate) else template_for(template)
    readout = ClozeReadout(normalization)
    score = _scorer(model, readout)
    bos = _bos_prefix(tokenizer)
    rows = [pack_example(tokenizer, ex, template, max_length, bos) for ex in examples]
    num_labels = max(len(ex.choices) for ex in examples)
    pad = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
    device = next(_module(model).parameters()).device
    out = []
    for start in tqdm(range(0, len(rows), batch_size), desc="scoring", disable=not progress):
        batch = {k: v.to(device) for k, v in pack_batch(rows[start:start + batch_size], num_labels, pad).items()}
        out.append(score(batch).cpu())
    return torch.cat(out)


def _module(model) -> nn.Module:
    return model.model if hasattr(model, "guide") and not isinstance(model, nn.Module) else model


def _scorer(model, readout: ClozeReadout):
    """``score(batch) -> (b, K)`` for the kinds of model ``choice_loglikelihoods`` accepts."""
    from .model import MeLoRAModel  # the model imports readouts; scoring sits above both

    inputs = ("segment_ids", "position_ids", "score_positions", "score_targets", "score_choice",
              "choice_tokens", "choice_chars")
    if isinstance(model, nn.Module) and not isinstance(model, MeLoRAModel):
        return lambda batch: readout(model, batch["input_ids"], None, **{k: batch[k] for k in inputs})
    melora, guide = (model.model, model.guide) if not isinstance(model, MeLoRAModel) else (model, None)

    if guide is not None:
        mean = guide.posterior_mean()
    else:
        r, device = melora.rank, melora.lora_B[0].device
        mean = {"C": torch.eye(r, device=device).expand(melora.num_adapters, r, r)}

    def score(batch):
        A, B, C = poutine.condition(melora.sample_adapters, data=mean)()
        with melora.bound(A, B, C):
            return readout(melora.base, batch["input_ids"], None, **{k: batch[k] for k in inputs})
    return score
