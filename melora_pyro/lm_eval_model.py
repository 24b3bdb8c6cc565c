"""An lm-evaluation-harness model: a trained Me-LoRA run scored by the harness everyone reports with.

    melora-lm-eval --model melora --model_args run_dir=runs/arc,num_samples=10 --tasks arc_easy

``melora-lm-eval`` is lm-eval's own command line with the model ``melora`` registered (lm-eval 0.4
has no plugin hook, so plain ``lm_eval`` does not know it); from Python, ``import melora_pyro.lm_eval_model``
registers it for ``lm_eval.simple_evaluate(model="melora", ...)``, or pass a :class:`MeLoRALM` object.

``loglikelihood`` is the posterior predictive: for a request (context, continuation),
``log (1/S) sum_s p(continuation | context, C_s)`` over S draws of the adapters from the guide (drawn
once, shared by every request, so a question's choices are compared under the same draws);
``num_samples=0`` scores the posterior mean (one forward). Tokens follow lm-eval's ``_encode_pair``
(trailing spaces of the context move to the continuation) with the tokenizer's BOS in front:
``melora_pyro.packing.encode_pair``, as the library's cloze scoring does. Only ``loglikelihood`` (multiple-choice tasks) is supported.
Needs the ``eval`` extra: ``pip install 'melora-pyro[eval]'``.
"""
from __future__ import annotations

import math
import sys

import pyro
import pyro.poutine as poutine
import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm.auto import tqdm

from .baselines.method import set_adapter_dropout
from .data import _bos_prefix
from .errors import MeLoRAError
from .model import MeLoRAModel
from .packing import encode_pair


