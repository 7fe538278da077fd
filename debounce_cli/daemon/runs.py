"""Runs as processes: spawning, output logs, stopping, exit, retention.

The core hands over each run the scheduler starts (after the commit that records it), and the
fleet each fleet run it claimed here, both as a :class:`~debounce_cli.daemon.jobs.RunSpec`;
this room starts its process a few per loop turn, writes its output to the run's log, hands
each chunk to the run's audience (its waiters, or the fleet's stream), and reports the pid and
the exit back. It is also every run's one stop path: TERM, then KILL after ``--stop-timeout``
(for ``kill``, ``--timeout``, restart, shutdown and the fleet's stops alike), and the
``--timeout`` that starts one.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from debounce_cli import paths, states
from debounce_cli.clock import Clock
from debounce_cli.daemon.config import Config
from debounce_cli.daemon.jobs import Job, RunSpec
from debounce_cli.journal import Journal, JournalError
from debounce_cli.logfile import LogWriter, read_log
from debounce_cli.runner import (
    CANNOT_START,
    DAEMON_MARK,
    RunProcess,
    batches,
    note_end,
    start_spawner,
)

#: Output kept in memory for clients joining a run that has no log (--no-journal).
REPLAY_BUFFER = 8 * 1024 * 1024
#: Processes started per turn of the event loop, at most (see Runs._spawn_some).
SPAWNS_PER_TURN = 8
#: Descriptors a run holds while it executes (its two output pipes, its log, one in transit).
FDS_PER_RUN = 4


def runs_at_once() -> int:
    """How many runs may execute at once before the next ones wait to be spawned: half the
    daemon's descriptors, so that a burst of thousands never fails runs for want of one
    (they would end 126, "Too many open files")."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 16
    return max(8, soft // 2 // FDS_PER_RUN)
#: Retention also drops unused environments every this many finished runs.
PRUNE_ENVS_EVERY = 256
#: While runs execute, the journal's retention runs at most this often (see Runs.retain).
RETAIN_EVERY = 0.5


class RunEvents(Protocol):
    """What the runs report back (the core, or the fleet's runs executing here)."""

    def run_started(self, spec: RunSpec) -> None:
        """Its process exists (``spec.job.pid`` is set)."""

    def run_timed_out(self, run_id: int) -> None:
        """Its ``--timeout`` passed: it is being stopped (TERM, then KILL)."""

    def run_exited(self, run_id: int, code: int) -> None:
        """It has ended with ``code`` (126 when it never started)."""


#: What makes a run's process: ``runner.RunProcess`` (the fake-time fleet tests give another).
Process = Callable[..., RunProcess]


@dataclass(eq=False, slots=True)
class Active:
    """A run handed over and not yet ended: its spec, why it is being stopped, its timers."""

    spec: RunSpec
    why: str | None = None  # states.STOP_* (or the fleet's) once it is being stopped
    timers: list[Any] = field(default_factory=list)  # --timeout, and the KILL of its stop


class Runs:
    """The processes of the runs that execute now."""

    def __init__(self, config: Config, loop: Any, journal: Journal | None, log_dir: str,
                 ledger: str | None, events: RunEvents, clock: Clock,
                 process: Process | None = None) -> None:
        self.config = config
        self.clock = clock
        self.daemon_id = paths.socket_digest(config.socket)
        self.ledger = ledger
        self.ledger_fd: int | None = None
        self.ledger_error = ""
        self._open_ledger()
        if process is None:
            start_spawner()  # (and load prctl now: a forked child must not import anything)
        self.process: Process = process or RunProcess
        self.loop = loop  # call_soon, and call_at on the clock's monotonic time
        self.journal = journal
        self.log_dir = log_dir
        self.events = events
        self.procs: dict[int, RunProcess] = {}
        self.active: dict[int, Active] = {}  # the runs handed over whose end is not reported
        self.logs: dict[int, LogWriter] = {}
        #: Logs of executing runs not on disk yet (no output so far): made at the first
        #: output, or when a reader asks (:meth:`make_log`); never, for a run that writes
        #: nothing. See ``LogWriter(lazy=True)``.
        self.unmade: dict[int, tuple[LogWriter, Job]] = {}
        self.buffers: dict[int, list[tuple[int, bytes]]] = {}  # output of runs without a log
        self.to_spawn: deque[tuple[Active, RunProcess]] = deque()
        self.starting = 0  # runs taken from to_spawn whose process is not started yet
        self.draining = False  # shutting down: nothing more is spawned
        self.at_once = runs_at_once()  # runs executing at most; the next ones wait their turn
        self.executing = 0  # runs spawned whose end has not been reported yet
        self.later: dict[int, list[RunProcess]] = {}  # more processes of a --collect run
        self.batch_files: dict[int, str] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self.finished_since_prune = 0
        self.retain_handle: asyncio.TimerHandle | None = None

    def _open_ledger(self) -> None:
        """Open the started ledger for appending (again, after a failure), or note why not."""
        if not self.ledger or self.ledger_fd is not None:
            return
        try:
            self.ledger_fd = os.open(self.ledger, os.O_WRONLY | os.O_APPEND | os.O_CREAT
                                     | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            if exc.strerror != self.ledger_error:
                print(f"debounce: cannot write {self.ledger}: {exc.strerror}", file=sys.stderr)
            self.ledger_error = exc.strerror or str(exc)

    def stop_spawning(self) -> None:
        """Shutdown: what is not spawned yet never is (it stays recorded as not started)."""
        self.draining = True

    def start(self, spec: RunSpec) -> None:
        """Prepare the run's process and log, and arm its ``--timeout`` (counted from now, the
        run's start); it is spawned soon, a few per turn.

        A run that cannot even be prepared still ends, with status 126, like one whose
        command cannot be started: it must never hold its key as "running" for good.
        """
        active = self.active[spec.id] = Active(spec)
        if spec.options.timeout is not None:
            active.timers.append(self._after(spec.options.timeout,
                                             lambda: self._time_out(spec.id)))
        try:
            proc = self._prepare(spec)
        except Exception as exc:  # noqa: BLE001 - the run must end with a status
            print(f"debounce: run {spec.id} cannot start: {exc!r}", file=sys.stderr)
            self.later.pop(spec.id, None)
            proc = self.process([spec.key], "/", {}, lambda fd, data: None)
            proc.start_error = (126, "")
            self.procs[spec.id] = proc
        self.to_spawn.append((active, proc))
        if len(self.to_spawn) == 1:
            self.loop.call_soon(self._spawn_some)

    def _prepare(self, spec: RunSpec) -> RunProcess:
        job = spec.job
        env = dict(job.env)
        more: list[list[str]] = []
        if spec.options.collect:
            more = self._collect(spec, env)
        env["DEBOUNCE_KEY"] = spec.key
        env["DEBOUNCE_RUN_ID"] = str(spec.id)
        env["DEBOUNCE_COALESCED"] = str(spec.coalesced)
        env[DAEMON_MARK] = self.daemon_id
        log = self._open_log(spec)
        if log is None:
            self.buffers[spec.id] = []
        buffered = 0
        audience = spec.audience

        def on_output(fd: int, data: bytes) -> None:
            nonlocal buffered
            end = None
            if log is not None:
                if not log.made:
                    self.make_log(spec.id)  # its first output: made here, or said why not
                end = log.write(fd, data)
            elif buffered < REPLAY_BUFFER:  # without a log, late joiners get the first part
                self.buffers[spec.id].append((fd, data))
                buffered += len(data)
            audience.output(fd, data, end)

        ledger = None
        if self.ledger:
            self._open_ledger()
            if self.ledger_fd is not None:
                ledger = (self.ledger_fd, self.ledger)
        proc = self.process(job.argv, job.cwd, env, on_output, ledger=ledger)
        if self.ledger and ledger is None:
            # No record of its start could be made: it must not start (see runner).
            proc.start_error = (CANNOT_START, "debounce: not started: cannot record the run as "
                                f"started in {self.ledger}: {self.ledger_error}\n")
        self.procs[spec.id] = proc
        if more:  # the rest of a --collect batch past the argument limit: one after another
            self.later[spec.id] = [self.process(argv, job.cwd, env, on_output, ledger=ledger)
                                   for argv in more]
        audience.started(job.log_path if log is not None else None)
        return proc

    def _collect(self, spec: RunSpec, env: dict[str, str]) -> list[list[str]]:
        """``--collect``: the run's command line(s) for every coalesced invocation, and the
        ``$DEBOUNCE_BATCH`` file listing them (one JSON array, an argv, per line); the job's
        argv becomes the first command line (what history and the waiters see)."""
        import json

        argvs = [job.argv for job in spec.batch] or [spec.job.argv]
        lines = batches(argvs, env)
        path = self._batch_file(spec.id, "".join(json.dumps(argv) + "\n" for argv in argvs))
        if path is not None:
            env["DEBOUNCE_BATCH"] = path
        spec.job.argv = lines[0]
        return lines[1:]

    def _batch_file(self, run_id: int, text: str) -> str | None:
        import tempfile

        try:
            fd, path = tempfile.mkstemp(prefix=f"batch-{run_id}-", dir=self.log_dir or None)
            with os.fdopen(fd, "w", encoding="utf-8", errors="surrogateescape") as f:
                f.write(text)
        except OSError as exc:
            print(f"debounce: run {run_id} has no $DEBOUNCE_BATCH: {exc.strerror}",
                  file=sys.stderr)
            return None
        self.batch_files[run_id] = path
        return path

    def _drop_batch_file(self, run_id: int) -> None:
        path = self.batch_files.pop(run_id, None)
        if path is not None:
            try:
                os.unlink(path)
            except OSError:
                pass

    # ------------------------------------------------------------------ stopping
    def stop(self, run_id: int, why: str) -> None:
        """Stop a run: TERM to its process group now, KILL after its ``--stop-timeout``.

        The one stop of every run, local or fleet (``kill``, ``--timeout``, restart,
        shutdown, a fleet's stop); a second stop changes nothing. A run not spawned yet gets
        its TERM as soon as it is, and the KILL counts from now all the same. The runner
        also KILLs what is left of the group when the stop timeout has passed after the
        first process exited (a child that ignores TERM outlives it)."""
        active = self.active.get(run_id)
        if active is None or active.why is not None:
            return
        active.why = why
        timeout = active.spec.options.stop_timeout
        proc = self.procs.get(run_id)
        if proc is not None:
            proc.stop(timeout)
        active.timers.append(self._after(timeout, lambda: self.signal(run_id, "KILL")))

    def _time_out(self, run_id: int) -> None:
        active = self.active.get(run_id)
        if active is not None and active.why is None:
            self.stop(run_id, states.STOP_TIMEOUT)
            self.events.run_timed_out(run_id)

    def _after(self, seconds: float, callback: Callable[[], None]) -> Any:
        return self.loop.call_at(self.clock.monotonic() + seconds, callback)

    def signal(self, run_id: int, name: str) -> None:
        """Send ``name`` to a run's process group, once (``kill --signal``, ``--on-busy
        signal``, the KILL of a stop)."""
        proc = self.procs.get(run_id)
        if proc is not None:
            proc.signal(name)

    def log_of(self, run_id: int) -> str | None:
        """The run's output log while it is being written whole (no write has failed); made
        now if it was left for later, as a reader is about to open it."""
        self.make_log(run_id)
        log = self.logs.get(run_id)
        return log.path if log is not None and log.error is None else None

    def make_log(self, run_id: int) -> None:
        """The log of run ``run_id`` is on disk from now on, if it is to be (a reader is about
        to open it: a waiter catching up, ``debounce logs``)."""
        unmade = self.unmade.pop(run_id, None)
        if unmade is None:
            return
        log, job = unmade
        if not log.make():  # said once; the run has no log (``debounce logs`` says so)
            print(f"debounce: run {run_id} keeps no log: {log.error}", file=sys.stderr)
            job.log_path = None

    def output_so_far(self, run_id: int, path: str | None) -> Iterable[tuple[int, bytes]]:
        """What a waiter joining the run late missed: from memory, else from its log
        (``path``, which the run's job keeps after the run has ended)."""
        if run_id in self.buffers:
            return list(self.buffers[run_id])
        if path:
            try:
                return read_log(path)
            except OSError:
                return []
        return []

    async def wait_all(self) -> None:
        """Until every run's process has ended (shutdown)."""
        while self.tasks:
            await asyncio.wait(list(self.tasks))
            await asyncio.sleep(0)  # let the last commit and answers go out
        if self.retain_handle is not None:  # nothing runs: retain now, not after the close
            self._retain_now()

    # ------------------------------------------------------------------ spawning
    def _spawn_some(self) -> None:
        """Start a few runs per turn of the loop, so clients are answered between the forks.

        When thousands of invocations fall due together, starting them all in one turn would
        leave every connection unanswered until the last fork.
        """
        for _ in range(SPAWNS_PER_TURN):
            if not self.to_spawn or self.draining or self.executing >= self.at_once:
                return  # (a run that ends calls this again)
            active, proc = self.to_spawn.popleft()
            self.executing += 1
            self.starting += 1
            task = asyncio.ensure_future(self._execute(active, proc))
            self.tasks.add(task)
            task.add_done_callback(self._done_executing)
        if self.to_spawn:
            self.loop.call_soon(self._spawn_some)

    async def _execute(self, active: Active, proc: RunProcess) -> None:
        """Run the run's process(es) and report its end, whatever happens on the way: a run
        whose task died unreported would stay "running" for good and hold its key."""
        run_id = active.spec.id
        try:
            code = await self._processes(active, proc)
        except Exception as exc:  # noqa: BLE001 - the run must end with a status
            print(f"debounce: run {run_id} failed: {exc!r}", file=sys.stderr)
            current = self.procs.get(run_id, proc)
            current.signal("KILL")  # nothing of it may go on unwatched
            current.finished = True
            self.later.pop(run_id, None)
            code = 126
        for timer in active.timers:
            timer.cancel()
        self._drop_batch_file(run_id)
        if self.ledger_fd is not None and proc.pid is not None:
            # Its end, noted at once: a crash before the commit does not make it "lost".
            note_end(self.ledger_fd, run_id, code, self.clock.wall())
        self.procs.pop(run_id, None)
        self.active.pop(run_id, None)
        self.buffers.pop(run_id, None)
        log = self.logs.pop(run_id, None)
        if log is not None:
            log.close()
            # A run that wrote nothing leaves no file: `debounce logs` makes an empty one when
            # asked (lookup.handle_logs). Creating a file costs 0.2-0.6 ms of the daemon's
            # time in a burst, while the burst's commands want the same disk and cores.
            self.unmade.pop(run_id, None)
        self.events.run_exited(run_id, code)

    def _done_executing(self, task: asyncio.Task[None]) -> None:
        """A run's task has ended, however: its place among the runs at once is free."""
        self.tasks.discard(task)
        self.executing -= 1
        if self.to_spawn:
            self._spawn_some()

    async def _processes(self, active: Active, proc: RunProcess) -> int:
        """Start the run's process, and the rest of a --collect batch one after another;
        return the first non-zero status among them."""
        spec = active.spec
        try:
            if spec.may_start is not None and not spec.may_start():
                return 126  # its fence failed at the spawn: it never starts (fleet.execution)
            await proc.start()
        finally:
            self.starting -= 1
        if proc.pid is not None:
            spec.job.pid = proc.pid
            self.events.run_started(spec)
        stop_timeout = spec.options.stop_timeout
        if active.why is not None:  # stopped before it could start
            proc.stop(stop_timeout)
        code = await proc.wait()
        for following in self.later.pop(spec.id, []):
            if active.why is not None:
                break  # stopped: the rest of the batch does not start
            self.procs[spec.id] = following
            await following.start()
            if active.why is not None:  # stopped while it was being started
                following.stop(stop_timeout)
            status = await following.wait()
            code = code or status  # every caller gets the first non-zero status
        return code

    def _open_log(self, spec: RunSpec) -> LogWriter | None:
        if not self.log_dir:
            return None
        path = os.path.join(self.log_dir, f"{spec.id}.log")
        log = LogWriter(path, lazy=True)  # made at its first output: not before the spawn
        self.unmade[spec.id] = (log, spec.job)
        self.logs[spec.id] = log
        spec.job.log_path = path
        return log

    # ------------------------------------------------------------------ retention
    def retain(self) -> None:
        """Keep history and logs within their limits (--keep-history, --keep-logs...).

        Called after a commit that recorded a run's end. The started ledger is emptied here
        when no run executes (every end it could speak for is committed now). The journal's
        retention (a transaction with a scan of the runs that keep logs) runs at once when no
        run executes, else at most every ``RETAIN_EVERY`` seconds: a thousand runs ending in
        a burst pay for a few scans, not a thousand.
        """
        if self.journal is None:
            return
        self.finished_since_prune += 1
        if self.ledger and not self.procs:
            # Every run has ended and its end is committed: no line of the ledger is needed.
            try:
                os.truncate(self.ledger, 0)
            except OSError:
                pass
        if not self.procs:
            self._retain_now()
        elif self.retain_handle is None:
            self.retain_handle = self.loop.call_later(RETAIN_EVERY, self._retain_now)

    def _retain_now(self) -> None:
        if self.retain_handle is not None:
            self.retain_handle.cancel()
            self.retain_handle = None
        journal = self.journal
        if journal is None or journal.db is None:
            return  # no journal, or closed at shutdown: the next daemon's first run retains
        prune_envs = self.finished_since_prune >= PRUNE_ENVS_EVERY
        if prune_envs:
            self.finished_since_prune = 0
        config = self.config
        try:
            files = journal.retain(config.keep_logs, config.keep_logs_total, config.keep_history,
                                   prune_envs=prune_envs)
        except JournalError:
            return  # retention must never take the daemon down; the next run tries again
        if self.unmade:  # a log dropped before it was made is never made
            dropped = set(files)
            for run_id, (log, _job) in list(self.unmade.items()):
                if log.path in dropped:
                    del self.unmade[run_id]
        for path in files:
            try:
                os.unlink(path)
            except OSError:
                pass
