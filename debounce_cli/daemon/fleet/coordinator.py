"""One daemon's part in the fleet, put together from its rooms:

- ``link``: what they share (settings, the daemon's clock and loop, the store, tasks);
- ``claims``: this host's submissions and the claims of their runs, in its job slots;
- ``execution``: the runs executing here, their output and end into the store, the lease
  guard that stops them when this host cannot vouch for them;
- ``following``: the keys' events read and handed to this host's waiters (``wait``,
  ``logs`` too);
- ``liveness``: heartbeat, the scan for what silent hosts left, recovery of a store that
  lost data.

Each room gets what it needs through its constructor; this class wires them, starts their
loops, and answers the daemon's requests on fleet keys. Every decision about a key is the
rules' (``debounce_cli.rules``, through ``state``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from debounce_cli import protocol, states
from debounce_cli.clock import Clock
from debounce_cli.daemon.config import Config
from debounce_cli.daemon.fleet import messages
from debounce_cli.daemon.fleet import state as fs
from debounce_cli.daemon.fleet.claims import Claims
from debounce_cli.daemon.fleet.execution import Execution
from debounce_cli.daemon.fleet.following import Following
from debounce_cli.daemon.fleet.link import Link
from debounce_cli.daemon.fleet.liveness import Liveness
from debounce_cli.daemon.fleet.store import Store
from debounce_cli.daemon.jobs import Job
from debounce_cli.daemon.waiters import Submitter, Waiter
from debounce_cli.scheduler import Options, Scheduler


class Fleet:
    """This daemon in the fleet. ``slots`` is the local scheduler: its counter numbers our
    invocations, and fleet runs starting here take its job slots (``daemon --jobs``).

    Every time and timer comes from ``clock`` and ``loop`` (the daemon's), so the tests run a
    fleet on fake time. ``store`` is the Redis store unless another with the same steps is
    given (``memory.MemoryStore``, or a wrapper that times them), ``runs`` makes what
    executes runs (``daemon.runs.Runs`` unless given), ``apply`` carries out the local
    scheduler's effects (a job slot given back lets a local run start) and ``changed`` is the
    server's idle check."""

    def __init__(self, config: Config, clock: Clock, loop: asyncio.AbstractEventLoop,
                 slots: Scheduler, log_dir: str, *,
                 apply: Callable[[list[Any]], None] = lambda effects: None,
                 changed: Callable[[], None] = lambda: None,
                 store: Any = None,
                 runs: Callable[[Execution], Any] | None = None) -> None:
        assert config.store is not None
        self.link = Link(config, clock, loop,
                         store if store is not None else Store(config.store), changed)
        # The rooms call each other only through what they are given here; where two need
        # each other, the call goes through this object, which holds both.
        self.following = Following(self.link, log_dir, interested=self._interested,
                                   on_event=self._on_event)
        self.execution = Execution(self.link, runs, follow=self.following.follow,
                                   give_back=self._give_back, own=self._own)
        self.claims = Claims(self.link, slots, apply, self.following,
                             execute=self.execution.execute)
        self.liveness = Liveness(self.link, self.claims, self.execution, self.following)

    # ------------------------------------------------------------------ wiring
    def _interested(self, key: str) -> bool:
        return (self.claims.interested(key)
                or any(local.key == key for local in self.execution.local.values()))

    def _on_event(self, key: str, event: dict[str, Any], eid: tuple[int, int]) -> None:
        self.claims.on_event(key, event, eid)
        self.execution.on_event(key, event)

    def _give_back(self) -> None:
        self.claims.give_back()

    def _own(self, key: str, slot: int, due: float, since: tuple[int, int]) -> None:
        self.claims.own(key, slot, due, since)

    # ------------------------------------------------------------------ life
    @property
    def tasks(self) -> set[asyncio.Task[Any]]:
        return self.link.tasks

    def spawn(self, coro: Any) -> None:
        self.link.spawn(coro)

    def start(self) -> None:
        link = self.link
        link.spawn(link.forever("heartbeat", self.liveness.beat))
        link.spawn(link.forever("scan", self.liveness.scan))
        link.spawn(link.forever("publisher", self.execution.publish))
        link.spawn(link.forever("reader", self.following.read))
        link.spawn(link.forever("guard", self.execution.guard))

    def busy(self) -> bool:
        """Something here still needs this daemon: a waiter, a run, our pending invocation,
        a submission on its way, or output not yet in the store."""
        return bool(self.execution.local or self.execution.outbox or self.claims.busy()
                    or self.following.busy())

    def stop_runs(self) -> None:
        self.execution.stop_all()

    async def close(self) -> None:
        """After the runs have ended: report them (a few seconds at most), leave the fleet."""
        link, execution = self.link, self.execution
        await execution.runs.wait_all()
        deadline = link.loop.time() + 5.0
        while execution.outbox and link.loop.time() < deadline:
            execution.outbox_ready.set()
            await asyncio.sleep(0.05)
        link.closing = True
        self.claims.cancel_timers()
        for task in list(link.tasks):
            task.cancel()
        await link.store.leave(link.host)
        await link.store.close()

    # ------------------------------------------------------------------ requests
    def submit(self, key: str, options: Options, job: Job, waiter: Waiter | None,
               submitter: Submitter | None) -> tuple[str, int]:
        """A ``--fleet`` invocation; the submitter is answered once the store holds it.
        Returns the key it is filed under and its invocation id."""
        return self.claims.submit(key, options, job, waiter, submitter)

    def slot_freed(self) -> None:
        self.claims.slot_freed()

    async def wait(self, key: str, waiter: Waiter) -> protocol.Message | None:
        return await self.following.wait(key, waiter)

    async def wait_run(self, run_id: int, waiter: Waiter) -> protocol.Message | None:
        return await self.following.wait_run(run_id, waiter)

    async def wait_invocation(self, inv_id: int, waiter: Waiter) -> protocol.Message | None:
        """``wait --invocation N`` on a fleet invocation this daemon accepted."""
        return await self.following.wait_invocation(
            inv_id, self.claims.submitted.get(inv_id), waiter)

    async def covering(self, inv_id: int) -> protocol.Message:
        """``history --invocation N`` on a fleet invocation: the run that stood for it, or
        one line that says where it stands."""
        kind, key, _st, _latest, row = await self.following.covering(
            inv_id, self.claims.submitted.get(inv_id))
        if kind == "finished":
            assert row is not None
            return protocol.HistoryReply(runs=[protocol.RunRecord.from_dict(row, "history")])
        shown = protocol.shown(key)
        if kind == "cancelled":
            return protocol.Error(message=f"invocation {inv_id} was cancelled before it ran "
                                  f"(fleet key {shown})", code=states.NOT_FOUND)
        if kind:
            what = "it is pending" if kind == "pending" else "its run is executing"
            return protocol.Error(
                message=f"invocation {inv_id} has not finished: {what} (fleet key {shown}); "
                f"debounce wait --invocation {inv_id} waits for it", code=states.NOT_FOUND)
        return protocol.Error(message=f"no invocation {inv_id} in this daemon's history or "
                              "the fleet's (ids are per daemon)", code=states.NOT_FOUND)

    async def logs(self, key: str | None, run_id: int | None = None) -> protocol.Message:
        return await self.following.logs(key, run_id)

    def detach(self, waiter: Any) -> None:
        self.following.detach(waiter)

    def keys_here(self) -> set[str]:
        """The fleet keys this host has a pending invocation of, or a run executing."""
        return set(self.claims.mine) | {local.key for local in self.execution.local.values()}

    async def status(self) -> list[protocol.KeyStatus]:
        store = self.link.store
        tags = await store.indexed()
        now = await store.now()
        rows = [messages.key_status(st, now) for st in await store.states(tags)]
        rows.sort(key=lambda row: row.key)
        return rows

    async def history(self, key: str | None, limit: int) -> list[protocol.RunRecord]:
        rows = await self.link.store.history(key, limit)
        out = []
        for row in rows:
            try:
                out.append(protocol.RunRecord.from_dict(row, "history"))
            except protocol.ProtocolError:
                continue  # a row of another version: left out, not fatal
        return [r for r in out if isinstance(r, protocol.RunRecord)]

    async def flush(self, key: str) -> bool:
        found, _, _ = await self.link.store.update(key, lambda st, now: fs.flush(st, now=now))
        return found

    async def cancel(self, key: str) -> bool:
        found, _, _ = await self.link.store.update(key, lambda st, now: fs.cancel(st))
        return found

    async def kill(self, key: str | None, signal: str | None, run_id: int | None = None
                   ) -> fs.Running | None:
        """Stop (or signal) what runs for a fleet key, or fleet run ``run_id``."""
        store = self.link.store
        if key is None:
            assert run_id is not None
            key = await store.key_of_run(run_id)
            if key is None:
                return None
        running, _, _ = await store.update(
            key, lambda st, now: fs.kill(st, signal=signal, run=run_id))
        return running
