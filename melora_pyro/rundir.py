"""Run directories the library owns: a marker it writes, one writer at a time, and deletion of only what it wrote.

    run_dir/melora-run.json   the marker: {"format_version", "created", "written": [names], "finished", "changes"}
    run_dir/melora-run.lock   while a process writes into the run: {"pid", "host"} of that process

A directory without the marker is not a run: ``--overwrite`` never deletes it. In a run it owns,
``--overwrite`` deletes the entries the marker lists as written, and only when each holds nothing but
what a run writes there (checkpoint directories with checkpoint files, ensemble member logs, the runs
of a demo, each with its own marker); anything else anywhere in it refuses the whole deletion.
``changes`` records what a ``--resume`` changed (a new lr) and at which step it took effect.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import time
from pathlib import Path

from ._atomic import atomic_write_text
from .errors import MeLoRAError

MARKER, LOCK = "melora-run.json", "melora-run.lock"
FORMAT_VERSION = 1
_CHECKPOINT_FILES = frozenset({"adapters.safetensors", "melora.json", "state.safetensors", "trainer.json"})
_CHECKPOINT_DIR = re.compile(r"step-\d{8,}|\.tmp-step-.*")
_MEMBER_DIR = re.compile(r"member-\d+")
_ATOMIC_TMP = re.compile(r"\..+\.[^.]+\.tmp")  # a temporary file of _atomic.atomic_write_bytes


class RunDirError(MeLoRAError):
    """A run directory that is not owned, is in use, or holds files no run wrote."""


def is_owned(run_dir) -> bool:
    return (Path(run_dir) / MARKER).is_file()


def read_marker(run_dir) -> dict:
    """The marker of an owned run directory; ``RunDirError`` if there is none or it is damaged."""
    path = Path(run_dir) / MARKER
    if not path.is_file():
        raise RunDirError(f"{run_dir} is not a run directory melora-pyro created (no {MARKER}); "
                          f"train into a new --run-dir")
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RunDirError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(marker, dict) or marker.get("format_version") != FORMAT_VERSION \
            or not isinstance(marker.get("written"), list):
        raise RunDirError(f"{path}: unsupported run marker (expected format_version {FORMAT_VERSION})")
    return marker


def write_marker(run_dir, marker: dict) -> None:
    atomic_write_text(Path(run_dir) / MARKER, json.dumps(marker, indent=2))


def create_marker(run_dir) -> None:
    """Mark ``run_dir`` (existing, empty of runs) as a run directory this library owns."""
    write_marker(run_dir, {"format_version": FORMAT_VERSION, "created": _now(), "written": [],
                           "finished": False, "changes": []})


def record_written(run_dir, *names: str) -> None:
    """Add top-level entry ``names`` of ``run_dir`` to what its marker says a run wrote."""
    marker = read_marker(run_dir)
    new = [name for name in names if name not in marker["written"]]
    if new:
        marker["written"] += new
        write_marker(run_dir, marker)


def update_marker(run_dir, **fields) -> None:
    write_marker(run_dir, {**read_marker(run_dir), **fields})


def record_change(run_dir, step: int, changes: dict) -> None:
    """Record in the marker that ``changes`` (``{"train.lr": [old, new], ...}``) took effect at ``step``."""
    marker = read_marker(run_dir)
    update_marker(run_dir, changes=marker["changes"] + [{"step": step, "time": _now(), **changes}])


def check_overwrite(run_dir) -> None:
    """Raise ``RunDirError`` unless ``remove_run`` may delete ``run_dir``'s contents (it deletes nothing)."""
    run_dir = Path(run_dir)
    marker = read_marker(run_dir)
    strangers = _strangers(run_dir, marker)
    if strangers:
        raise RunDirError(f"refusing to overwrite {run_dir}: it holds files no run wrote "
                          f"({', '.join(strangers[:3])}); delete it yourself or choose another --run-dir")
    for sub in _owned_subruns(run_dir, marker):
        check_overwrite(sub)


def remove_run(run_dir) -> None:
    """Delete what a run wrote into ``run_dir`` (checked by ``check_overwrite`` first), marker last."""
    run_dir = Path(run_dir)
    check_overwrite(run_dir)
    marker = read_marker(run_dir)
    for name in marker["written"]:
        entry = run_dir / name
        if is_owned(entry):
            remove_run(entry)
            entry.rmdir()
        elif entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        elif entry.exists():
            entry.unlink()
    for leftover in run_dir.iterdir():  # temporary files of interrupted atomic writes
        if _ATOMIC_TMP.fullmatch(leftover.name) and leftover.is_file():
            leftover.unlink()
    (run_dir / MARKER).unlink()


