"""The format of a run's output log: stdout and stderr chunks interleaved as they came.

Each record is one byte for the stream (1 or 2), four bytes of big-endian length, then the
bytes. Keeping both streams in one file keeps their order, so ``debounce logs`` replays a run
the way a waiter saw it. Stdlib only: the client reads logs too.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from typing import BinaryIO

_HEADER = struct.Struct(">BI")
#: Bytes before each record's chunk.
HEADER_SIZE = _HEADER.size


class LogWriter:
    """Append-only writer; after a write error (a full disk) it stops and says so once."""

    def __init__(self, path: str):
        self.path = path
        self.error: str | None = None
        self.size = 0  # bytes written: where the next record starts
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)

    def write(self, fd: int, data: bytes) -> int | None:
        """Append one record; return where it ends, or ``None`` once writing has failed."""
        if self.error is not None:
            return None
        record = _HEADER.pack(fd, len(data)) + data
        try:
            while record:  # a pipe chunk is at most 64 KiB: this loops only on a short write
                written = os.write(self.fd, record)
                record = record[written:]
                self.size += written
        except OSError as exc:
            self.error = exc.strerror or str(exc)
            return None
        return self.size

    def close(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass


def read_records(f: BinaryIO, limit: int) -> list[tuple[int, bytes, int]]:
    """Whole records from ``f``'s position, about ``limit`` bytes of them: (stream, chunk,
    offset after it). A record not yet wholly written is left for the next call."""
    out = []
    taken = 0
    while taken < limit:
        start = f.tell()
        header = f.read(_HEADER.size)
        if len(header) < _HEADER.size:
            f.seek(start)
            break
        fd, size = _HEADER.unpack(header)
        chunk = f.read(size)
        if len(chunk) < size:
            f.seek(start)
            break
        taken += size
        out.append((fd, chunk, f.tell()))
    return out


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
