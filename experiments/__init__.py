"""Studies that reproduce the tables in ``results/``: grids of ``melora-pyro`` runs and their analyses."""
from pathlib import Path


def out_file(out: Path, suffix: str) -> Path:
    """``out`` (a results path given without suffix) with ``suffix`` appended: ``with_suffix`` would cut a
    name such as ``..._melora-kl0.1-pairs`` at its last dot."""
    return out.with_name(out.name + suffix)
