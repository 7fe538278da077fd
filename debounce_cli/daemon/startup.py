"""Before serving: take the socket's lock, replace a stale socket, restore the journal.

Start-up takes a lock file beside the socket before touching the socket, so two daemons racing
for one socket end with exactly one serving; the loser sees the lock held and leaves. A socket
file without a lock holder is stale (its daemon died) and is replaced.
"""

from __future__ import annotations

import os
import stat
import sys
import time
from dataclasses import dataclass

from debounce_cli import paths
from debounce_cli.clock import Clock
from debounce_cli.daemon.config import AlreadyRunning, Config, DaemonError
from debounce_cli.daemon.jobs import Job, parse_options
from debounce_cli.journal import Journal, JournalError, Restored, UnfinishedRun
from debounce_cli.protocol import ProtocolError
from debounce_cli.runner import kill_leftovers, read_ledger
from debounce_cli.scheduler import Scheduler

#: How long an auto-started daemon waits for a previous one that is still shutting down.
LOCK_PATIENCE = 30.0


def acquire(config: Config) -> int:
    """Take the socket's lock and replace a stale socket; return the lock's descriptor.

    Raises AlreadyRunning if another daemon serves the socket.
    """
    sock = config.socket
    paths.socket_dir_check(sock, create=True)
    # An auto-started daemon may find the previous one still finishing (it has stopped
    # listening and is stopping its runs): it waits to take over. By hand, it says so.
    patience = LOCK_PATIENCE if config.ready_fd is not None else 0.0
    deadline = time.monotonic() + patience
    while True:
        fd = paths.lock(paths.lock_path(sock), wait=False)
        if fd is not None:
            break
        if time.monotonic() >= deadline:
            raise AlreadyRunning(f"another debounce daemon already serves {sock}")
        time.sleep(0.05)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
    except OSError as exc:
        os.close(fd)
        raise DaemonError(f"cannot write {paths.lock_path(sock)}: {exc.strerror}; free some "
                          "space on its disk (or choose another --socket) and retry") from None
    if config.listen_fd is None and os.path.lexists(sock):
        if not stat.S_ISSOCK(os.lstat(sock).st_mode):
            os.close(fd)
            raise DaemonError(f"{sock} exists and is not a socket; choose another --socket")
        # The lock is ours, so no live daemon of ours serves this socket: it is stale.
        os.unlink(sock)
    return fd


def release(config: Config, fd: int) -> None:
    """The daemon's last act: remove its lock file (and the clients' start lock, if no client
    is starting a daemon just now), then let go of the lock. A successor waiting on the old
    file sees it gone and takes the new one (paths.lock)."""
    for path, held in ((paths.lock_path(config.socket), True),
                       (paths.start_lock_path(config.socket), False)):
        other = None if held else paths.lock(path, wait=False) if os.path.exists(path) else None
        if held or other is not None:
            try:
                os.unlink(path)
            except OSError:
                pass
        if other is not None:
            os.close(other)
    os.close(fd)


@dataclass
class State:
    """What a daemon starts from: its scheduler (with what was pending), journal, log dir, and
    the started ledger its runs note themselves in (see ``runner.RunProcess``)."""

    scheduler: Scheduler
    journal: Journal | None
    log_dir: str
    ledger: str | None = None


def restore(config: Config, clock: Clock) -> State:
    """Open the journal and take back what the previous daemon on this socket left."""
    if not config.journal:
        return State(Scheduler(clock.monotonic, wall=clock.wall, jobs=config.jobs), None, "")
    state_dir = config.state_dir
    digest = paths.socket_digest(config.socket)
    paths.check_private_dir(state_dir, "state directory", create=True, follow=True)
    log_dir = os.path.join(state_dir, "logs", digest)
    try:
        paths.check_private_dir(os.path.join(state_dir, "logs"), "log directory", create=True)
        paths.check_private_dir(log_dir, "log directory", create=True)
    except paths.PathError as exc:
        print(f"debounce: {exc}; runs will keep no logs", file=sys.stderr)
        log_dir = ""
    journal = Journal(state_dir, config.socket)
    try:
        journal.open()
        restored = journal.load()
    except JournalError as exc:
        raise DaemonError(str(exc)) from None
    scheduler = Scheduler(
        clock.monotonic, wall=clock.wall, jobs=config.jobs,
        first_id=restored.next_id, first_run_id=restored.next_run_id,
    )
    _put_back(scheduler, restored, clock)
    ledger = os.path.join(state_dir, f"started-{digest}")
    _settle(journal, scheduler, restored.unfinished, ledger, digest, clock)
    _remove_leftovers(log_dir, restored.next_run_id)
    return State(scheduler, journal, log_dir, ledger)


def _remove_leftovers(log_dir: str, next_run_id: int) -> None:
    """The ``$DEBOUNCE_BATCH`` files a killed daemon left (its runs' processes are gone by
    now, see _settle), and logs named for runs that do not exist yet (left beside a journal
    that was deleted): a run that writes nothing gets no file, and its empty log is made
    when asked only if no file of that name is there (``logfile.make_empty``), so such a file
    would be taken for its output. This socket's log directory is ours alone, and no run has
    started."""
    if not log_dir:
        return
    try:
        names = os.listdir(log_dir)
    except OSError:
        return
    for name in names:
        stem, _, suffix = name.partition(".")
        if name.startswith("batch-") or (
                suffix == "log" and stem.isdigit() and int(stem) >= next_run_id):
            try:
                os.unlink(os.path.join(log_dir, name))
            except OSError:
                pass


