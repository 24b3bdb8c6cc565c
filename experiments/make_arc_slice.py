"""Write the embedded ARC-Easy slice that ``make demo`` runs on (run once; its output is committed).

    python -m experiments.make_arc_slice --data-dir ../shared/data

The slice: seeded samples (``random.Random(SEED)``) of the ARC-Easy files, rows copied verbatim:
``TRAIN`` questions of the train split, ``VALIDATION`` of the dev split (temperature scaling is fitted
there) and ``TEST`` of the test split, as gzip JSONL under ``melora_pyro/embedded/arc-easy-slice/``.
Seed and sizes were fixed before any model was scored on them.
"""
from __future__ import annotations

import argparse
import gzip
import random
from pathlib import Path

SEED, TRAIN, VALIDATION, TEST = 2026, 300, 100, 300
OUT = Path(__file__).resolve().parents[1] / "melora_pyro" / "embedded" / "arc-easy-slice"
FILES = {"train": ("ARC-Easy-Train.jsonl", TRAIN), "validation": ("ARC-Easy-Dev.jsonl", VALIDATION),
         "test": ("ARC-Easy-Test.jsonl", TEST)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default="../shared/data")
    args = parser.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    rng = random.Random(SEED)
    for split, (name, size) in FILES.items():
        lines = [l for l in (Path(args.data_dir) / "arc" / "ARC-Easy" / name).read_text(encoding="utf-8").split("\n") if l.strip()]
        chosen = sorted(rng.sample(range(len(lines)), size))
        payload = ("\n".join(lines[i] for i in chosen) + "\n").encode("utf-8")
        (OUT / f"{split}.jsonl.gz").write_bytes(gzip.compress(payload, mtime=0))
        print(f"{split}: {size} of {len(lines)} rows")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
