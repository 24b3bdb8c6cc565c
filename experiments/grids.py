"""The profiles the studies share, as ``melora-pyro train`` flags, and their table helpers.

``cpu``: SmolLM2-135M, cloze scoring (``sum``; ``char`` on ARC-Challenge and OBQA: ``NORMALIZATION``),
adapters r = 8, alpha = 16 on q_proj and v_proj of the top 2 of 30 decoder layers and on lm_head, the
frozen layers below from the prefix cache; AdamW lr 3e-4, batch 8, constant lr (MAP's lr and epochs
were chosen on ARC-Easy dev: results/arc-e_map_cloze_cpu.md); 4 posterior samples at evaluation.
``gpu``: the same grid with q_proj / v_proj of *every* decoder layer and lm_head adapted (no prefix
cache) on CUDA, 10 posterior samples (BLoB's). Not run here (no GPU was lent).
"""
from __future__ import annotations

import math
import statistics

import torch

from melora_pyro import data
from melora_pyro.metrics import METRICS, accuracy, bootstrap_ci
from melora_pyro.grid import Cell

_COMMON = ("--target-modules", "q_proj", "v_proj", "lm_head", "--rank", "8", "--alpha", "16", "--lr", "3e-4",
           "--batch-size", "8", "--scoring", "cloze", "--log-every", "50")
PROFILES = {"cpu": (("--adapt-top-layers", "2", *_COMMON), 4),
            "gpu": (("--device", "cuda", "--eval-batch-size", "64", *_COMMON), 10)}  # (flags, eval samples)
BATCH_SIZE = 8
# The cloze normalisation of each dataset, the one with the best zero-shot ACC on its dev split
# (results/zero_shot_cloze.md: ARC-E sum 52.3 / char 43.0 %; ARC-C char 31.4 / sum 23.1 %; OBQA char 31.4 /
# sum 17.6 %); datasets without a dev split keep "sum", lm-evaluation-harness's acc.
NORMALIZATION = {"arc-c": "char", "obqa": "char"}


# Every Me-LoRA cell of these grids ran with one draw of C per step and the ELBO (KL weight 1), before
# antithetic pairs and a KL weight of 0.1 became the Me-LoRA defaults (results/sweep_arc-e_dev.md): pinned, so
# each printed command still reproduces its archived cell. A cell that sets one of them keeps its own.
MELORA_PINNED = {"--antithetic": "false", "--kl-weight": "1"}
# Methods run with extra flags: ``{variant: (method, flags)}``. melora-kl0.1-pairs is Me-LoRA with the
# defaults the dev sweep chose (KL weight 0.1, antithetic pairs); melora-pairs keeps the ELBO's KL weight 1
# and changes only the draws.
OPTION_VARIANTS = {"melora-flipout": ("melora", ("--flipout", "true")),
                   "melora-kl0.1-pairs": ("melora", ("--kl-weight", "0.1", "--antithetic", "true")),
                   "melora-pairs": ("melora", ("--antithetic", "true"))}


def steps_for(dataset: str, data_dir: str, epochs: float, train_limit: int | None = None) -> int:
    """Optimiser steps for ``epochs`` passes over ``dataset``'s training split (its first ``train_limit``
    questions of a seeded shuffle, when given) at ``BATCH_SIZE``."""
    n = len(data.load_examples(dataset, "train", data_dir))
    return math.ceil(min(n, train_limit or n) * epochs / BATCH_SIZE)


def train_flags(method: str, dataset: str, data_dir: str, epochs: float = 1, seed: int = 0,
                eval_split: str = "test", extra: tuple[str, ...] = (), profile: str = "cpu",
                train_limit: int | None = None) -> tuple[str, ...]:
    """The ``melora-pyro train`` flags of one run of ``profile`` (``PROFILES``)."""
    flags, eval_samples = PROFILES[profile]
    samples = "0" if method in ("zero-shot", "map", "mle") else str(eval_samples)
    norm = ("--normalization", NORMALIZATION[dataset]) if dataset in NORMALIZATION else ()
    limit = ("--train-limit", str(train_limit)) if train_limit else ()
    pinned = [a for flag, value in MELORA_PINNED.items() if method.startswith("melora") and flag not in extra
              for a in (flag, value)]
    return ("--method", method, "--dataset", dataset, "--data-dir", data_dir, *flags, *norm, *limit,
            "--steps", str(steps_for(dataset, data_dir, epochs, train_limit) if method != "zero-shot" else 1),
            "--seed", str(seed), "--eval-split", eval_split, "--eval-samples", samples, *pinned, *extra)


def temperature_cell(trained: Cell, name: str) -> Cell:
    """The cell that scores ``trained``'s run with one temperature fitted on the validation split."""
    return Cell(name, trained.flags, run=trained.run_name, evaluate=("--temperature-scale",))


