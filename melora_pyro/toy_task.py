"""The embedded default task ``toy``: four-choice two-digit addition, generated in code (no files).

What it is, exactly:

- Each question is ``"What is a + b?"`` for an unordered pair of integers ``10 <= a <= b <= 99`` (4,095
  pairs); the operands are shown in a random order.
- The four choices are the sum ``s`` and three distinct distractors drawn from ``s - 1``, ``s + 1``,
  ``s - 10``, ``s + 10`` and the sum with its last two digits swapped (when that differs from ``s``),
  in a random order; ``label`` is the index of ``s``.
- ``TOY_SEED`` fixes everything. 900 distinct pairs are drawn once and cut into 600 train, 100
  validation and 200 test questions, so the splits are disjoint by construction (no pair occurs in two
  splits, in either operand order).

Zero-shot, SmolLM2-135M-Instruct picks the sum on 24% of the test questions (chance: 25%) with a mean
top probability of 0.83: wrong and overconfident, which leaves accuracy and calibration to learn. The
task is meant to be learnable from the 600 training questions in a few hundred steps: a distractor is
off by one or by ten or has two digits swapped, so the units and tens digits of the sum settle it.
"""

from __future__ import annotations

import random

TOY_SEED = 1234
TOY_SPLIT_SIZES = {"train": 600, "validation": 100, "test": 200}
NUM_CHOICES = 4
_OPERANDS = range(10, 100)


def toy_rows(split: str) -> list[dict]:
    """The ``split`` of the toy task as dicts with the fields of ``data.Example``.

    Each dict has ``question`` (str), ``choices`` (tuple of 4 str), ``label`` (int in 0..3) and
    ``uid`` (``"toy-<split>-<i>"``). Raises ValueError for a split not in ``TOY_SPLIT_SIZES``.
    """
    if split not in TOY_SPLIT_SIZES:
        raise ValueError(f"toy task: unknown split {split!r}; valid splits: {list(TOY_SPLIT_SIZES)}")
    rng = random.Random(TOY_SEED)
    pairs = [(a, b) for a in _OPERANDS for b in _OPERANDS if a <= b]
    # All questions come from one rng stream in a fixed order, then are cut into the splits in the
    # order of TOY_SPLIT_SIZES, so every split is reproducible and the splits are disjoint.
    questions = [_question(pair, rng) for pair in rng.sample(pairs, sum(TOY_SPLIT_SIZES.values()))]
    names = list(TOY_SPLIT_SIZES)
    start = sum(TOY_SPLIT_SIZES[name] for name in names[: names.index(split)])
    chosen = questions[start : start + TOY_SPLIT_SIZES[split]]
    return [dict(row, uid=f"toy-{split}-{i}") for i, row in enumerate(chosen)]


def _question(pair: tuple[int, int], rng: random.Random) -> dict:
    """One question for the operand pair: operands in random order, sum among three distractors."""
    a, b = pair if rng.random() < 0.5 else pair[::-1]
    total = a + b
    distractors = rng.sample(_distractors(total), NUM_CHOICES - 1)
    values = [total, *distractors]
    rng.shuffle(values)
    return {
        "question": f"What is {a} + {b}?",
        "choices": tuple(str(v) for v in values),
        "label": values.index(total),
    }


def _distractors(total: int) -> list[int]:
    """Near misses of ``total``: off by one, off by ten, last two digits swapped (if that differs)."""
    near = [total - 1, total + 1, total - 10, total + 10]
    tens, units = total // 10 % 10, total % 10
    swapped = total + 9 * (units - tens)  # 123 -> 132, 45 -> 54
    return near + ([swapped] if swapped != total else [])
