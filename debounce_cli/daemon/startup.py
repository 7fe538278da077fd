"""Before serving: take the socket's lock, replace a stale socket, restore the journal.

Start-up takes a lock file beside the socket before touching the socket, so two daemons racing
for one socket end with exactly one serving; the loser sees the lock held and leaves. A socket
file without a lock holder is stale (its daemon died) and is replaced.
"""

from __future__ import annotations

import fcntl
import os
import stat
import sys
import time
from dataclasses import dataclass

from debounce_cli import paths
from debounce_cli.clock import Clock
from debounce_cli.daemon.config import AlreadyRunning, Config, DaemonError
from debounce_cli.daemon.jobs import Job, parse_options
from debounce_cli.journal import Journal, JournalError, Restored
from debounce_cli.protocol import ProtocolError
from debounce_cli.runner import kill_leftovers
from debounce_cli.scheduler import Scheduler

#: How long an auto-started daemon waits for a previous one that is still shutting down.
LOCK_PATIENCE = 30.0


def acquire(config: Config) -> int:
    """Take the socket's lock and replace a stale socket; return the lock's descriptor.

    Raises AlreadyRunning if another daemon serves the socket.
    """
    sock = config.socket
    paths.socket_dir_check(sock, create=True)
    fd = os.open(paths.lock_path(sock), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    # An auto-started daemon may find the previous one still finishing (it has stopped
    # listening and is stopping its runs): it waits to take over. By hand, it says so.
    patience = LOCK_PATIENCE if config.ready_fd is not None else 0.0
    deadline = time.monotonic() + patience
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                raise AlreadyRunning(f"another debounce daemon already serves {sock}") from None
            time.sleep(0.05)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    if config.listen_fd is None and os.path.lexists(sock):
        if not stat.S_ISSOCK(os.lstat(sock).st_mode):
            os.close(fd)
            raise DaemonError(f"{sock} exists and is not a socket; choose another --socket")
        # The lock is ours, so no live daemon of ours serves this socket: it is stale.
        os.unlink(sock)
    return fd


@dataclass
class State:
    """What a daemon starts from: its scheduler (with what was pending), journal, log dir."""

    scheduler: Scheduler
    journal: Journal | None
    log_dir: str


def restore(config: Config, clock: Clock) -> State:
    """Open the journal and take back what the previous daemon on this socket left."""
    if not config.journal:
        return State(Scheduler(clock.monotonic, wall=clock.wall, jobs=config.jobs), None, "")
    state_dir = config.state_dir
    paths.check_private_dir(state_dir, "state directory", create=True)
    log_dir = os.path.join(state_dir, "logs", paths.socket_digest(config.socket))
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
    _bury_lost(journal, restored)
    scheduler = Scheduler(
        clock.monotonic, wall=clock.wall, jobs=config.jobs,
        first_id=restored.next_id, first_run_id=restored.next_run_id,
    )
    _put_back(scheduler, restored, clock)
    return State(scheduler, journal, log_dir)


def _bury_lost(journal: Journal, restored: Restored) -> None:
    """Runs that were executing when the last daemon died: kill what is left, record lost."""
    for run in restored.lost:
        kill_leftovers(run.pid, run.run_id, run.key)
    try:
        if restored.lost:
            journal.mark_lost([run.run_id for run in restored.lost])
        journal.prune_envs()
    except JournalError as exc:
        # Serve what was restored anyway; new submissions are refused while this lasts.
        print(f"debounce: {exc}", file=sys.stderr)


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
        scheduler.restore(
            row.id, row.key, options, Job(row.argv, row.cwd, env),
            received_at=row.received_at - offset, due=row.due_at - offset,
            first_at=row.first_at - offset, coalesced=row.coalesced,
            leading_edge=row.leading_edge,
        )
