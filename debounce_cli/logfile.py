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
#: The stream of debounce's own note where a log stops early (not the run's output): readers
#: show it on stderr; a client catching up from the log takes it as the reason, not as output.
NOTE = 3
#: Free space a log leaves on its disk, at most (and at most a sixteenth of the disk): the
#: journal beside it must still be able to record the run and what comes after.
RESERVE = 1024 * 1024
#: Bytes written between two looks at the disk's free space.
CHECK_EVERY = 256 * 1024


def make_empty(path: str) -> None:
    """The log of a finished run that wrote nothing (no file was made for it): an empty file,
    for a reader about to open it. Nothing is done when it exists, or cannot be made (the
    reader then says why it cannot read it)."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600))
    except OSError:
        pass


class LogWriter:
    """Append-only writer; after a write error (a full disk) it stops and says so once.

    It also stops before the disk is full, leaving :data:`RESERVE` free so the journal can
    still commit. Where it stops it appends a :data:`NOTE` record saying why (best effort), so
    ``debounce logs`` and a client catching up from the log learn that the log is cut short.
    """

    def __init__(self, path: str, lazy: bool = False):
        self.path = path
        self.error: str | None = None
        self.size = 0  # bytes written: where the next record starts
        self.fd = -1
        self.closed = False
        self.made = False  # the file exists, or could not be made: nothing will make it now
        self.next_check = 0
        self.reserve: int | None = None
        if not lazy:
            self.fd = self._open()

    def _open(self) -> int:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        self.made = True
        return fd

    def make(self) -> bool:
        """Create the file of a ``lazy`` log now, if it is not there yet; False when it cannot
        be (the log then keeps nothing, and ``error`` says why).

        A lazy log is made at its first write, or when a reader needs it: creating a file
        costs a run's start about 0.1 ms of CPU and more of waiting on the file system,
        which a burst of runs pays before its later commands start (``daemon.runs``).
        """
        if self.made:
            return self.error is None
        try:
            self.fd = self._open()
        except OSError as exc:
            self.made = True
            self.error = f"cannot create it ({exc.strerror or exc})"
            return False
        if self.closed:  # (made after its writer was done: no descriptor is kept open)
            self.close()
        return True

    def write(self, fd: int, data: bytes) -> int | None:
        """Append one record; return where it ends, or ``None`` once writing has failed."""
        if self.fd < 0 and not self.make():
            return None
        if self.error is not None:
            return None
        record = _HEADER.pack(fd, len(data)) + data
        if self.size + len(record) > self.next_check and not self._room_for(len(record)):
            return None
        start = self.size
        try:
            while record:  # a pipe chunk is at most 64 KiB: this loops only on a short write
                written = os.write(self.fd, record)
                record = record[written:]
                self.size += written
        except OSError as exc:
            # A record cut short would garble what follows it: take it back first.
            try:
                os.ftruncate(self.fd, start)
                self.size = start
            except OSError:
                pass
            self._stop(f"cannot write to the disk holding it ({exc.strerror or exc})")
            return None
        return self.size

    def _room_for(self, size: int) -> bool:
        """Whether the disk keeps its reserve after ``size`` more bytes; stops the log if not.
        Looked at every CHECK_EVERY bytes."""
        try:
            st = os.fstatvfs(self.fd)
        except OSError:
            self.next_check = self.size + CHECK_EVERY
            return True
        if self.reserve is None:
            self.reserve = min(RESERVE, st.f_blocks * st.f_frsize // 16)
        free = st.f_bavail * st.f_frsize
        if free - size < self.reserve + CHECK_EVERY:
            if free - size < self.reserve:
                self._stop(f"the disk holding it is nearly full ({free // 1024} KiB free)")
                return False
            self.next_check = self.size  # close to the reserve: look at every write
        else:
            self.next_check = self.size + CHECK_EVERY
        return True

    def _stop(self, why: str) -> None:
        self.error = why
        note = f"debounce: the log of this run stops here: {why}; later output was not kept\n"
        data = note.encode("utf-8", "backslashreplace")
        try:
            os.write(self.fd, _HEADER.pack(NOTE, len(data)) + data)
        except OSError:
            pass

    def close(self) -> None:
        self.closed = True
        if self.fd < 0:
            return
        try:
            os.close(self.fd)
        except OSError:
            pass
        self.fd = -1


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