def _settle(journal: Journal, scheduler: Scheduler, unfinished: list[UnfinishedRun],
            ledger: str, digest: str, clock: Clock) -> None:
    """Runs not finished when the last daemon died: each started, or it never did.

    What is left of those that started is killed before anything else can start, and they
    are recorded ``lost``. Those that never started (no pid, no process, no line in the
    started ledger) are put back as pending, due at once, so every acknowledged invocation
    runs exactly once.
    """
    settled = True
    if unfinished:
        try:
            alive = kill_leftovers(digest, {run.run_id for run in unfinished})
        except Exception as exc:  # noqa: BLE001 - a start-up must never fail on this
            print(f"debounce: could not look for the processes of lost runs: {exc}",
                  file=sys.stderr)
            alive = {run.run_id for run in unfinished}
        ledger_says = read_ledger(ledger)
        started = ledger_says.started | alive | {run.run_id for run in unfinished if run.pid}
        ended = [(run.run_id, *ledger_says.ended[run.run_id]) for run in unfinished
                 if run.run_id in ledger_says.ended and run.run_id not in alive]
        done = {run_id for run_id, _code, _when in ended}
        lost = [run for run in unfinished if run.run_id not in done and (
                run.run_id in started or run.env is None or run.options is None)]
        again = [run for run in unfinished if run.run_id not in done and run not in lost]
        try:
            journal.settle([run.run_id for run in lost], ended)
        except JournalError as exc:
            # Serve what was restored anyway; new submissions are refused while this lasts.
            print(f"debounce: {exc}", file=sys.stderr)
            settled = False
        for run in again:
            _run_again(journal, scheduler, run, clock)
    try:
        journal.prune_envs()
    except JournalError as exc:
        print(f"debounce: {exc}", file=sys.stderr)
    if settled:  # every run the ledger could speak for is recorded: start it afresh
        try:
            with open(ledger, "wb"):
                pass
            os.chmod(ledger, 0o600)
        except OSError as exc:
            print(f"debounce: cannot write {ledger}: {exc.strerror}", file=sys.stderr)


def _run_again(journal: Journal, scheduler: Scheduler, run: UnfinishedRun, clock: Clock) -> None:
    """A run that never started: its invocation is pending again, due at once.

    If a later invocation of its key is pending too, that one stands for both, as it would
    have had the run not been started (the latest invocation wins). A ``--collect`` run comes
    back with its batch (the invocations it stood for), which goes ahead of the later one's.
    """
    assert run.env is not None and run.options is not None
    try:
        options = parse_options(run.options)
    except (ProtocolError, ValueError, TypeError) as exc:
        print(f"debounce: cannot run again a stored run of {run.key!r}: {exc}", file=sys.stderr)
        return
    journal.forget_runs([run.run_id])
    env = run.env
    batch = [Job(argv, run.cwd, env) for argv in run.batch] if run.batch else []
    # The stored argv of a --collect run may already be the collected command line: the
    # winner is the last invocation of the batch.
    job = Job(batch[-1].argv, run.cwd, env) if batch else Job(run.argv, run.cwd, env)
    ks = scheduler.keys.get(run.key)
    now = clock.monotonic()
    if ks is not None and ks.pending is not None:
        later = ks.pending
        later.coalesced += run.coalesced
        if later.options.collect:
            later.batch = [*(batch or [job]), *(later.batch or [later.payload])]
        if run.covered:  # the later one stands for the run's invocations too, oldest first
            later.covered = run.covered.then(later.covered or [later.id])
        journal.observe(later.state, later)
        return
    inv = scheduler.restore(
        run.invocation or scheduler.new_id(), run.key, options, job,
        received_at=now, due=now, first_at=now, coalesced=run.coalesced, leading_edge=False,
        batch=batch or None, covered=run.covered,
    )
    journal.observe(inv.state, inv)


def _put_back(scheduler: Scheduler, restored: Restored, clock: Clock) -> None:
    """Each pending invocation, due when it was due (the journal keeps wall-clock times)."""
    offset = clock.wall() - clock.monotonic()
    for row in restored.pending:
        env = row.env
        if env is None:
            print(f"debounce: the stored environment of {row.key!r} is missing; "
                  "it runs with the daemon's own", file=sys.stderr)
            env = dict(os.environ)
        try:
            options = parse_options(row.options)
        except (ProtocolError, ValueError, TypeError) as exc:
            print(f"debounce: dropping a stored invocation of {row.key!r}: {exc}",
                  file=sys.stderr)
            continue
        batch = [Job(argv, row.cwd, env) for argv in row.batch] if row.batch else None
        scheduler.restore(
            row.id, row.key, options, Job(row.argv, row.cwd, env),
            received_at=row.received_at - offset, due=row.due_at - offset,
            first_at=row.first_at - offset, coalesced=row.coalesced,
            leading_edge=row.leading_edge, batch=batch, covered=row.covered,
        )