def _owned_subruns(run_dir: Path, marker: dict) -> list[Path]:
    return [run_dir / name for name in marker["written"] if is_owned(run_dir / name)]


def _strangers(run_dir: Path, marker: dict) -> list[str]:
    """Paths under ``run_dir`` (relative) that no run wrote."""
    written = set(marker["written"])
    strangers = []
    for entry in sorted(run_dir.iterdir()):
        name = entry.name
        if name in (MARKER, LOCK) or _ATOMIC_TMP.fullmatch(name) and entry.is_file():
            continue
        if name not in written or entry.is_symlink():
            strangers.append(name)
        elif is_owned(entry):
            continue  # a run of its own (a demo's): checked by check_overwrite
        elif entry.is_dir():
            strangers += [f"{name}/{inner}" for inner in _strangers_in_dir(entry, name)]
    return strangers


def _strangers_in_dir(directory: Path, kind: str) -> list[str]:
    """Inside a directory a run writes: ``checkpoints`` (checkpoint directories) or ``member-k``."""
    strangers = []
    for entry in sorted(directory.iterdir()):
        if entry.is_symlink():
            strangers.append(entry.name)
        elif kind == "checkpoints" and entry.is_dir() and _CHECKPOINT_DIR.fullmatch(entry.name):
            strangers += [f"{entry.name}/{f.name}" for f in sorted(entry.iterdir()) if not f.is_file()
                          or f.is_symlink() or not (f.name in _CHECKPOINT_FILES or _ATOMIC_TMP.fullmatch(f.name))]
        elif _MEMBER_DIR.fullmatch(kind) and entry.name == "train_log.jsonl" and entry.is_file():
            continue
        elif _MEMBER_DIR.fullmatch(kind) and entry.name == "checkpoints" and entry.is_dir():
            strangers += [f"checkpoints/{inner}" for inner in _strangers_in_dir(entry, "checkpoints")]
        else:
            strangers.append(entry.name)
    return strangers


# One writer per run directory


@contextlib.contextmanager
def lock_run_dir(run_dir):
    """Hold ``run_dir/melora-run.lock`` for the body: ``RunDirError`` if a live process holds it.

    The lock file names its owner (pid and host) and is created whole, atomically (a hard link of a
    complete temporary file), so two processes cannot both take it. A lock whose process no longer
    runs on this host (killed, even by SIGKILL) is stale and taken over; one held on another host
    cannot be checked from here, and the message says so.
    """
    path = Path(run_dir) / LOCK
    mine = {"pid": os.getpid(), "host": socket.gethostname()}
    tmp = path.with_name(f".{LOCK}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(mine), encoding="utf-8")
    try:
        while True:
            try:
                os.link(tmp, path)
                break
            except FileExistsError:
                _take_over_if_stale(path, mine)
    finally:
        tmp.unlink(missing_ok=True)
    try:
        yield path
    finally:
        with contextlib.suppress(OSError, ValueError):
            if json.loads(path.read_text(encoding="utf-8")) == mine:
                path.unlink()


def check_unlocked(run_dir) -> None:
    """``RunDirError`` if a live process holds ``run_dir``'s lock (nothing is written)."""
    path = Path(run_dir) / LOCK
    if path.exists():
        owner = _lock_owner(path)
        if owner is None or _alive(owner):
            raise _in_use(path, owner)


def _take_over_if_stale(path: Path, mine: dict) -> None:
    owner = _lock_owner(path)
    if owner is None or _alive(owner):
        raise _in_use(path, owner)
    stale = path.with_name(f".{LOCK}.stale-{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):  # another process took it over first: try again
        os.rename(path, stale)
        stale.unlink()


def _lock_owner(path: Path) -> dict | None:
    """``{"pid", "host"}`` of the lock's owner, or None if the file cannot be read as one."""
    try:
        owner = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {"pid": -1, "host": socket.gethostname()}  # released meanwhile: stale, retry
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    ok = isinstance(owner, dict) and isinstance(owner.get("pid"), int) and isinstance(owner.get("host"), str)
    return owner if ok else None


def _alive(owner: dict) -> bool:
    """Whether the lock's process may still run (always True for another host: it cannot be checked)."""
    if owner["host"] != socket.gethostname():
        return True
    if owner["pid"] <= 0:
        return False
    try:
        os.kill(owner["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def _in_use(path: Path, owner: dict | None) -> RunDirError:
    who = f"process {owner['pid']} on {owner['host']}" if owner else "another process (unreadable lock)"
    return RunDirError(f"run directory {path.parent} is in use by {who}; wait for it to finish, or delete "
                       f"{path} if that process no longer runs")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
