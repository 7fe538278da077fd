"""The runs' one stop path (``daemon.runs``) for local runs, on fake time: the daemon's real
core, scheduler and ``Runs`` on ``fleet_sim``'s jumping loop, with processes that take the time
their command says (``test_fleet_sim.py`` drives fleet runs through the same path).

``--timeout``, ``kill``, ``--on-busy restart`` and shutdown all end in ``Runs.stop``: TERM,
then KILL ``--stop-timeout`` later to what ignores TERM; nothing else keeps a timer for it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fleet_sim import Caller, LoopClock, VirtualLoop

from debounce_cli.daemon.config import Config
from debounce_cli.daemon.core import Core
from debounce_cli.daemon.jobs import Job
from debounce_cli.daemon.runs import Runs
from debounce_cli.rules import Options
from debounce_cli.scheduler import Scheduler


class Process:
    """``sleep N`` lasts N seconds; ``trap ...`` ignores TERM. TERM ends it with 143 (unless
    trapped), KILL with 137."""

    def __init__(self, daemon: Daemon, argv: list[str], cwd: str, env: dict[str, str],
                 on_output: Any, ledger: Any = None) -> None:
        self.daemon, self.argv = daemon, argv
        self.pid: int | None = None
        self.finished = False
        self.start_error: tuple[int, str] | None = None
        self.exited: asyncio.Future[int] | None = None
        self.signals: list[tuple[float, str]] = []
        self.started_at = -1.0
        self.run_id = int(env["DEBOUNCE_RUN_ID"])

    async def start(self) -> None:
        loop = self.daemon.loop
        self.pid, self.started_at = self.run_id, loop.now
        self.exited = loop.create_future()
        self.daemon.procs[self.run_id] = self
        loop.call_later(float(self.argv[-1]), self.exit, 0)

    def exit(self, code: int) -> None:
        if self.exited is not None and not self.exited.done():
            self.exited.set_result(code)

    def signal(self, name: str) -> None:
        if self.pid is None or self.finished:
            return
        self.signals.append((self.daemon.loop.now, name))
        if name == "KILL":
            self.exit(137)
        elif name == "TERM" and self.argv[0] != "trap":
            self.exit(143)

    def stop(self, timeout: float) -> None:
        self.signal("TERM")

    async def wait(self) -> int:
        assert self.exited is not None
        code = await self.exited
        self.finished = True
        return code


class Daemon:
    def __init__(self, jobs: int | None = None) -> None:
        self.loop = VirtualLoop()
        asyncio.set_event_loop(self.loop)
        clock = LoopClock(self.loop)
        config = Config(socket="/nonexistent/daemon.sock")
        self.procs: dict[int, Process] = {}
        self.runs = Runs(config, self.loop, None, "", None, events=None,  # type: ignore[arg-type]
                         clock=clock, process=lambda *a, **kw: Process(self, *a, **kw))
        self.core = Core(config, clock, self.loop,
                         Scheduler(clock.monotonic, wall=clock.wall, jobs=jobs), None,
                         runs=self.runs)
        self.runs.events = self.core

    def submit(self, key: str, seconds: float, trap: bool = False, **options: Any) -> Caller:
        caller = Caller()
        argv = ["trap"] * trap + ["sleep", repr(seconds)]
        self.core.submit(key, Options(**options), Job(argv, "/", {}), caller, caller)
        return caller

    def run_until(self, predicate: Callable[[], object], limit: float = 600.0) -> float:
        async def wait() -> None:
            while not predicate():
                assert self.loop.now <= limit, f"not met within {limit} s of fake time"
                await asyncio.sleep(0.001)
        self.loop.run_until_complete(wait())
        return self.loop.now

    def close(self) -> None:
        for task in self.runs.tasks:  # (a test that failed may leave a run executing)
            task.cancel()
        self.loop.run_until_complete(asyncio.sleep(0))
        self.loop.close()
        asyncio.set_event_loop(None)


@pytest.fixture
def d() -> Iterator[Daemon]:
    daemon = Daemon()
    try:
        yield daemon
    finally:
        daemon.close()


def test_a_timeout_terms_the_run_then_kills_what_ignores_term(d: Daemon) -> None:
    caller = d.submit("k", 60.0, trap=True, delay=1.0, timeout=2.0, stop_timeout=3.0)
    d.run_until(lambda: d.procs and d.procs[1].signals)
    [row] = d.core.status()  # `debounce status` while it is being stopped
    assert row.running is not None and row.running.stopping == "timeout"
    d.run_until(lambda: caller.result is not None)
    [proc] = d.procs.values()
    start = proc.started_at
    assert start == pytest.approx(1.0)
    assert proc.signals == [(pytest.approx(start + 2.0), "TERM"),
                            (pytest.approx(start + 5.0), "KILL")]
    assert caller.outcome == ("finished", 137, "timeout")


def test_a_run_that_ends_in_time_gets_no_signal(d: Daemon) -> None:
    caller = d.submit("k", 1.5, delay=0.0, timeout=2.0)
    d.run_until(lambda: caller.result is not None)
    d.loop.run_until_complete(asyncio.sleep(10.0))  # the timeout's moment passes unheard
    [proc] = d.procs.values()
    assert proc.signals == [] and caller.outcome == ("finished", 0, "exited")


def test_the_timeout_counts_from_the_start_not_the_due_time() -> None:
    d = Daemon(jobs=1)
    try:
        blocker = d.submit("busy", 3.0, delay=0.0)
        caller = d.submit("k", 60.0, delay=1.0, timeout=1.0)  # due at 1, its slot frees at 3
        d.run_until(lambda: caller.result is not None and blocker.result is not None)
        proc = d.procs[2]
        assert proc.started_at == pytest.approx(3.0)
        assert proc.signals == [(pytest.approx(4.0), "TERM")]
        assert caller.outcome == ("finished", 143, "timeout")
    finally:
        d.close()


def test_kill_terms_then_kills_after_the_stop_timeout(d: Daemon) -> None:
    caller = d.submit("k", 60.0, trap=True, delay=0.0, stop_timeout=4.0)
    d.run_until(lambda: d.procs)
    d.loop.run_until_complete(asyncio.sleep(1.0))
    asked = d.loop.now
    d.core.kill(1, None)
    d.run_until(lambda: caller.result is not None)
    assert d.procs[1].signals == [(pytest.approx(asked), "TERM"),
                                  (pytest.approx(asked + 4.0), "KILL")]
    assert caller.outcome == ("finished", 137, "killed")


def test_restart_and_shutdown_stop_through_the_same_path(d: Daemon) -> None:
    first = d.submit("k", 60.0, trap=True, delay=0.0, on_busy="restart", stop_timeout=2.0)
    d.run_until(lambda: d.procs)
    due = d.loop.now + 1.0
    second = d.submit("k", 60.0, trap=True, delay=1.0, on_busy="restart", stop_timeout=2.0)
    d.run_until(lambda: 2 in d.procs)
    assert d.procs[1].signals == [(pytest.approx(due), "TERM"),
                                  (pytest.approx(due + 2.0), "KILL")]
    assert d.procs[2].started_at == pytest.approx(due + 2.0)  # once the stopped one ended
    asked = d.loop.now
    d.core.stop_runs()  # shutdown
    d.run_until(lambda: second.result is not None)
    assert d.procs[2].signals == [(pytest.approx(asked), "TERM"),
                                  (pytest.approx(asked + 2.0), "KILL")]
    assert second.outcome == first.outcome == ("finished", 137, "stopped")


def test_a_second_stop_changes_nothing(d: Daemon) -> None:
    """`debounce kill` twice: one TERM, and the KILL a stop timeout after the first."""
    caller = d.submit("k", 60.0, trap=True, delay=0.0, stop_timeout=2.0)
    d.run_until(lambda: d.procs)
    first = d.loop.now
    d.runs.stop(1, "kill")
    d.loop.run_until_complete(asyncio.sleep(1.5))
    d.runs.stop(1, "timeout")
    d.run_until(lambda: caller.result is not None)
    assert d.procs[1].signals == [(pytest.approx(first), "TERM"),
                                  (pytest.approx(first + 2.0), "KILL")]
