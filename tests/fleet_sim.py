"""A fleet on fake time: several hosts' ``Fleet`` objects on one event loop whose clock jumps
to the next timer whenever nothing is ready, a store in memory, and runs that take the time
their command says without a process.

The loop is trio's ``MockClock`` with autojump, made for asyncio: its selector never sleeps;
when the loop would wait ``t`` seconds for its next timer, the clock moves ``t`` at once. Every
time the fleet reads comes from the loop (``Fleet`` takes the daemon's clock and loop), so a
lease of 10 s passes in microseconds and every time in a test is exact.
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Callable, Coroutine
from typing import Any

from debounce_cli import protocol
from debounce_cli.daemon.config import Config
from debounce_cli.daemon.fleet.coordinator import Fleet
from debounce_cli.daemon.fleet.execution import Execution
from debounce_cli.daemon.fleet.memory import Memory, MemoryStore
from debounce_cli.daemon.jobs import Job
from debounce_cli.rules import Options
from debounce_cli.scheduler import Run, Scheduler

EPOCH = 1_800_000_000.0  # the store's clock, in seconds since 1970, at loop time 0


class _JumpingSelector(selectors.DefaultSelector):
    """Never blocks: waiting ``timeout`` seconds moves the loop's clock by that much."""

    loop: VirtualLoop

    def select(self, timeout: float | None = None) -> list[Any]:
        ready = super().select(0)
        if ready:
            return ready
        if timeout is None:
            raise RuntimeError("the fleet on fake time has nothing left to wait for")
        self.loop.now += timeout
        return []


class VirtualLoop(asyncio.SelectorEventLoop):
    def __init__(self) -> None:
        selector = _JumpingSelector()
        self.now = 0.0
        super().__init__(selector)
        selector.loop = self

    def time(self) -> float:
        return self.now


class LoopClock:
    """The daemon's clock as the loop keeps it (``wall`` off by ``skew``: a wrong clock)."""

    def __init__(self, loop: VirtualLoop, skew: float = 0.0) -> None:
        self.loop, self.skew = loop, skew

    def monotonic(self) -> float:
        return self.loop.now

    def wall(self) -> float:
        return EPOCH + self.loop.now + self.skew


