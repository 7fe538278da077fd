"""Runs as processes: spawning, output logs, fanning output out to waiters, exit, retention.

The core hands over each run the scheduler starts (after the commit that records it); this
room starts its process a few per loop turn, writes its output to the run's log, copies each
chunk to the waiters that follow the run, and reports the pid and the exit back to the core.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections import deque
from collections.abc import Iterable
from typing import Any, Protocol

from debounce_cli import paths, protocol
from debounce_cli.clock import Clock
from debounce_cli.daemon import records
from debounce_cli.daemon.config import Config
from debounce_cli.daemon.jobs import Job
from debounce_cli.daemon.waiters import unique
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
from debounce_cli.scheduler import Run

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
    """What the runs report back (the core)."""

    def run_started(self, run: Run) -> None: ...

    def run_exited(self, run_id: int, code: int) -> None: ...


class Runs:
    """The processes of the runs that execute now."""

    def __init__(self, config: Config, loop: Any, journal: Journal | None, log_dir: str,
                 ledger: str | None, events: RunEvents, clock: Clock) -> None:
        self.config = config
        self.clock = clock
        self.daemon_id = paths.socket_digest(config.socket)
        self.ledger = ledger
        self.ledger_fd: int | None = None
        self.ledger_error = ""
        self._open_ledger()
        start_spawner()  # (and load prctl now: a forked child must not import anything)
        self.loop = loop
        self.journal = journal
        self.log_dir = log_dir
        self.events = events
        self.procs: dict[int, RunProcess] = {}
        self.active: dict[int, Run] = {}  # the runs whose processes are in procs
        self.logs: dict[int, LogWriter] = {}
        #: Logs not on disk yet (no output so far): made when the spawns of a burst are done,
        #: or at once when a reader asks (:meth:`make_log`). See ``LogWriter(lazy=True)``.
        self.unmade: dict[int, tuple[LogWriter, Job]] = {}
        self.buffers: dict[int, list[tuple[int, bytes]]] = {}  # output of runs without a log
        self.to_spawn: deque[tuple[Run, RunProcess]] = deque()
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

    def start(self, run: Run) -> None:
        """Prepare the run's process and log; it is spawned soon, a few per turn.

        A run that cannot even be prepared still ends, with status 126, like one whose
        command cannot be started: it must never hold its key as "running" for good.
        """
        self.active[run.id] = run
        try:
            proc = self._prepare(run)
        except Exception as exc:  # noqa: BLE001 - the run must end with a status
            print(f"debounce: run {run.id} cannot start: {exc!r}", file=sys.stderr)
            self.later.pop(run.id, None)
            proc = RunProcess([run.key], "/", {}, lambda fd, data: None)
            proc.start_error = (126, "")
            self.procs[run.id] = proc
        self.to_spawn.append((run, proc))
        if len(self.to_spawn) == 1:
            self.loop.call_soon(self._spawn_some)

    def _prepare(self, run: Run) -> RunProcess:
        job = records.job_of(run.invocation)
        env = dict(job.env)
        more: list[list[str]] = []
        if run.invocation.options.collect:
            job, more = self._collect(run, job, env)
        env["DEBOUNCE_KEY"] = run.key
        env["DEBOUNCE_RUN_ID"] = str(run.id)
        env["DEBOUNCE_COALESCED"] = str(run.coalesced)
        env[DAEMON_MARK] = self.daemon_id
        log = self._open_log(run)
        if log is None:
            self.buffers[run.id] = []
        buffered = 0

        def on_output(fd: int, data: bytes) -> None:
            nonlocal buffered
            end = None
            if log is not None:
                if not log.made:
                    self.make_log(run.id)  # its first output: made here, or said why not
                end = log.write(fd, data)
            elif buffered < REPLAY_BUFFER:  # without a log, late joiners get the first part
                self.buffers[run.id].append((fd, data))
                buffered += len(data)
            line = records.output_line(fd, data)
            for waiter in unique(run.waiters):
                if waiter.follows(run.id):
                    waiter.output(fd, data, line, end)

        ledger = None
        if self.ledger:
            self._open_ledger()
            if self.ledger_fd is not None:
                ledger = (self.ledger_fd, self.ledger)
        proc = RunProcess(job.argv, job.cwd, env, on_output, ledger=ledger)
        if self.ledger and ledger is None:
            # No record of its start could be made: it must not start (see runner).
            proc.start_error = (CANNOT_START, "debounce: not started: cannot record the run as "
                                f"started in {self.ledger}: {self.ledger_error}\n")
        self.procs[run.id] = proc
        if more:  # the rest of a --collect batch past the argument limit: one after another
            self.later[run.id] = [RunProcess(argv, job.cwd, env, on_output, ledger=ledger)
                                  for argv in more]
        if run.waiters:  # (--no-wait runs have nobody to tell: no message to build)
            started = protocol.encode(records.started_msg(run))
            log_path = job.log_path if log is not None else None
            for waiter in unique(run.waiters):
                waiter.start(run.id, started, log_path)
        return proc

    def _collect(self, run: Run, job: Job, env: dict[str, str]) -> tuple[Job, list[list[str]]]:
        """``--collect``: the run's command line(s) for every coalesced invocation, and the
        ``$DEBOUNCE_BATCH`` file listing them (one JSON array, an argv, per line)."""
        import json

        argvs = [records.job_of_payload(p).argv for p in run.invocation.batch] or [job.argv]
        lines = batches(argvs, env)
        path = self._batch_file(run, "".join(json.dumps(argv) + "\n" for argv in argvs))
        if path is not None:
            env["DEBOUNCE_BATCH"] = path
        collected = Job(lines[0], job.cwd, job.env, log_path=job.log_path)
        run.invocation.payload = collected  # what history and the waiters see
        return collected, lines[1:]

    def _batch_file(self, run: Run, text: str) -> str | None:
        import tempfile

        try:
            fd, path = tempfile.mkstemp(prefix=f"batch-{run.id}-", dir=self.log_dir or None)
            with os.fdopen(fd, "w", encoding="utf-8", errors="surrogateescape") as f:
                f.write(text)
        except OSError as exc:
            print(f"debounce: run {run.id} has no $DEBOUNCE_BATCH: {exc.strerror}",
                  file=sys.stderr)
            return None
        self.batch_files[run.id] = path
        return path

    def _drop_batch_file(self, run: Run) -> None:
        path = self.batch_files.pop(run.id, None)
        if path is not None:
            try:
                os.unlink(path)
            except OSError:
                pass

    def signal(self, run_id: int, name: str) -> None:
        """Send ``name`` to a run's process group; the TERM of a stop (kill, --timeout,
        restart, shutdown) also has the runner SIGKILL what is left after the stop timeout."""
        proc = self.procs.get(run_id)
        if proc is None:
            return
        run = self.active.get(run_id)
        if name == "TERM" and run is not None and run.stop_reason is not None:
            proc.stop(run.invocation.options.stop_timeout)
        else:
            proc.signal(name)

    def log_of(self, run: Run) -> str | None:
        """The run's output log while it is being written whole (no write has failed); made
        now if it was left for later, as a reader is about to open it."""
        self.make_log(run.id)
        log = self.logs.get(run.id)
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

    def _make_logs(self) -> None:
        """Make the logs that runs which ended during a burst of spawns left unmade, a few
        per turn, once nothing waits to be spawned: a finished run's log exists for
        ``debounce logs`` (also after a restart), even when the run wrote nothing. (A run
        that still executes makes its log at its first output, its end, or a reader's ask.)"""
        if self.to_spawn or self.starting:
            return  # the spawns first; the last one calls this again
        ended = [run_id for run_id, (log, _job) in self.unmade.items() if log.closed]
        for run_id in ended[:SPAWNS_PER_TURN]:
            self.make_log(run_id)
        if len(ended) > SPAWNS_PER_TURN:
            self.loop.call_soon(self._make_logs)

    def output_so_far(self, run: Run) -> Iterable[tuple[int, bytes]]:
        """What a waiter joining the run late missed: from memory, else from the log."""
        if run.id in self.buffers:
            return list(self.buffers[run.id])
        path = records.job_of(run.invocation).log_path
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
        for run_id in list(self.unmade):  # every finished run's log exists for the next daemon
            self.make_log(run_id)
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
            run, proc = self.to_spawn.popleft()
            self.executing += 1
            self.starting += 1
            task = asyncio.ensure_future(self._execute(run, proc))
            self.tasks.add(task)
            task.add_done_callback(self._done_executing)
        if self.to_spawn:
            self.loop.call_soon(self._spawn_some)

    async def _execute(self, run: Run, proc: RunProcess) -> None:
        """Run the run's process(es) and report its end, whatever happens on the way: a run
        whose task died unreported would stay "running" for good and hold its key."""
        try:
            code = await self._processes(run, proc)
        except Exception as exc:  # noqa: BLE001 - the run must end with a status
            print(f"debounce: run {run.id} failed: {exc!r}", file=sys.stderr)
            current = self.procs.get(run.id, proc)
            current.signal("KILL")  # nothing of it may go on unwatched
            current.finished = True
            self.later.pop(run.id, None)
            code = 126
        self._drop_batch_file(run)
        if self.ledger_fd is not None and proc.pid is not None:
            # Its end, noted at once: a crash before the commit does not make it "lost".
            note_end(self.ledger_fd, run.id, code, self.clock.wall())
        self.procs.pop(run.id, None)
        self.active.pop(run.id, None)
        self.buffers.pop(run.id, None)
        log = self.logs.pop(run.id, None)
        if log is not None:
            log.close()
            if not log.made and not (self.to_spawn or self.starting):
                self.make_log(run.id)  # nothing waits to be spawned: now, not later
        self.events.run_exited(run.id, code)

    def _done_executing(self, task: asyncio.Task[None]) -> None:
        """A run's task has ended, however: its place among the runs at once is free."""
        self.tasks.discard(task)
        self.executing -= 1
        if self.to_spawn:
            self._spawn_some()

    async def _processes(self, run: Run, proc: RunProcess) -> int:
        """Start the run's process, and the rest of a --collect batch one after another;
        return the first non-zero status among them."""
        try:
            if run.may_start is not None and not run.may_start():
                return 126  # its fence failed at the spawn: it never starts (fleet.execution)
            await proc.start()
        finally:
            self.starting -= 1
            if self.unmade and not (self.to_spawn or self.starting):
                self.loop.call_soon(self._make_logs)  # the burst is spawned
        if proc.pid is not None:
            records.job_of(run.invocation).pid = proc.pid
            self.events.run_started(run)
        if run.stop_reason is not None:  # stopped before it could start
            proc.stop(run.invocation.options.stop_timeout)
        code = await proc.wait()
        for following in self.later.pop(run.id, []):
            if run.stop_reason is not None:
                break  # stopped: the rest of the batch does not start
            self.procs[run.id] = following
            await following.start()
            if run.stop_reason is not None:  # stopped while it was being started
                following.stop(run.invocation.options.stop_timeout)
            status = await following.wait()
            code = code or status  # every caller gets the first non-zero status
        return code

    def _open_log(self, run: Run) -> LogWriter | None:
        if not self.log_dir:
            return None
        path = os.path.join(self.log_dir, f"{run.id}.log")
        log = LogWriter(path, lazy=True)  # made at its first output: not before the spawn
        self.unmade[run.id] = (log, records.job_of(run.invocation))
        self.logs[run.id] = log
        records.job_of(run.invocation).log_path = path
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