def glm_cell(trained: Cell, name: str) -> Cell:
    """The cell that scores ``trained``'s Me-LoRA run on the test split with q(C) linearised (the GLM
    predictive), its width chosen by NLL on the validation split."""
    return Cell(name, trained.flags, run=trained.run_name,
                evaluate=("--eval-split", "test", "--predictive", "glm", "--posterior-scale", "validation"))


def mean_std(values: list[float], digits: int = 4) -> str:
    """``mean ± std`` over seeds (std of the sample; just the value for one seed)."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def method_table(by_method: dict, methods, doc: dict) -> list[str]:
    """Mean ± std over seeds of each of ``methods`` present in ``by_method`` (``{method: [(cell, probs,
    labels, metrics), ...]}``, one entry per seed), and of the fitted temperature where there is one."""
    lines = ["| method | seeds | ACC ↑ | ECE ↓ | NLL ↓ | Brier ↓ | temperature |", "|---|---|---|---|---|---|---|"]
    for method in methods:
        runs = by_method.get(method)
        if not runs:
            continue
        values = {k: [r[3][k] for r in runs] for k in METRICS}
        temperatures = [r[3].get("temperature") for r in runs]
        doc[method] = {"runs": [r[0].name for r in runs], **values, "temperature": temperatures}
        fitted = mean_std(temperatures, 2) if None not in temperatures else ""
        lines.append(f"| {method} | {len(runs)} | " + " | ".join(mean_std(values[k]) for k in METRICS) + f" | {fitted} |")
    return lines + [""]


def difference_table(by_method: dict, pairs, labels, doc: dict) -> list[str]:
    """Seed-mean ``a - b`` with 95% paired-bootstrap CIs over the seeds both have, for each pair present."""
    lines = ["Seed-mean differences on the same questions, 95% paired-bootstrap CIs (seeds present in "
             "both methods); a CI that excludes 0 resolves the difference.", "",
             "| difference | seeds | " + " | ".join(f"Δ {k.upper()}" for k in METRICS) + " |",
             "|---|---|" + "---|" * len(METRICS)]
    for a, b in pairs:
        if a not in by_method or b not in by_method:
            continue
        seeds_a = {r[0].name.rsplit("-s", 1)[-1]: r[1] for r in by_method[a]}
        seeds_b = {r[0].name.rsplit("-s", 1)[-1]: r[1] for r in by_method[b]}
        common = sorted(set(seeds_a) & set(seeds_b)) if b != "zero-shot" else sorted(seeds_a)
        if not common:
            continue
        pa = [seeds_a[s] for s in common]
        pb = [seeds_b[s] for s in common] if b != "zero-shot" else [by_method[b][0][1]] * len(common)
        cells = []
        for key, metric in METRICS.items():
            diff = sum(metric(x, labels) - metric(y, labels) for x, y in zip(pa, pb)) / len(pa)
            lo, hi = bootstrap_ci(metric, pa, labels, pb)
            cells.append(f"{diff:+.4f} [{lo:+.4f}, {hi:+.4f}]")
            doc.setdefault("differences", {})[f"{a} - {b} {key}"] = [diff, lo, hi]
        lines.append(f"| {a} - {b} | {len(common)} | " + " | ".join(cells) + " |")
    return lines + [""]


def signal_line(by_method: dict, labels, dataset: str, data_dir: str, doc: dict) -> str:
    """One line: the bar an answer must clear and the 95% bootstrap CIs of zero-shot's and MAP's ACC
    (MAP's: the mean over its seeds), which say whether the setting carries signal at all. The bar is
    chance (1 / choices, averaged over questions), or, where every question offers the same choices
    (BoolQ's "yes" / "no"), the share of the most frequent answer when that is higher: always "yes" is
    not knowing the answer. A method shows signal when its CI lies above the bar."""
    examples = [data.without_repeated_choices(ex) for ex in data.load_examples(dataset, "test", data_dir)]
    chance = sum(1 / len(ex.choices) for ex in examples) / len(examples)
    fixed_choices = len({tuple(ex.choices) for ex in examples}) == 1
    majority = torch.bincount(labels).max().item() / len(labels) if fixed_choices else chance
    bar, name = (majority, "the majority label") if majority > chance else (chance, "chance")
    doc["chance"], doc["majority"] = chance, majority
    parts, above = [], []
    for method in ("zero-shot", "map"):
        if method in by_method:
            seeds = [r[1] for r in by_method[method]]
            acc = sum(accuracy(p, labels) for p in seeds) / len(seeds)
            lo, hi = bootstrap_ci(accuracy, seeds, labels)
            above.append(lo > bar)
            parts.append(f"{method} {100 * acc:.1f} % [{lo * 100:.1f}, {hi * 100:.1f}]"
                         + ("" if above[-1] else f" (not above {name})"))
    verdict = " **No signal: the differences below measure nothing.**" if parts and not any(above) else ""
    head = f"chance {100 * chance:.1f} %" + (f", majority label {100 * majority:.1f} %" if name != "chance" else "")
    return f"Signal: {head}; ACC with 95% bootstrap CI: " + "; ".join(parts) + "." + verdict
