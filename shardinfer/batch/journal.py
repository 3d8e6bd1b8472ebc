"""The job's output and errors files: append-only JSON lines, read back to resume.

A line is written whole, in one write, once its row is done, and flushed at once: a process
killed with SIGKILL leaves every line it wrote in the file (the OS holds them), plus at most
one torn last line. Resuming reads the file, keeps the complete lines and cuts the torn tail,
so that row runs again. fsync every second (and at the end) bounds what a power loss takes.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

FSYNC_SECONDS = 1.0


class CorruptOutput(ValueError):
    """A line before the last one is not a complete record: not ours to repair silently."""


def recover(path: Path, key_of: Callable[[dict], Any]) -> set:
    """The keys of the complete lines of an existing file (none if it does not exist); a torn
    last line (no newline, or not JSON) is cut off."""
    keys: set = set()
    if not path.exists():
        return keys
    good = 0  # bytes of complete lines so far
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            record = _parse(raw)
            if record is None:
                if f.read(1):  # more follows: damage in the middle
                    raise CorruptOutput(
                        f"{path}: line {number} is not a complete JSON record and lines follow "
                        "it; this file was not written by a batch job, or was edited. Move it "
                        "away to start over."
                    )
                break
            keys.add(key_of(record))
            good += len(raw)
    if good != path.stat().st_size:
        with open(path, "r+b") as f:
            f.truncate(good)
    return keys


def _parse(raw: bytes) -> dict | None:
    if not raw.endswith(b"\n"):
        return None
    try:
        record = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) else None


class LineWriter:
    """Appends JSON lines to a file, each in one write and flushed."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        # Unbuffered: each write goes to the OS at once. Closed by close().
        self._file = open(path, "ab", buffering=0)  # noqa: SIM115
        self._size = os.fstat(self._file.fileno()).st_size
        self._synced = time.monotonic()

    def write(self, record: dict) -> None:
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode()
        view, size = memoryview(line), self._size
        try:
            while view:  # a regular file takes it in one write; loop in case it does not
                view = view[self._file.write(view) :]
        except OSError:
            # A full disk can take part of a line: cut it, so that a line written later (by
            # another replica's thread) cannot follow a torn one into the middle of the file.
            with contextlib.suppress(OSError):
                os.ftruncate(self._file.fileno(), size)
            raise
        self._size = size + len(line)
        if time.monotonic() - self._synced > FSYNC_SECONDS:
            self.sync()

    def sync(self) -> None:
        os.fsync(self._file.fileno())
        self._synced = time.monotonic()

    def close(self) -> None:
        if not self._file.closed:
            try:
                self.sync()
            finally:
                self._file.close()
