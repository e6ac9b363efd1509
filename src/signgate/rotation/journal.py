"""The rotation journal: JSON lines, each appended whole and fsynced before the run goes on.

A record is one ``write`` of one line to a file opened with ``O_APPEND``, followed by fsync:
after a crash the file holds every record written before it, and at most a torn last line,
which is dropped on the next open (the step it described is then done again, harmlessly).
An exclusive ``flock`` held for the run refuses a second rotation on the same journal; the
kernel releases it when the process dies, however it dies.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from signgate.errors import UsageError


class Journal:
    """Use as ``with Journal(path) as journal``; :attr:`records` holds what was there."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.records: list[dict[str, Any]] = []
        self._fd: int | None = None

    def __enter__(self) -> Journal:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        except OSError as e:
            raise UsageError(f"{self.path}: cannot open the journal: {e.strerror or e}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            os.close(fd)
            raise UsageError(
                f"{self.path}: another rotation is running with this journal"
            ) from e
        self._fd = fd
        try:
            _sync_directory(self.path.parent)  # the journal's own entry is durable too
            self.records = self._read_and_repair(fd)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the lock
            self._fd = None

    def _read_and_repair(self, fd: int) -> list[dict[str, Any]]:
        with open(fd, "rb", closefd=False) as file:
            data = file.read()
        complete = data[: data.rfind(b"\n") + 1]
        if len(complete) != len(data):
            os.ftruncate(fd, len(complete))
            os.fsync(fd)
        records = []
        for number, line in enumerate(complete.splitlines(), 1):
            try:
                record = json.loads(line)
            except ValueError as e:
                raise UsageError(f"{self.path}:{number}: not a rotation journal") from e
            if not isinstance(record, dict):
                raise UsageError(f"{self.path}:{number}: not a rotation journal")
            records.append(record)
        return records

    def append(self, record: dict[str, Any]) -> None:
        """Write ``record`` durably; it is in the journal when this returns."""
        if self._fd is None:
            raise RuntimeError("the journal is closed")
        stamped = {**record, "time": round(time.time(), 3)}
        line = json.dumps(stamped, separators=(",", ":"), sort_keys=True).encode() + b"\n"
        written = os.write(self._fd, line)
        if written != len(line):
            raise OSError(f"{self.path}: short write to the journal")
        os.fsync(self._fd)
        self.records.append(stamped)


def _sync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