class FakeRuns:
    """Runs without processes: ``sleep N`` (the command's last word) lasts N seconds and
    exits 0 (``exit N`` as the first word: exits N at once). TERM or KILL ends it at once,
    128+N; a run whose host is frozen or dead never ends by itself."""

    def __init__(self, execution: Execution, host: SimHost) -> None:
        self.execution, self.host = execution, host
        self.timers: dict[int, asyncio.TimerHandle] = {}
        self.started: list[tuple[float, int, str]] = []  # (loop time, run id, key)
        self.ended: list[tuple[float, int, int]] = []  # (loop time, run id, exit status)
        self.refused: list[int] = []  # runs whose fence failed at the spawn
        self.done = asyncio.Event()
        self.done.set()

    def start(self, run: Run) -> None:
        """Its process is created ``host.spawn_delay`` later (a frozen host waits to thaw),
        after asking the run's fence (``run.may_start``), as ``daemon.runs`` does."""
        self.done.clear()
        self.timers[run.id] = self.host.loop.call_later(self.host.spawn_delay, self._spawn, run)

    def _spawn(self, run: Run) -> None:
        if self.host.dead:
            return
        if self.host.frozen:
            self.timers[run.id] = self.host.loop.call_later(0.01, self._spawn, run)
            return
        if run.may_start is not None and not run.may_start():
            self.timers.pop(run.id, None)
            self.refused.append(run.id)
            self.execution.run_exited(run.id, 126)
            return
        job = run.invocation.payload
        assert isinstance(job, Job)
        self.started.append((self.host.loop.now, run.id, run.key))
        local = self.execution.local.get(run.id)
        if local is not None:
            self.host.sim.slots_started.append((run.key, local.running.slot))
        self.host.sim.log.append(("start", self.host.loop.now, self.host.name, run.key, run.id))
        seconds, code = 0.0, 0
        if job.argv[0] == "exit":
            code = int(job.argv[1])
        else:
            seconds = float(job.argv[-1])
        self.timers[run.id] = self.host.loop.call_later(seconds, self._end, run.id, code)

    def _end(self, run_id: int, code: int) -> None:
        """The command exits; a frozen daemon hears of it when it thaws (its process is not
        frozen with it: SIGSTOP stops the daemon only); a dead one never does."""
        if self.host.dead:
            return
        if run_id in self.timers:
            self.timers.pop(run_id)
            self.ended.append((self.host.loop.now, run_id, code))
            self.host.sim.log.append(("end", self.host.loop.now, self.host.name, "", run_id))
        if self.host.frozen:
            self.host.loop.call_later(0.01, self._end, run_id, code)
            return
        if not self.timers:
            self.done.set()
        self.execution.run_exited(run_id, code)

    def die(self) -> None:
        """The daemon was killed: its runs die with it (the parent-death signal)."""
        for run_id, timer in list(self.timers.items()):
            timer.cancel()
            if any(r == run_id for _, r, _ in self.started):
                self.ended.append((self.host.loop.now, run_id, 137))
                self.host.sim.log.append(("end", self.host.loop.now, self.host.name, "",
                                          run_id))
        self.timers.clear()

    def signal(self, run_id: int, sig: str) -> None:
        timer = self.timers.get(run_id)
        if timer is not None and sig in ("TERM", "KILL") and any(
                r == run_id for _, r, _ in self.started):
            timer.cancel()
            self._end(run_id, 143 if sig == "TERM" else 137)

    async def wait_all(self) -> None:
        await self.done.wait()


class Caller:
    """A waiting client: records its answer and what it was told."""

    def __init__(self) -> None:
        self.answer: protocol.Message | None = None
        self.result: protocol.Message | None = None
        self.started: list[int] = []
        self.output: list[bytes] = []
        self.progress: list[str] = []  # the states of the Pending messages it was sent

    # Submitter
    def answered(self, msg: protocol.Message) -> None:
        self.answer = msg

    # Waiter
    def raw(self, line: bytes) -> None:
        msg = protocol.decode(line, protocol.REPLIES, protocol.MAX_REPLY)
        if isinstance(msg, protocol.Pending):
            self.progress.append(msg.state)

    def follows(self, run_id: int) -> bool:
        return run_id in self.started

    def start(self, run_id: int, line: bytes, log: str | None) -> None:
        self.started.append(run_id)

    def output(self, fd: int, data: bytes, line: bytes, end: int | None) -> None:
        self.output.append(data)

    def replay(self, so_far: Any) -> None:
        pass

    def finish(self, msg: protocol.Message) -> None:
        self.result = msg

    @property
    def outcome(self) -> tuple[Any, ...] | None:
        """("finished", exit code, outcome) or ("cancelled",), once told."""
        msg = self.result
        if isinstance(msg, protocol.Finished):
            return ("finished", msg.exit_code, msg.outcome)
        if isinstance(msg, protocol.Cancelled):
            return ("cancelled",)
        return None


