"""Fleet runs executing on this host: handed to the daemon's own ``Runs`` as a ``RunSpec``
(the same spawn, output, stop path, TERM then KILL after the stop timeout, and ``--timeout``
as a local run), their output and end put into the key's stream in order (retried while the
store is down), and the lease guard that stops them when this host can no longer vouch for
them."""

from __future__ import annotations

import asyncio
import binascii
import sys
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from debounce_cli import states
from debounce_cli.daemon.fleet import state as fs
from debounce_cli.daemon.fleet.layout import StoreDown, event_id
from debounce_cli.daemon.fleet.link import RETRY, Link
from debounce_cli.daemon.jobs import Job, RunSpec
from debounce_cli.daemon.runs import Runs

#: Output queued for the store, at most; past it a run's output is dropped (and said so).
OUTBOX_LIMIT = 64 * 1024 * 1024
#: Why a run here was stopped when this host could not renew its lease: it is reported lost.
STOP_LEASE = "lease"


@dataclass(eq=False)
class LocalRun:
    """A fleet run executing on this host."""

    key: str
    running: fs.Running
    spec: RunSpec
    why: str | None = None  # states.STOP_*: why it was asked to stop (or STOP_LEASE)
    killed: bool = False  # SIGKILL sent (its lease ran out)
    refused: bool = False  # its fence failed at the spawn: it never started
    chunks: int = 0  # output chunks published (each event carries its number)


class _Publisher:
    """A fleet run's audience: its output goes into the key's stream (its waiters, on any
    host, follow that)."""

    def __init__(self, execution: Execution, key: str, run_id: int) -> None:
        self.execution, self.key, self.run_id = execution, key, run_id

    def started(self, log: str | None) -> None:
        pass  # the store learnt of it when it was claimed

    def output(self, fd: int, data: bytes, end: int | None) -> None:
        self.execution.publish_output(self.key, self.run_id, fd, data)


