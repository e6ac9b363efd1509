"""Writing files so that a reader sees either the old content or the new, never a torn file."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def write_file_atomically(path: Path, data: bytes, *, mode: int, overwrite: bool) -> None:
    """Write ``data`` to ``path`` with permission bits ``mode`` (umask not applied).

    The bytes go to a temporary file in the same directory, are fsynced, and the file is then
    moved into place: with ``os.replace`` when ``overwrite``, otherwise with ``os.link``, which
    fails if ``path`` appeared meanwhile. Nothing is left behind on failure.

    Raises ``FileExistsError`` when ``path`` exists and not ``overwrite``, and other ``OSError``
    for I/O failures; callers turn these into their own :class:`signgate.errors.Error`.
    """
    directory = path.parent
    fd, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    temp_path = Path(temp_name)
    try:
        with os.fdopen(fd, "wb") as temp_file:
            os.fchmod(temp_file.fileno(), mode)
            temp_file.write(data)
            temp_file.flush()
            os.fsync(temp_file.fileno())
        if overwrite:
            os.replace(temp_path, path)
        else:
            os.link(temp_path, path)
            temp_path.unlink()
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            temp_path.unlink()
        raise
    _fsync_directory(directory)


def _fsync_directory(directory: Path) -> None:
    """Make the new directory entry durable too, not only the file's bytes."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