class SimHost:
    def __init__(self, sim: Sim, name: str, jobs: int | None = None, skew: float = 0.0) -> None:
        self.sim, self.name, self.loop = sim, name, sim.loop
        self.frozen = False
        self.dead = False
        self.spawn_delay = 0.0  # between the start of a run and its process being created
        self.store = MemoryStore(sim.memory, name=f"memory://{name}")
        config = Config(socket=f"/nonexistent/{name}.sock", store="memory://", host_id=name,
                        lease=sim.lease, jobs=jobs)
        self.clock = LoopClock(sim.loop, skew)
        self.slots = Scheduler(self.clock.monotonic, wall=self.clock.wall, jobs=jobs)
        self.runs: FakeRuns | None = None

        def make_runs(execution: Execution) -> FakeRuns:
            self.runs = FakeRuns(execution, self)
            return self.runs

        self.fleet = Fleet(config, self.clock, sim.loop, self.slots, "", store=self.store,
                           runs=make_runs)
        self.fleet.start()

    def submit(self, key: str, seconds: float, *, delay: float = 1.0, **options: Any
               ) -> Caller:
        """``debounce run --fleet --key KEY --delay D -- sleep SECONDS`` here, waiting."""
        caller = Caller()
        opts = Options(delay=delay, fleet=True, **options)
        job = Job(["sleep", repr(seconds)], "/", {})
        self.fleet.submit(key, opts, job, caller, caller)
        return caller

    def freeze(self) -> None:
        """SIGSTOP: nothing of this host reaches the store, and its runs' ends wait."""
        self.frozen = True
        self.store.pause()

    def thaw(self) -> None:
        self.frozen = False
        self.store.resume()

    def kill9(self) -> None:
        """kill -9: the host's tasks stop where they are; its runs die with it unheard."""
        self.dead = True
        if self.runs is not None:
            self.runs.die()
        self.store.pause()  # nothing more from it reaches the store
        self.fleet.link.closing = True
        for task in list(self.fleet.tasks):
            task.cancel()
        self.fleet.tasks.clear()  # (the loop finishes them off; a dead host awaits nothing)
        self.fleet.claims.cancel_timers()


class Sim:
    """Hosts on one fake-time loop and one store in memory."""

    def __init__(self, lease: float = 10.0) -> None:
        self.loop = VirtualLoop()
        asyncio.set_event_loop(self.loop)
        self.lease = lease
        self.memory = Memory(clock=lambda: EPOCH + self.loop.now)
        self.hosts: dict[str, SimHost] = {}
        self.log: list[tuple[str, float, str, str, int]] = []
        self.slots_started: list[tuple[str, int]] = []  # (key, slot) of every run started

    def host(self, name: str, **kw: Any) -> SimHost:
        self.hosts[name] = SimHost(self, name, **kw)
        return self.hosts[name]

    def run_for(self, seconds: float) -> None:
        """Let ``seconds`` of fake time pass."""
        self.loop.run_until_complete(asyncio.sleep(seconds))

    def run_until(self, predicate: Callable[[], object], limit: float = 600.0) -> float:
        """Let fake time pass until ``predicate()``; returns the loop time then."""
        async def wait() -> None:
            while not predicate():
                if self.loop.now > limit:
                    raise AssertionError(f"not met within {limit} s of fake time")
                await asyncio.sleep(0.001)
        self.loop.run_until_complete(wait())
        return self.loop.now

    def do(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return self.loop.run_until_complete(coro)

    def do_wait(self, host: SimHost, key: str) -> Caller:
        """``debounce wait KEY`` on ``host``: a caller filed on what the key has."""
        caller = Caller()
        answer = self.do(host.fleet.wait(key, caller))
        if answer is not None:
            caller.finish(answer)
        return caller

    def close(self) -> None:
        tasks = []
        for host in self.hosts.values():
            host.fleet.link.closing = True
            tasks.extend(host.fleet.tasks)
            for task in host.fleet.tasks:
                task.cancel()
        for host in self.hosts.values():
            host.store.resume()
        self.loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        self.loop.close()
        asyncio.set_event_loop(None)

    def starts(self, key: str) -> list[tuple[float, str]]:
        return [(t, host) for kind, t, host, k, _ in self.log if kind == "start" and k == key]

    def overlaps(self) -> list[tuple[str, float]]:
        """Moments where two runs of one key executed at once (fleet-wide)."""
        alive: dict[int, tuple[str, str]] = {}
        out = []
        for kind, t, host, key, run in self.log:
            if kind == "start":
                if any(k == key for k, _ in alive.values()):
                    out.append((key, t))
                alive[run] = (key, host)
            else:
                alive.pop(run, None)
        return out
