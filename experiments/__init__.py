"""Studies that reproduce the tables in ``results/``: grids of ``melora-pyro`` runs and their analyses."""
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from melora_pyro._atomic import atomic_write_text
from melora_pyro.runs import RunError


def out_file(out: Path, suffix: str) -> Path:
    """``out`` (a results path given without suffix) with ``suffix`` appended: ``with_suffix`` would cut a
    name such as ``..._melora-kl0.1-pairs`` at its last dot."""
    return out.with_name(out.name + suffix)


def write_results(out: str | Path, doc: dict, text: str) -> None:
    """``<out>.json`` (``doc``) and ``<out>.md`` (``text``), each written whole or not at all."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_file(out, ".json"), json.dumps(doc, indent=2))
    atomic_write_text(out_file(out, ".md"), text)


def report_run_analysis(module: str, argv: Sequence[str] | None, out: str | None, measure: Callable[[], dict],
                        markdown: Callable[[dict, str], str]) -> int:
    """The end of an analysis of one run directory (``python -m experiments.<module>``): ``measure()``, or
    one error line and exit status 2 for a run it cannot read; then its markdown, headed by the command,
    written with the JSON to ``out`` when given, and printed. Returns the exit status."""
    try:
        result = measure()
    except (RunError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = markdown(result, f"python -m experiments.{module} " + " ".join(argv or sys.argv[1:]))
    if out:
        write_results(out, result, text)
    print(text)
    return 0
