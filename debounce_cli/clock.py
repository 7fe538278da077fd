"""The daemon's one source of time, injected so that everything above the scheduler can be
tested with a clock that moves only when the test moves it (trio's ``MockClock`` is the model).

``monotonic()`` is the time base of deadlines and of the event loop's timers (asyncio's loop
time is ``time.monotonic()``); ``wall()`` is for the timestamps people and the journal see.
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def monotonic(self) -> float: ...

    def wall(self) -> float: ...


class SystemClock:
    """The real clocks."""

    monotonic = staticmethod(time.monotonic)
    wall = staticmethod(time.time)


class SkewedClock:
    """The real clocks, the wall clock off by ``skew`` seconds: a test stands for a host whose
    clock is wrong (``debounce daemon --clock-skew``). The monotonic clock has no meaning
    across hosts, so it stays the event loop's."""

    def __init__(self, skew: float) -> None:
        self.skew = skew

    monotonic = staticmethod(time.monotonic)

    def wall(self) -> float:
        return time.time() + self.skew


class FakeClock:
    """A clock that stands still until :meth:`advance` or :meth:`set` moves it.

    Wall time is monotonic time plus a fixed offset, so the two never disagree.
    """

    def __init__(self, now: float = 1000.0, wall_offset: float = 1_800_000_000.0) -> None:
        self.now = now
        self.wall_offset = wall_offset

    def monotonic(self) -> float:
        return self.now

    def wall(self) -> float:
        return self.now + self.wall_offset

    def set(self, when: float) -> None:
        if when < self.now:
            raise ValueError(f"the clock cannot go back from {self.now} to {when}")
        self.now = when

    def advance(self, seconds: float) -> None:
        self.set(self.now + seconds)
