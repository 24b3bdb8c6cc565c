"""Atomic file writes: a reader sees the old file or the whole new one, never a part."""
import contextlib
import os
import shutil
import tempfile
from pathlib import Path


def atomic_write_bytes(path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync it, then rename it over ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; a plain open() would respect the umask
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_directory(path):
    """Build a directory at ``path`` whole or not at all: yields a temporary sibling to fill, renamed
    to ``path`` when the block ends without error and deleted when it raises.

    ``path`` must not exist or be an empty directory (checked first, and again by the rename: a
    non-empty directory that appeared meanwhile is never replaced). Raises ``FileExistsError``.
    """
    path = Path(path)
    if path.exists() and not (path.is_dir() and not any(path.iterdir())):
        raise FileExistsError(f"{path} exists and is not an empty directory; choose a new output directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        yield tmp
        for entry in tmp.rglob("*"):
            if entry.is_file():
                with open(entry, "rb") as f:
                    os.fsync(f.fileno())
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 is for the private build, not the result
        try:
            os.rename(tmp, path)  # replaces an empty directory, fails on a non-empty one
        except OSError as e:
            raise FileExistsError(f"{path} appeared while it was being written ({e.strerror}); nothing replaced") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _fsync_dir(path.parent)
