"""Reading sockets without a fresh 256 KiB buffer for every read.

An ``asyncio.Protocol`` is handed its data by a ``recv(256 KiB)`` that allocates 256 KiB and
then shrinks the result to what came. That size is past glibc's threshold for ``mmap``, so
unless the heap happens to have that much free at its top, each read costs an ``mmap``, an
``mremap`` and a ``munmap``, and page faults: about 12 µs of system time (strace on a daemon
under ``python -m bench --only submit``: three such calls for every request), several times
what the request itself costs. A :class:`SharedReader` is a buffered protocol instead: the
transport reads into one buffer that every reader in the process shares (the loop runs one
callback at a time, and each read is handed on before the next begins), and
:meth:`SharedReader.data_received` gets the bytes as before.
"""

from __future__ import annotations

import asyncio

#: As much as asyncio's own protocols are offered per read.
SIZE = 256 * 1024

_buffer: memoryview | None = None


def _shared() -> memoryview:
    global _buffer
    if _buffer is None:
        _buffer = memoryview(bytearray(SIZE))
    return _buffer


class SharedReader(asyncio.BufferedProtocol):
    """A protocol whose reads go through the shared buffer; subclasses define
    :meth:`data_received` as for ``asyncio.Protocol``."""

    def get_buffer(self, sizehint: int) -> memoryview:
        return _shared()

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(_shared()[:nbytes].tobytes())

    def data_received(self, data: bytes) -> None:
        raise NotImplementedError
