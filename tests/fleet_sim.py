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
from debounce_cli.daemon import records
from debounce_cli.daemon.config import Config
from debounce_cli.daemon.fleet.coordinator import Fleet
from debounce_cli.daemon.fleet.execution import Execution
from debounce_cli.daemon.fleet.memory import Memory, MemoryStore
from debounce_cli.daemon.jobs import Job, RunSpec
from debounce_cli.daemon.runs import Runs
from debounce_cli.rules import Options
from debounce_cli.scheduler import Invocation, Scheduler

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


class SimProcess:
    """A run's process on fake time, made by the daemon's real ``Runs`` (the spawn, fence,
    stop path and ``--timeout`` under test are its): ``sleep N`` (the command's last word)
    lasts N seconds and exits 0; ``exit N`` as the first word exits N at once; ``trap`` as the
    first word ignores SIGTERM, so only SIGKILL ends it early. TERM ends any other at once
    with 143, KILL with 137. A frozen daemon hears of the exit when it thaws (SIGSTOP stops
    the daemon, not its runs); a dead one never does."""

    def __init__(self, runs: SimRuns, argv: list[str], cwd: str, env: dict[str, str],
                 on_output: Any, ledger: Any = None) -> None:
        self.runs, self.argv = runs, argv
        self.run_id, self.key = int(env["DEBOUNCE_RUN_ID"]), env["DEBOUNCE_KEY"]
        self.pid: int | None = None
        self.finished = False
        self.start_error: tuple[int, str] | None = None
        self.exited: asyncio.Future[int] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.signals: list[tuple[float, str]] = []  # (loop time, name) of each one received

    async def start(self) -> None:
        if self.start_error is not None:
            return
        host = self.runs.host
        self.pid = self.run_id
        self.exited = host.loop.create_future()
        self.runs.started.append((host.loop.now, self.run_id, self.key))
        self.runs.procs_made[self.run_id] = self
        local = self.runs.events.local.get(self.run_id)
        if local is not None:
            host.sim.slots_started.append((self.key, local.running.slot))
        host.sim.log.append(("start", host.loop.now, host.name, self.key, self.run_id))
        seconds, code = 0.0, 0
        if self.argv[0] == "exit":
            code = int(self.argv[1])
        else:
            seconds = float(self.argv[-1])
        self.timer = host.loop.call_later(seconds, self.exit, code)

    def exit(self, code: int) -> None:
        if self.exited is None or self.exited.done():
            return
        if self.timer is not None:
            self.timer.cancel()
        host = self.runs.host
        self.runs.ended.append((host.loop.now, self.run_id, code))
        host.sim.log.append(("end", host.loop.now, host.name, "", self.run_id))
        self.exited.set_result(code)

    def signal(self, name: str) -> None:
        if self.pid is None or self.finished:
            return
        self.signals.append((self.runs.host.loop.now, name))
        if name == "KILL":
            self.exit(137)
        elif name == "TERM" and self.argv[0] != "trap":
            self.exit(143)

    def stop(self, timeout: float) -> None:
        self.signal("TERM")  # (the KILL after the stop timeout is Runs' own timer)

    async def wait(self) -> int:
        if self.start_error is not None:
            self.finished = True
            return self.start_error[0]
        assert self.exited is not None
        code = await self.exited
        while self.runs.host.frozen:
            await asyncio.sleep(0.01)
        self.finished = True
        return code


class SimRuns(Runs):
    """The daemon's ``Runs`` with processes on fake time: each is created
    ``host.spawn_delay`` after the run was handed over (a frozen host waits to thaw), after
    the run's fence was asked, as always."""

    def __init__(self, execution: Execution, host: SimHost) -> None:
        self.host = host
        self.started: list[tuple[float, int, str]] = []  # (loop time, run id, key)
        self.ended: list[tuple[float, int, int]] = []  # (loop time, run id, exit status)
        self.refused: list[int] = []  # runs whose fence failed at the spawn
        self.procs_made: dict[int, SimProcess] = {}
        link = execution.link
        super().__init__(link.config, link.loop, None, "", None, events=execution,
                         clock=link.clock, process=self._process)
        self.events: Execution = execution

    def _process(self, *args: Any, **kwargs: Any) -> Any:
        return SimProcess(self, *args, **kwargs)

    def start(self, spec: RunSpec) -> None:
        fence = spec.may_start
        if fence is not None:
            def may_start() -> bool:
                ok = fence()
                if not ok:
                    self.refused.append(spec.id)
                return ok
            spec.may_start = may_start
        super().start(spec)

    async def _processes(self, active: Any, proc: Any) -> int:
        await asyncio.sleep(self.host.spawn_delay)
        while self.host.frozen:
            await asyncio.sleep(0.01)
        return await super()._processes(active, proc)

    def die(self) -> None:
        """The daemon was killed: its runs die with it (the parent-death signal), and
        nothing of theirs is reported."""
        for proc in self.procs_made.values():
            proc.exit(137)  # (before its task is cancelled, which would cancel the wait)
        for task in list(self.tasks):
            task.cancel()


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

    def accepted(self, inv: Invocation, now: float) -> None:
        self.answer = protocol.decode(records.accepted_line(inv, now), protocol.REPLIES)

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
    def __init__(self, sim: Sim, name: str, jobs: int | None = None, skew: float = 0.0,
                 lease: float | None = None) -> None:
        self.sim, self.name, self.loop = sim, name, sim.loop
        self.frozen = False
        self.dead = False
        self.spawn_delay = 0.0  # between the start of a run and its process being created
        self.store = MemoryStore(sim.memory, name=f"memory://{name}")
        config = Config(socket=f"/nonexistent/{name}.sock", store="memory://", host_id=name,
                        lease=lease or sim.lease, jobs=jobs)
        self.clock = LoopClock(sim.loop, skew)
        self.slots = Scheduler(self.clock.monotonic, wall=self.clock.wall, jobs=jobs)
        self.runs: SimRuns | None = None

        def make_runs(execution: Execution) -> SimRuns:
            self.runs = SimRuns(execution, self)
            return self.runs

        self.fleet = Fleet(config, self.clock, sim.loop, self.slots, "", store=self.store,
                           runs=make_runs)
        self.fleet.start()

    def submit(self, key: str, seconds: float, *, delay: float = 1.0, trap: bool = False,
               **options: Any) -> Caller:
        """``debounce run --fleet --key KEY --delay D -- sleep SECONDS`` here, waiting (with
        ``trap``: a command that ignores SIGTERM)."""
        caller = Caller()
        opts = Options(delay=delay, fleet=True, **options)
        job = Job(["trap"] * trap + ["sleep", repr(seconds)], "/", {})
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
