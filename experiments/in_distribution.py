"""In-distribution calibration: train and test on each dataset, every method; ACC / ECE / NLL / Brier.

    python -m experiments.in_distribution --profile cpu-small --datasets wg-s arc-e
"""
from __future__ import annotations

from melora_pyro.methods import METHODS

from . import common

DATASETS = ("wg-s", "arc-c", "arc-e", "wg-m", "obqa", "boolq")
NAME = "in_distribution"


def main(argv=None) -> int:
    args = common.parser(__doc__.splitlines()[0], METHODS, DATASETS, NAME).parse_args(argv)
    return common.run_in_distribution(args, NAME, "In-distribution results", {m: (m, dict(args.method_option)) for m in args.methods})


if __name__ == "__main__":
    raise SystemExit(main())
