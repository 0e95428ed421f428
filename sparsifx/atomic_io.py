"""``atomic_write(path, write_fn, check_fn=None)``: a file appears whole and verified, or not at all.

``write_fn(tmp)`` writes a temporary file next to ``path`` (same directory, so the final rename stays on one
file system); ``check_fn(tmp)``, if given, verifies it; the file is fsynced and renamed over ``path`` with
``os.replace``. Readers of ``path`` see the old file or the new one, never a partial one. If anything raises,
``KeyboardInterrupt`` included, the temporary file is removed, ``path`` is left as it was and the exception
propagates. A directory that is missing, not a directory or not writable raises ``ArtefactError``.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path
from typing import Callable

from .errors import ArtefactError


def _why(exc: OSError, directory: Path) -> str:
    if isinstance(exc, FileNotFoundError):
        return f"directory {directory} does not exist"
    if isinstance(exc, NotADirectoryError):
        return f"{directory} is not a directory"
    if isinstance(exc, PermissionError):
        return f"directory {directory} is not writable"
    return f"{type(exc).__name__}: {exc.strerror or exc}"


def _mode(path: Path) -> int:
    """The existing file's permissions, else what ``open()`` would give a new file: 0o666 less the umask
    (read from /proc, since ``os.umask`` can only be read by setting it, which races with other threads)."""
    with contextlib.suppress(OSError):
        return stat.S_IMODE(path.stat().st_mode)
    umask = 0o022
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/self/status") as f:
            umask = int(next(line for line in f if line.startswith("Umask:")).split()[1], 8)
    return 0o666 & ~umask


def atomic_write(
    path: str | os.PathLike, write_fn: Callable[[Path], object], check_fn: Callable[[Path], object] | None = None
) -> Path:
    """Write ``path`` through a verified temporary file (see the module docstring); returns ``path``."""
    path = Path(path)
    directory = path.parent
    tmp: Path | None = None
    try:
        try:
            fd, name = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
        except OSError as exc:
            raise ArtefactError(f"cannot write {path}: {_why(exc, directory)}") from exc
        tmp = Path(name)  # inside the try: an interrupt right after mkstemp still removes the file
        os.close(fd)
        write_fn(tmp)
        if check_fn is not None:
            check_fn(tmp)
        os.chmod(tmp, _mode(path))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        try:
            os.replace(tmp, path)
        except OSError as exc:
            raise ArtefactError(f"cannot write {path}: {_why(exc, directory)}") from exc
    except BaseException:
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink()
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable (best effort: not every OS allows it)
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return path