class Execution:
    """The runs executing here. ``runs`` makes what executes them (``daemon.runs.Runs``
    unless the tests give another); ``follow`` has the key's events read here (a stop or a
    signal may come from any host); ``give_back`` frees the job slot a run held; ``own``
    takes back our invocation when a claim was given back."""

    def __init__(self, link: Link, runs: Callable[[Execution], Any] | None,
                 follow: Callable[[str, bytes], None], give_back: Callable[[], None],
                 own: Callable[[str, int, float, tuple[int, int]], None]) -> None:
        self.link = link
        self.follow = follow
        self.give_back = give_back
        self.own = own
        self.runs: Runs = (runs(self) if runs is not None
                           else Runs(link.config, link.loop, None, "", None, events=self,
                                     clock=link.clock))
        self.local: dict[int, LocalRun] = {}
        self.reporting: set[int] = set()  # runs ended here whose end the store has not had
        self.outbox: deque[tuple[str, Any]] = deque()
        self.outbox_bytes = 0
        self.outbox_ready = asyncio.Event()

    def execute(self, key: str, running: fs.Running, asked_at: float, since: bytes) -> bool:
        """Start a run claimed here, in the job slot taken for it (its end gives it back).
        False when it does not start (the claim is given back)."""
        link = self.link
        job = Job(list(running.job["argv"]), running.job["cwd"],
                  {**running.job["env"], "DEBOUNCE_HOST": link.host})
        # --collect: every coalesced invocation's command line
        batch = [Job(list(argv), job.cwd, job.env) for argv in running.batch or ()]
        spec = RunSpec(running.run, key, job, running.options,
                       _Publisher(self, key, running.run), running.coalesced, batch)
        if link.clock.monotonic() - asked_at > link.lease / 2 or not link.lease_fresh():
            # The claim took long (a slow or paused store, or this host was frozen), or our
            # lease is stale: another host may be about to give this run up. It does not
            # start here; the claim is given back and the invocation is pending again.
            self.reporting.add(running.run)  # (not taken for a leftover of a restart)
            self.outbox.append(("unclaim", (key, running)))
            self.outbox_ready.set()
            return False
        local = self.local[running.run] = LocalRun(key, running, spec)

        def may_start() -> bool:
            """The fence at the spawn: asked immediately before the process is created."""
            ok = link.clock.monotonic() - asked_at <= link.lease / 2 and link.lease_fresh()
            local.refused = not ok
            return ok

        spec.may_start = may_start
        self.follow(key, since)  # for a stop or a signal from any host
        self.runs.start(spec)  # (Runs arms its --timeout)
        return True

    # ------------------------------------------------------------------ Runs' events
    def run_started(self, spec: RunSpec) -> None:
        pass  # the store learnt of it when it was claimed

    def run_timed_out(self, run_id: int) -> None:
        local = self.local.get(run_id)
        if local is not None and local.why is None:
            local.why = states.STOP_TIMEOUT  # (Runs is stopping it)

    def run_exited(self, run_id: int, code: int, outcome: str | None = None) -> None:
        local = self.local.pop(run_id, None)
        if local is None:
            return
        self.reporting.add(run_id)
        if local.refused:  # it never started: the claim is given back
            self.outbox.append(("unclaim", (local.key, local.running)))
            self.give_back()
            self.outbox_ready.set()
            return
        if outcome is None:
            # Stopped for the lease, a run is lost, unless its command succeeded all the
            # same (it had exited by itself as the guard's TERM went out): that is what ran.
            outcome = (states.EXITED if local.why == STOP_LEASE and code == 0
                       else states.LOST if local.why == STOP_LEASE
                       else states.OUTCOME_OF_STOP.get(local.why, states.EXITED))
        self.outbox.append(("finish", (local.key, local.running, code, outcome,
                                       self.link.store_now())))
        self.give_back()
        self.outbox_ready.set()

    def publish_output(self, key: str, run_id: int, fd: int, data: bytes) -> None:
        local = self.local.get(run_id)
        if self.outbox_bytes > OUTBOX_LIMIT or local is None:
            return
        self.outbox_bytes += len(data)
        local.chunks += 1
        event = {"t": "out", "run": run_id, "fd": fd, "n": local.chunks,
                 "data": binascii.b2a_base64(data, newline=False).decode()}
        self.outbox.append(("out", (key, event)))
        self.outbox_ready.set()

    # ------------------------------------------------------------------ stopping
    def stop(self, local: LocalRun, why: str) -> None:
        """Stop a run executing here through the runs' one stop path: TERM, then KILL after
        its stop timeout."""
        if local.why is not None:
            return
        local.why = why
        self.runs.stop(local.spec.id, why)

    def stop_all(self) -> None:
        for local in list(self.local.values()):
            self.stop(local, states.STOP_SHUTDOWN)

    def on_event(self, key: str, event: dict[str, Any]) -> None:
        """A stop or a signal for a run here, from any host, under the run's own token."""
        kind = event.get("t")
        if kind not in ("stop", "signal"):
            return
        local = self.local.get(event["run"])
        if local is not None and local.running.fence == event.get("fence"):
            if kind == "stop":
                self.stop(local, event["why"])
            else:
                self.runs.signal(local.spec.id, event["sig"])

    async def guard(self) -> None:
        """Safety first: a host that cannot renew its lease (cut off from the store, or the
        store paused) stops its own runs before any other host may take their keys over.
        Others need a lease of silence after our last heartbeat (the store's clock) and our
        run to be a lease old; we stop at half a lease after sending that heartbeat (ours),
        and kill what is left at three quarters: a quarter lease of margin without any
        synchronised clock. The runs so stopped are reported lost, which they are."""
        link = self.link
        while not link.closing:
            await asyncio.sleep(link.lease / 16)
            if not self.local:
                continue
            silent = link.clock.monotonic() - link.renewed
            if silent < link.lease / 2:
                continue
            for local in list(self.local.values()):
                if local.why != STOP_LEASE:
                    print(f"debounce: fleet run {local.spec.id} of {local.key!r}: stopped, "
                          f"this host could not renew its lease for {silent:.1f}s (the fleet "
                          "may run the key elsewhere)", file=sys.stderr, flush=True)
                    local.why = STOP_LEASE
                    # TERM now (unless another stop sent it); the lease's own KILL is below.
                    self.runs.stop(local.spec.id, STOP_LEASE)
                elif silent >= link.lease * 3 / 4 and not local.killed:
                    local.killed = True
                    self.runs.signal(local.spec.id, "KILL")

    # ------------------------------------------------------------------ into the store
    async def publish(self) -> None:
        """Output and ends of the runs here, into the store, in order; retried while it is
        down, so runs in flight report once it is back."""
        link = self.link
        while not link.closing:
            await self.outbox_ready.wait()
            self.outbox_ready.clear()
            while self.outbox:
                kind, item = self.outbox[0]
                try:
                    if kind == "out":
                        batch: list[tuple[str, fs.Event]] = []
                        for kind2, item2 in self.outbox:
                            if kind2 != "out" or len(batch) >= 500:
                                break
                            batch.append(item2)
                        await link.store.publish(batch)
                        for _ in batch:
                            _, (_, event) = self.outbox.popleft()
                            self.outbox_bytes -= len(event["data"]) * 3 // 4
                        continue
                    if kind == "unclaim":
                        key, running = item
                        back, latest, st = await link.store.update(
                            key, _unclaiming(running))
                        self.outbox.popleft()
                        self.reporting.discard(running.run)
                        if back and st.pending is not None and st.pending.host == link.host:
                            self.own(key, st.pending.slot, st.pending.due, event_id(latest))
                        continue
                    last, _, _ = await link.store.update(item[0], _finishing(*item[1:]),
                                                         history=link.config.keep_history)
                    self.outbox.popleft()
                    self.reporting.discard(item[1].run)
                    if last is not None:  # named again: a store restarted empty forgot it
                        link.spawn(link.store.name_run(item[1].run, item[0]))
                except StoreDown as exc:
                    link.say_down(exc)
                    await asyncio.sleep(RETRY)
            self.outbox_bytes = max(0, self.outbox_bytes) if self.outbox else 0
            link.changed()


def _unclaiming(run: fs.Running
                ) -> Callable[[fs.KeyState, float], tuple[bool, list[fs.Event]]]:
    """The step that gives back a claim whose run did not start here."""
    def step(st: fs.KeyState, now: float) -> tuple[bool, list[fs.Event]]:
        return fs.unclaim(st, run=run, now=now)
    return step


def _finishing(run: fs.Running, code: int | None, outcome: str, ended: float | None = None
               ) -> Callable[[fs.KeyState, float], tuple[fs.Last | None, list[fs.Event]]]:
    """The step that records the end of ``run`` (at ``ended``, the store's time then)."""
    def step(st: fs.KeyState, now: float) -> tuple[fs.Last | None, list[fs.Event]]:
        return fs.finish(st, run=run, exit_code=code, outcome=outcome, now=now, ended=ended)
    return step
