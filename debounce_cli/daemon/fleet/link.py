"""What every room of the fleet shares: this host's settings, the daemon's clock and loop, the
store, the tasks it runs, and the store's clock as this host reckons it.

Nothing here decides anything about a key; the rooms (``claims``, ``execution``,
``following``, ``liveness``) each get this link through their constructor, the way uvicorn
hands each connection its server state.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from typing import Any

from debounce_cli.clock import Clock
from debounce_cli.daemon.config import Config
from debounce_cli.daemon.fleet.layout import StoreDown
from debounce_cli.daemon.fleet.store import Store

#: Seconds between attempts while the store is down.
RETRY = 0.5


class Link:
    """This daemon's link to the fleet. ``store`` is the Redis store, or one with the same
    steps (``memory.MemoryStore``, or a wrapper that times them); ``changed`` is the server's
    idle check, called whenever something here may have finished."""

    def __init__(self, config: Config, clock: Clock, loop: asyncio.AbstractEventLoop,
                 store: Store, changed: Callable[[], None]) -> None:
        self.config = config
        self.clock = clock
        self.loop = loop
        self.store = store
        self.changed = changed
        self.host = config.host_id
        self.lease = config.lease
        self.offset: float | None = None  # the store's clock minus our monotonic clock
        self.down_since: float | None = None
        #: Our monotonic time when the last heartbeat the store took was sent: the store
        #: saw us alive no earlier than this, so nobody takes over what runs here before a
        #: lease after it (see ``execution.Execution.guard``).
        self.renewed = float("-inf")
        self.tasks: set[asyncio.Task[Any]] = set()
        self.closing = False

    # ------------------------------------------------------------------ tasks
    def spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            print(f"debounce: fleet: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        self.changed()

    async def forever(self, name: str, loop: Callable[[], Any]) -> None:
        """Run one of the fleet's loops for the daemon's life: an exception it did not
        expect is said once and the loop starts again (a dead heartbeat would get this
        host's runs taken for lost; a dead reader would leave every waiter hanging)."""
        while not self.closing:
            try:
                await loop()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the loop must go on
                import traceback

                print(f"debounce: fleet {name}: {type(exc).__name__}: {exc}", file=sys.stderr,
                      flush=True)
                traceback.print_exc()
                await asyncio.sleep(RETRY)

    # ------------------------------------------------------------------ time
    def store_now(self) -> float:
        """The store's clock, as our monotonic clock and the last measured offset put it."""
        if self.offset is None:
            return self.clock.wall()
        return self.clock.monotonic() + self.offset

    def measured(self, store_now: float) -> None:
        self.offset = store_now - self.clock.monotonic()

    def lease_fresh(self) -> bool:
        """Whether this host may start a run: the store took a heartbeat of ours less than
        half a lease ago."""
        return self.clock.monotonic() - self.renewed < self.lease / 2

    def say_down(self, exc: StoreDown) -> None:
        now = self.clock.monotonic()
        if self.down_since is None or now - self.down_since > 10:
            print(f"debounce: {exc}; fleet keys wait for it", file=sys.stderr, flush=True)
            self.down_since = now
