"""The daemon, one job a file:

========== ==========================================================================
config     what a daemon is told (``Config``) and how it says it cannot start
startup    the socket's lock, a stale socket, the journal restored into a scheduler
server     listening, signals, the ready word, idle exit, one ordered shutdown
connection one client: framing, hello, timeouts, peer check, answers in order
handlers   one function per request
core       scheduler + journal + group commit + carrying out effects
runs       processes: spawn, logs, output fan-out, exit, retention
records    scheduler objects as protocol records and messages
jobs       what an invocation carries, validated and shared at the edge
waiters    the interfaces the core delivers to
stdin      ``--stdin``: lines in, output out
========== ==========================================================================
"""

from __future__ import annotations

import asyncio
import os
import sys

from debounce_cli.clock import Clock, SkewedClock, SystemClock
from debounce_cli.daemon.config import AlreadyRunning, Config, DaemonError

__all__ = ["AlreadyRunning", "Config", "DaemonError", "run_daemon"]


def run_daemon(config: Config) -> int:
    """Entry point of ``debounce daemon``: returns the exit status."""
    from debounce_cli.daemon import startup
    from debounce_cli.daemon.server import Server
    from debounce_cli.runner import start_spawner

    serving_socket = True
    lock_fd = None
    try:
        lock_fd = startup.acquire(config)
    except AlreadyRunning as exc:
        if not config.stdin:
            raise
        # The other daemon owns this socket's journal; this one keeps its lines in memory.
        config.journal = False
        serving_socket = False
        print(f"debounce: {exc}; reading stdin without a socket or journal", file=sys.stderr)
    clock: Clock = SystemClock() if not config.clock_skew else SkewedClock(config.clock_skew)
    start = startup.restore(config, clock)
    start_spawner()  # now, not in the middle of the first run's start
    if sys.version_info < (3, 12) and hasattr(os, "pidfd_open"):
        # 3.11 watches each child with a thread of its own; a pidfd is one file descriptor in
        # the loop instead (3.12 does this by itself).
        try:
            os.close(os.pidfd_open(os.getpid()))
            asyncio.set_child_watcher(asyncio.PidfdChildWatcher())
        except OSError:
            pass
    try:
        return asyncio.run(Server(config, clock, start, serving_socket).serve())
    finally:
        if lock_fd is not None:
            startup.release(config, lock_fd)  # last: a successor may take over from here
