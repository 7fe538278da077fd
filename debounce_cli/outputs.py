"""The output pipes of runs, watched through one epoll of their own.

Each run has two pipes (stdout and stderr) that the daemon reads as the command writes. Given
to the event loop one by one, each pipe costs an ``add_reader`` and a ``remove_reader``: a
selector key, a handle and a lookup each, about a sixth of the daemon's CPU for a run in a
burst of short commands (cProfile on a daemon starting 1,000 runs due at once). Here the
pipes are registered with an epoll instance of this module's, whose own descriptor is the one
the loop watches: adding or dropping a pipe is one ``epoll_ctl``, and one call of the loop
reads every pipe that is ready.

Level-triggered: a pipe still holding data after its callback is reported again at the next
turn, so a chatty run cannot starve the others (or the loop) within one turn.
"""

from __future__ import annotations

import asyncio
import select
from collections.abc import Callable

#: Ready pipes handled per turn of the loop, at most (the rest stay ready for the next).
PER_TURN = 256


class Pipes:
    """Pipes watched for reading on behalf of one event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.epoll = select.epoll()
        self.callbacks: dict[int, Callable[[int], None]] = {}
        self.watched = False  # the epoll's descriptor is in the loop (while pipes are here)

    def add(self, fd: int, callback: Callable[[int], None]) -> None:
        """Call ``callback(fd)`` whenever ``fd`` is readable (data, or its end)."""
        self.epoll.register(fd, select.EPOLLIN)
        self.callbacks[fd] = callback
        if not self.watched:
            self.loop.add_reader(self.epoll.fileno(), self._ready)
            self.watched = True

    def remove(self, fd: int) -> None:
        """Stop watching ``fd`` (before it is closed)."""
        if self.callbacks.pop(fd, None) is None:
            return
        try:
            self.epoll.unregister(fd)
        except OSError:
            pass  # closed already: the kernel dropped it with its last descriptor
        if not self.callbacks and self.watched:
            self.loop.remove_reader(self.epoll.fileno())
            self.watched = False

    def _ready(self) -> None:
        for fd, _events in self.epoll.poll(0, PER_TURN):
            callback = self.callbacks.get(fd)
            if callback is not None:
                callback(fd)


_pipes: dict[asyncio.AbstractEventLoop, Pipes] = {}


def pipes(loop: asyncio.AbstractEventLoop) -> Pipes:
    """The pipes watched on behalf of ``loop``."""
    found = _pipes.get(loop)
    if found is None:
        if len(_pipes) >= 8:  # loops of tests, closed long ago
            for old in [other for other in _pipes if other.is_closed()]:
                _pipes.pop(old).epoll.close()
        found = _pipes[loop] = Pipes(loop)
    return found
