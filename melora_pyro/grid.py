"""Grids of CLI runs: every cell is one ``melora-pyro train`` command (plus, optionally, one
``melora-pyro evaluate`` of its run), run as a subprocess, resumable, and read back from its run
directory.

    cells = [Cell("map-s0", ("--method", "map", "--dataset", "arc-e", ...)),
             Cell("map-ts-s0", ("--method", "map", ...), run="map-s0", evaluate=("--temperature-scale",))]
    run_grid(cells, "runs/comparison", jobs=2)        # skips finished cells, resumes stopped ones
    probs, labels, metrics = read_cell(cells[1], "runs/comparison")
    archive_cells(cells, "runs/comparison", "results/comparison")   # what the tables are rebuilt from

The run directories are scratch (checkpoints, caches); ``archive_cells`` keeps each done cell's result
(metrics, predictions, cost) in a small directory that is committed, and every reader and ``run_grid``
also look there, so a table survives its run directories and a later session only runs missing cells.

A cell that shares ``run`` with another reuses its training (the same flags must give the same run: the
first cell trains it); its ``evaluate`` flags score it again (e.g. with a fitted temperature, or on
another dataset's test split with ``--eval-dataset``) into an ``eval-<split>-<time>.json`` of its own.
Every cell's ``command`` is the shell line that reproduces it.
Parallel cells split the CPU threads between them (``OMP_NUM_THREADS``); on 2 cores two one-thread runs
take as long as the same two runs one after the other with two threads each (measured), so ``jobs`` is
for machines with cores to spare, or for keeping two grids moving at once.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from . import rundir
from .errors import MeLoRAError
from .pipeline import read_predictions


@dataclass(frozen=True)
class Cell:
    """One table cell: ``train`` flags (no ``--run-dir``), the run directory name (default ``name``)
    and the flags of a follow-up ``evaluate`` whose result the cell reports (None: train's own)."""

    name: str
    flags: tuple[str, ...]
    run: str | None = None
    evaluate: tuple[str, ...] | None = None

    @property
    def run_name(self) -> str:
        return self.run or self.name

    def commands(self, root) -> list[list[str]]:
        """The ``melora-pyro`` command lines of this cell (train, then evaluate if any)."""
        run_dir = str(Path(root) / self.run_name)
        lines = [["melora-pyro", "train", *self.flags, "--run-dir", run_dir]]
        if self.evaluate is not None:
            lines.append(["melora-pyro", "evaluate", "--run-dir", run_dir, *self.evaluate])
        return lines

    def command(self, root) -> str:
        """The shell line that reproduces this cell."""
        return " && ".join(" ".join(shlex.quote(a) for a in line) for line in self.commands(root))


class GridError(MeLoRAError):
    """A cell failed, or its results are missing."""


def is_done(cell: Cell, root, archive=None) -> bool:
    """Whether ``cell``'s results are on disk (in its run directory under ``root``, or in ``archive``)."""
    try:
        _result_file(cell, root)
        return True
    except GridError:
        return archive is not None and _archived(cell, archive, ".json").is_file()


def run_grid(cells: list[Cell], root, jobs: int = 1, threads: int | None = None, log=print,
             archive=None) -> dict[str, str]:
    """Run every cell not yet done, ``jobs`` at a time with ``threads`` CPU threads each (default: the
    cores divided among the jobs); returns ``{name: "done" | "failed: ..."}``. Two grids at once should
    share the cores (``threads=1`` each on 2 cores): more threads than cores made each run 2-3x slower.

    A run directory left unfinished (a stopped command) is continued with ``--resume``; each cell's
    output goes to ``root/<name>.log``. Cells sharing a run wait for the one that trains it. With
    ``archive``, each cell is archived as soon as it finishes, so a stopped grid keeps what it finished.
    One grid at a time per ``root`` (a lock on ``root/.grid.lock``, freed when its process ends): a
    second raises :class:`GridError` at once, since two processes resuming the same run corrupt it.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    with _exclusive(root):
        return _run_unlocked(cells, root, jobs, threads, log, archive)


@contextlib.contextmanager
def _exclusive(root: Path):
    """Hold ``root/.grid.lock`` (``flock``: the kernel frees it if the process dies) or raise GridError."""
    with open(root / ".grid.lock", "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "unknown"
            raise GridError(f"another grid (pid {holder}) is running on {root}; wait for it or use another root") \
                from None
        lock.truncate(0)
        lock.write(str(os.getpid()))
        lock.flush()
        yield


def _run_unlocked(cells: list[Cell], root: Path, jobs: int, threads: int | None, log, archive) -> dict[str, str]:
    threads = threads or max(1, (os.cpu_count() or 1) // jobs)
    by_run: dict[str, list[Cell]] = {}
    for cell in cells:
        by_run.setdefault(cell.run_name, []).append(cell)

    def run_group(group: list[Cell]) -> dict[str, str]:
        status = {}
        for cell in group:
            if is_done(cell, root, archive):
                status[cell.name] = "done"
                continue
            log(f"[grid] {cell.name}: {cell.command(root)}")
            try:
                _run_cell(cell, root, threads)
                if archive is not None:
                    archive_cells([cell], root, archive)
                status[cell.name] = "done"
                log(f"[grid] {cell.name}: done")
            except GridError as e:
                status[cell.name] = f"failed: {e}"
                log(f"[grid] {cell.name}: FAILED ({e})")
        return status

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        results = list(pool.map(run_group, by_run.values()))
    return {name: s for status in results for name, s in status.items()}


def _run_cell(cell: Cell, root: Path, threads: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    run_dir = root / cell.run_name
    train, *evaluate = cell.commands(root)
    log_path = root / f"{cell.name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    costs = []
    if not _trained(run_dir):
        if (run_dir / rundir.MARKER).is_file():
            train = train + ["--resume"]
        costs.append(_call(train, log_path, env))
    if evaluate:
        costs.append(_call(evaluate[0], log_path, env))
    _result_file(cell, root)  # raises if the command left no result
    cost = {key: sum(c[key] for c in costs) for key in ("wall_s", "cpu_s")}
    (root / f"{cell.name}.cost.json").write_text(json.dumps({**cost, "command": cell.command(root)}, indent=2))


def _call(line: list[str], log_path: Path, env: dict) -> dict:
    """Run one ``melora-pyro`` line with this interpreter; ``{"wall_s", "cpu_s"}`` it took."""
    executable = [sys.executable, "-m", "melora_pyro.cli", *line[1:]]
    with open(log_path, "a") as out:
        out.write("$ " + " ".join(shlex.quote(a) for a in line) + "\n")
        out.flush()
        start = time.monotonic()
        process = subprocess.Popen(executable, stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise GridError(f"exit status {process.returncode}, see {log_path}")
    return {"wall_s": time.monotonic() - start, "cpu_s": usage.ru_utime + usage.ru_stime}


def cell_cost(cell: Cell, root, archive=None) -> dict | None:
    """``{"wall_s", "cpu_s", "command"}`` of the commands this grid ran for ``cell`` (None if it ran none)."""
    path = Path(root) / f"{cell.name}.cost.json"
    if not path.is_file() and archive is not None:
        path = _archived(cell, archive, ".cost.json")
    return json.loads(path.read_text()) if path.is_file() else None


def archive_cells(cells: list[Cell], root, archive) -> int:
    """Copy each cell done under ``root`` to ``archive/<name>.{json,safetensors,cost.json,train_log.jsonl}``
    (its metrics, predictions, cost and training log, replacing an older copy); returns how many were copied."""
    copied = 0
    for cell in cells:
        try:
            result = _result_file(cell, root)
        except GridError:
            continue
        cost = Path(root) / f"{cell.name}.cost.json"
        log = Path(root) / cell.run_name / "train_log.jsonl"
        for source, suffix in ((result, ".json"), (_predictions_file(result), ".safetensors"), (cost, ".cost.json"),
                               (log, ".train_log.jsonl")):
            if source.is_file():
                target = _archived(cell, archive, suffix)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, target.with_name(target.name + ".tmp"))
                target.with_name(target.name + ".tmp").replace(target)
        copied += 1
    return copied


def train_log(cell: Cell, root, archive=None) -> list[dict]:
    """The records of the cell's ``train_log.jsonl`` (from ``archive`` if its run directory has none; [] if neither)."""
    path = Path(root) / cell.run_name / "train_log.jsonl"
    if not path.is_file() and archive is not None:
        path = _archived(cell, archive, ".train_log.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _archived(cell: Cell, archive, suffix: str) -> Path:
    return Path(archive) / f"{cell.name}{suffix}"


def _trained(run_dir: Path) -> bool:
    return (run_dir / "metrics.json").is_file() and rundir.read_marker(run_dir).get("finished", False)


def _result_file(cell: Cell, root) -> Path:
    """The metrics file the cell reports: train's ``metrics.json``, or its newest ``evaluate`` result."""
    run_dir = Path(root) / cell.run_name
    if cell.evaluate is None:
        path = run_dir / "metrics.json"
        if not (_trained(run_dir) and _predictions_file(path).is_file()):
            raise GridError(f"{cell.name}: no results in {run_dir}")
        wanted = {"dataset": _flag(cell.flags, "--dataset"), "split": _flag(cell.flags, "--eval-split")}
        if not _records(json.loads(path.read_text()), wanted):  # trained by another command line
            raise GridError(f"{cell.name}: {run_dir} scored another split or dataset than the cell's")
        return path
    wanted = {"dataset": _flag(cell.evaluate, "--eval-dataset") or _flag(cell.flags, "--dataset"),
              "split": _flag(cell.evaluate, "--eval-split")}
    scaled, glm = "--temperature-scale" in cell.evaluate, _flag(cell.evaluate, "--predictive") == "glm"
    found = [p for p in sorted(run_dir.glob("eval-*.json"), key=lambda p: p.stat().st_mtime_ns)
             if _predictions_file(p).is_file() and _evaluates(json.loads(p.read_text()), wanted, scaled, glm)]
    if not found:
        raise GridError(f"{cell.name}: no evaluation in {run_dir}")
    return found[-1]


def _flag(flags: tuple[str, ...], name: str) -> str | None:
    """The value after ``name`` in ``flags`` (None if absent)."""
    return flags[flags.index(name) + 1] if name in flags else None


def _evaluates(metrics: dict, wanted: dict, scaled: bool, glm: bool = False) -> bool:
    """Whether an ``evaluate`` result is temperature-scaled or not and from Me-LoRA's GLM predictive or not,
    as asked, and has the ``wanted`` values (a None one, or one the result does not record, matches anything)."""
    return ("temperature" in metrics) == scaled and (metrics.get("predictive") == "glm") == glm and _records(metrics, wanted)


def _records(metrics: dict, wanted: dict) -> bool:
    """Whether ``metrics`` has the ``wanted`` values (a None one, or one it does not record, matches anything)."""
    return all(value is None or metrics.get(key, value) == value for key, value in wanted.items())


def read_cell(cell: Cell, root, archive=None):
    """``(probs (N, K), labels (N,), metrics dict)`` of a done cell (from ``archive`` if its run
    directory has no results)."""
    try:
        path = _result_file(cell, root)
        predictions = _predictions_file(path)
    except GridError:
        if archive is None or not _archived(cell, archive, ".json").is_file():
            raise
        path, predictions = _archived(cell, archive, ".json"), _archived(cell, archive, ".safetensors")
    probs, labels = read_predictions(predictions)
    return probs, labels, json.loads(path.read_text())


def _predictions_file(metrics_file: Path) -> Path:
    """Where the predictions of a metrics file are (``pipeline.evaluate_run``, ``write_evaluation``)."""
    if metrics_file.name == "metrics.json":
        return metrics_file.with_name("predictions.safetensors")
    return metrics_file.with_suffix(".safetensors")
