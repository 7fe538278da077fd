"""The format of a run's output log: stdout and stderr chunks interleaved as they came.

Each record is one byte for the stream (1 or 2), four bytes of big-endian length, then the
bytes. Keeping both streams in one file keeps their order, so ``debounce logs`` replays a run
the way a waiter saw it. Stdlib only: the client reads logs too.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator

_HEADER = struct.Struct(">BI")


class LogWriter:
    """Append-only writer; after a write error (a full disk) it stops and says so once."""

    def __init__(self, path: str):
        self.path = path
        self.error: str | None = None
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)

    def write(self, fd: int, data: bytes) -> None:
        if self.error is not None:
            return
        try:
            os.write(self.fd, _HEADER.pack(fd, len(data)) + data)
        except OSError as exc:
            self.error = exc.strerror or str(exc)

    def close(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass


def read_log(path: str) -> Iterator[tuple[int, bytes]]:
    """The (stream, chunk) records of a log, read as they are needed; a record cut short (the
    run is still writing it, or a crash) ends the log. Opening happens at once, so a missing
    log raises OSError here rather than at the first record."""
    f = open(path, "rb")  # noqa: SIM115 - closed by the generator

    def records() -> Iterator[tuple[int, bytes]]:
        with f:
            while True:
                header = f.read(_HEADER.size)
                if len(header) < _HEADER.size:
                    return
                fd, size = _HEADER.unpack(header)
                chunk = f.read(size)
                if len(chunk) < size:
                    return
                yield fd, chunk

    return records()