@register_model("melora")
class MeLoRALM(TemplateLM):
    """lm-eval model of a Me-LoRA ``model`` + ``guide`` (or a CLI run directory).

    Args:
        run_dir: a finished ``melora-pyro train`` run (the model, guide and tokenizer are rebuilt from it),
            or instead ``model`` (a ``MeLoRAModel``), ``guide`` and ``tokenizer`` objects.
        num_samples: S posterior draws (0: the posterior mean).
        batch_size: requests per forward pass (lm-eval's ``--batch_size``; ``auto`` means 16).
        max_length: longest scored sequence in tokens; longer ones lose tokens from the left, as in lm-eval.
        seed: seed of the S draws.
    """

    def __init__(self, run_dir: str | None = None, num_samples: int = 10, batch_size: int | str = 16,
                 max_length: int = 2048, seed: int = 0, model: MeLoRAModel | None = None, guide=None,
                 tokenizer=None, **_lm_eval_options):
        super().__init__()
        if (run_dir is None) == (model is None):
            raise MeLoRAError("melora lm-eval model: give run_dir=..., or model, guide and tokenizer objects")
        if run_dir is not None:
            model, guide, tokenizer = _load_run(run_dir)
        if not isinstance(model, MeLoRAModel) or guide is None or tokenizer is None:
            raise MeLoRAError("melora lm-eval model: model must be a MeLoRAModel with its guide and tokenizer")
        self.model, self.guide, self.tokenizer = model, guide, tokenizer
        self.num_samples, self.max_length = int(num_samples), int(max_length)
        self.batch_size = 16 if str(batch_size).startswith("auto") else int(batch_size)
        if self.num_samples < 0 or self.batch_size < 1 or self.max_length < 2:
            raise MeLoRAError(f"melora lm-eval model: num_samples must be >= 0, batch_size >= 1, max_length >= 2; "
                              f"got {num_samples}, {batch_size}, {max_length}")
        set_adapter_dropout(model, active=False)
        self.bos = _bos_prefix(tokenizer)
        self.draws = self._draw_adapters(int(seed))
        self._device = model.lora_B[0].device

    @torch.no_grad()
    def _draw_adapters(self, seed: int) -> list[tuple]:
        """The S adapter tuples ``(A, B, C)`` the requests are scored under (one: the posterior mean)."""
        if self.num_samples == 0:
            return [poutine.condition(self.model.sample_adapters, data=self.guide.posterior_mean())()]
        with torch.random.fork_rng(devices=[]):
            pyro.set_rng_seed(seed)
            traces = [poutine.trace(self.guide).get_trace() for _ in range(self.num_samples)]
            return [poutine.replay(self.model.sample_adapters, trace=t)() for t in traces]

    # --- lm-eval's tokenisation hooks
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:  # the context of an empty-context request
        return self.bos[0] if self.bos else self.eot_token_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer(string, add_special_tokens=False)["input_ids"]

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        return encode_pair(self.tokenizer, context, continuation, self.bos)

    # --- scoring
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """``(log p, is_greedy)`` per ``(strings, context_ids, continuation_ids)`` request, in order.

        ``is_greedy``: every continuation token is the argmax of the predictive next-token distribution
        (the average over the draws)."""
        pairs = [(ctx, cont) for _, ctx, cont in requests]
        for (strings, _, cont) in requests:
            if not cont:
                raise MeLoRAError(f"melora lm-eval model: the continuation {strings[1]!r:.60} has no tokens")
        order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
        results: list[tuple[float, bool] | None] = [None] * len(pairs)
        for start in tqdm(range(0, len(order), self.batch_size), disable=disable_tqdm, desc="melora loglikelihood"):
            chunk = order[start:start + self.batch_size]
            for i, result in zip(chunk, self._score_batch([pairs[i] for i in chunk])):
                results[i] = result
        return results

    @torch.no_grad()
    def _score_batch(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """Left-padded rows ``context + continuation[:-1]``; only the last ``max continuation length``
        positions reach ``lm_head``."""
        rows = [(ctx + cont)[-(self.max_length + 1):][:-1] for ctx, cont in pairs]
        width, keep = max(map(len, rows)), max(len(cont) for _, cont in pairs)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eot_token_id
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=self._device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=self._device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        targets = torch.tensor([[pad] * (keep - len(c)) + c for _, c in pairs], device=self._device)
        scored = torch.tensor([[False] * (keep - len(c)) + [True] * len(c) for _, c in pairs], device=self._device)
        sequence_logps, mean_probs = [], 0.0
        for A, B, C in self.draws:
            with self.model.bound(A, B, C) as lm:
                logits = lm(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=keep,
                            use_cache=False).logits.float()
            logp = logits.log_softmax(-1)
            token_logp = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1).masked_fill(~scored, 0.0)
            sequence_logps.append(token_logp.double().sum(-1))
            mean_probs = mean_probs + logp.exp() / len(self.draws)
        loglik = torch.logsumexp(torch.stack(sequence_logps), 0) - math.log(len(self.draws))
        greedy = ((mean_probs.argmax(-1) == targets) | ~scored).all(-1)
        return [(float(ll), bool(g)) for ll, g in zip(loglik, greedy)]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise MeLoRAError("the melora lm-eval model scores loglikelihood (multiple-choice) tasks only, "
                          "not loglikelihood_rolling (perplexity)")

    def generate_until(self, requests, disable_tqdm: bool = False):
        raise MeLoRAError("the melora lm-eval model scores loglikelihood (multiple-choice) tasks only, "
                          "not generate_until")


def _load_run(run_dir):
    """``(model, guide, tokenizer)`` of a finished CLI run."""
    from .pipeline import load_run
    from .runs import load_settings

    method, task = load_run(load_settings(run_dir), run_dir)  # never trains or writes
    if not isinstance(getattr(method, "model", None), MeLoRAModel) or getattr(method, "guide", None) is None:
        raise MeLoRAError(f"{run_dir}: method {type(method).__name__} has no single model and guide to score")
    return method.model, method.guide, task.tokenizer


def main(argv: list[str] | None = None) -> None:
    """``melora-lm-eval``: lm-eval's command line, with the ``melora`` model registered."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
