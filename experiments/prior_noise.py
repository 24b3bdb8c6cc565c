"""Me-LoRA with and without the randomised prior std (the paper's Eq. 8: sigma = sigma_p + U(0, eta)).

    python -m experiments.prior_noise --profile cpu-small --datasets wg-s arc-e --noise 0.02 0.05 0.1

Runs ``melora`` (eta = 0) and ``melora-noise`` at each ``--noise`` level eta, on each dataset
(``--methods`` is not used).
"""
from __future__ import annotations

from . import common

DATASETS = ("wg-s", "arc-e")
NAME = "prior_noise"


def main(argv=None) -> int:
    p = common.parser(__doc__.splitlines()[0], ("melora", "melora-noise"), DATASETS, NAME)
    p.add_argument("--noise", nargs="+", type=float, default=[0.05], help="eta levels of melora-noise")
    args = p.parse_args(argv)
    variants = {"melora (eta=0)": ("melora", {})}
    variants.update({f"melora-noise (eta={eta:g})": ("melora-noise", {"prior_noise": eta}) for eta in args.noise})
    return common.run_in_distribution(args, NAME, "Randomised prior std: Me-LoRA with and without prior noise",
                                      variants)


if __name__ == "__main__":
    raise SystemExit(main())
