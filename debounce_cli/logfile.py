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
    """The (stream, chunk) records of a log; a record cut short by a crash ends the log."""
    with open(path, "rb") as f:
        data = f.read()
    pos = 0
    while pos + _HEADER.size <= len(data):
        fd, size = _HEADER.unpack_from(data, pos)
        pos += _HEADER.size
        chunk = data[pos : pos + size]
        if len(chunk) < size:
            return
        pos += size
        yield fd, chunk
