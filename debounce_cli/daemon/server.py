"""Serving: listen (a socket of our own or one systemd passed), signals, the ready word to
the client that started us, the stdin source, idle exit, and one ordered shutdown.
"""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import socket
import sys
from collections.abc import Callable
from typing import Any

from debounce_cli.clock import Clock
from debounce_cli.daemon.config import Config
from debounce_cli.daemon.connection import MAX_CONNECTIONS, Connection, ServerState
from debounce_cli.daemon.core import Core
from debounce_cli.daemon.handlers import Context
from debounce_cli.daemon.startup import State
from debounce_cli.daemon.stdin import StdinSource
from debounce_cli.scheduler import Run
from debounce_cli.states import EXITED

#: File descriptors kept for runs (pipes, logs), the journal and the listening socket.
RESERVED_FDS = 256
#: The soft limit of open files is raised to the hard one, up to this (runs inherit it, and
#: some programs loop over every possible descriptor).
FD_LIMIT_CEILING = 16384


def raise_fd_limit() -> int:
    """Raise the soft limit of open files towards the hard one; return the soft limit now."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    ceiling = FD_LIMIT_CEILING if hard == resource.RLIM_INFINITY else min(hard, FD_LIMIT_CEILING)
    if ceiling > soft:
        target = ceiling
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def connection_cap(fd_limit: int) -> int:
    """At most MAX_CONNECTIONS, and few enough that runs still find descriptors."""
    return max(16, min(MAX_CONNECTIONS, (fd_limit - RESERVED_FDS) // 2))


def _quiet_when_out_of_descriptors() -> Callable[[asyncio.AbstractEventLoop, dict[str, Any]],
                                                   None]:
    """An exception handler that says "out of file descriptors" once per burst, not once per
    refused accept with a traceback each (asyncio retries the accept every second)."""
    last = [0.0]

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE):
            now = loop.time()
            if now - last[0] >= 10.0:
                last[0] = now
                print(f"debounce: out of file descriptors ({exc.strerror}); new connections "
                      "wait until some close", file=sys.stderr, flush=True)
            return
        loop.default_exception_handler(context)

    return handler


class Server:
    """One daemon's life on its event loop, from listening to the last commit."""

    def __init__(self, config: Config, clock: Clock, start: State, serving_socket: bool) -> None:
        self.config = config
        self.clock = clock
        self.start = start
        self.serving_socket = serving_socket  # False: a stdin daemon whose socket is taken
        self.by_signal = False
        self.stdin: StdinSource | None = None
        #: A stdin daemon stopped early: what it stopped and left (said on stderr at exit).
        self.left: _Leftovers | None = None
        self.idle_timer: asyncio.TimerHandle | None = None

    async def serve(self) -> int:
        """Serve until stopped; return the process exit status."""
        loop = asyncio.get_running_loop()
        config = self.config
        self.stopped: asyncio.Future[None] = loop.create_future()
        self.core = core = Core(config, self.clock, loop, self.start.scheduler,
                                self.start.journal, log_dir=self.start.log_dir,
                                ledger=self.start.ledger)
        self.state = ServerState(loop, changed=self._check_idle,
                                 max_connections=connection_cap(raise_fd_limit()))
        loop.set_exception_handler(_quiet_when_out_of_descriptors())
        core.settled = self._check_idle
        self.fleet = None
        # First: an address that cannot be had stops the daemon before it listens or joins
        # the fleet (exit 1, naming the address).
        self.metrics_server: asyncio.Server | None = None
        if config.metrics_listen is not None:
            await self._serve_metrics(config.metrics_listen)
        if config.store is not None:
            from debounce_cli.daemon.fleet.coordinator import Fleet
            from debounce_cli.daemon.fleet.store import Store
            from debounce_cli.daemon.metrics import TimedStore

            fleet_logs = os.path.join(self.start.log_dir, "fleet") if self.start.log_dir else ""
            store = TimedStore(Store(config.store), core.metrics, config.host_id)
            self.fleet = Fleet(config, self.clock, loop, self.start.scheduler, fleet_logs,
                               apply=core.apply, changed=self._check_idle, store=store)
            core.slot_freed = self.fleet.slot_freed
            core.detached.append(self.fleet.detach)
            self.fleet.start()
        ctx = Context(core=core, jobs=config.jobs, shutdown=self.shutdown, fleet=self.fleet)
        self.server: asyncio.AbstractServer | None = None
        if config.listen_fd is not None:
            sock = socket.socket(fileno=config.listen_fd)
            sock.setblocking(False)
            self.server = await loop.create_unix_server(lambda: Connection(self.state, ctx),
                                                        sock=sock)
        elif self.serving_socket:
            old_umask = os.umask(0o177)
            try:
                self.server = await loop.create_unix_server(
                    lambda: Connection(self.state, ctx), path=config.socket)
            finally:
                os.umask(old_umask)
            os.chmod(config.socket, 0o600)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.shutdown, sig)
        if config.ready_fd is not None:
            try:
                os.write(config.ready_fd, b"ready\n")
                os.close(config.ready_fd)
            except OSError:
                pass
        if config.stdin:
            self.stdin = StdinSource(core, config.defaults)
            self.stdin.on_eof = self._check_idle
            self.stdin.fleet = self.fleet
            self.stdin.start(loop)
        core.apply([])  # the first turn sets the timer for what was restored
        await self.stopped
        await self._finish_shutdown()
        if self.stdin is not None and not self.by_signal:
            return 1 if self.stdin.waiter.failures else 0
        if self.stdin is not None and self.left is not None:
            return self._say_what_is_left(self.left)
        return 0

    async def _serve_metrics(self, address: str) -> None:
        """``--metrics-listen``: /metrics over HTTP, and the address on stderr (a port of 0
        is chosen by the kernel: this line says which)."""
        from debounce_cli.daemon.config import DaemonError
        from debounce_cli.daemon.metrics import serve_http, text_of
        from debounce_cli.options import parse_address

        host, port = parse_address(address)
        try:
            self.metrics_server = await serve_http(host, port,
                                                   lambda: text_of(self.core, self.fleet))
        except OSError as exc:
            raise DaemonError(f"cannot serve the metrics on {address}: "
                              f"{exc.strerror or exc}") from None
        for sock in self.metrics_server.sockets:
            name = sock.getsockname()
            shown = f"[{name[0]}]" if ":" in name[0] else name[0]
            print(f"debounce: metrics at http://{shown}:{name[1]}/metrics", file=sys.stderr,
                  flush=True)

    # ------------------------------------------------------------------ idle exit
    def _check_idle(self) -> None:
        if self.state.stopping or self.stopped.done():
            return
        if (self.core.busy() or self.state.connections
                or (self.fleet is not None and self.fleet.busy())):
            self._cancel_idle()
            return
        if self.stdin is not None:
            if not self.stdin.open:
                self._stop_now()  # end of input and all done
            return
        idle = self.config.idle_exit
        if idle and self.idle_timer is None:
            self.idle_timer = self.state.loop.call_later(idle, self._stop_now)

    def _cancel_idle(self) -> None:
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None

    # ------------------------------------------------------------------ shutdown
    def shutdown(self, sig: int | None = None) -> None:
        """SIGTERM, SIGINT or ``debounce stop``: stop accepting, stop runs, keep what is pending."""
        if self.state.stopping:
            return
        self.by_signal = True
        if self.stdin is not None:
            self.left = _Leftovers.of(self.core, sig)
        self.core.stop_runs()
        if self.fleet is not None:
            self.fleet.stop_runs()
        self._stop_now()

    def _stop_now(self) -> None:
        """Stop accepting at once; the rest of the shutdown (runs, journal) follows.

        The socket goes first, so a client arriving meanwhile starts the next daemon instead
        of being refused; that one takes over when this one has released the lock.
        """
        if not self.state.stopping:
            self.state.stopping = True
            if self.stdin is not None:
                self.stdin.stopping = True
            if self.server is not None:
                self.server.close()
            if self.metrics_server is not None:
                self.metrics_server.close()
            if self.serving_socket and self.config.listen_fd is None:
                try:
                    os.unlink(self.config.socket)
                except FileNotFoundError:
                    pass
        if not self.stopped.done():
            self.stopped.set_result(None)

    async def _finish_shutdown(self) -> None:
        """Wait for the runs to end (they were asked to stop), commit the last turn, close."""
        self._cancel_idle()
        await self.core.runs.wait_all()
        if self.fleet is not None:
            self.fleet.stop_runs()  # an idle exit or end of input: nothing of ours runs on
            await self.fleet.close()
        self.core.flush_now()
        self.core.close()

    # ------------------------------------------------------------------ stdin stopped early
    def _say_what_is_left(self, left: _Leftovers) -> int:
        """A stdin daemon stopped before its input was done: one line for the runs it stopped,
        one for the pending invocations it kept in the journal (and how to run or drop them)
        or dropped. The exit status is 128+N for signal N (130 for Ctrl-C, 143 for SIGTERM), 1
        for ``debounce stop``, when it stopped or dropped work; else 0, as any daemon stopped."""
        from debounce_cli import protocol

        def lines_of(items: list[tuple[str, int | None, list[str]]]) -> str:
            shown = []
            for key, line, argv in items[:3]:
                where = f"line {line}" if line is not None else f"key {protocol.shown(key)}"
                shown.append(f"{where}: {protocol.command_line(argv, 60)}")
            more = len(items) - len(shown)
            return "; ".join(shown) + (f"; and {more:,} more" if more else "")

        def say(text: str) -> None:
            print(f"debounce: {text}", file=sys.stderr, flush=True)

        left.settle()
        count = len(left.stopped)
        if count:
            say(f"stopped {count} run{'s' if count != 1 else ''} before it ended "
                f"({lines_of(left.stopped)})")
        count = len(left.pending)
        kept = self.config.journal and self.start.journal is not None
        if count:
            what = f"{count:,} pending invocation{'s' if count != 1 else ''}"
            if kept:
                from debounce_cli.durations import format_duration

                sock = protocol.shell_word(self.config.socket)
                key = (protocol.shell_word(left.pending[0][0]) if count == 1 else "KEY")
                them = "it" if count == 1 else "them"
                when = (f"the first falls due in {format_duration(left.first_due)}"
                        if left.first_due > 0 else "due now")
                say(f"kept {what} in the journal ({lines_of(left.pending)}); {when}: the next "
                    f"daemon on this socket runs {them} when due (any debounce command on it "
                    f"starts one, status too); run now: debounce flush --socket {sock} --key "
                    f"{key}; drop before due: debounce cancel --socket {sock} --key {key}")
            else:
                say(f"dropped {what}, never run ({lines_of(left.pending)}): --no-journal "
                    "keeps nothing")
        if left.stopped or (left.pending and not kept):
            return 128 + left.signal if left.signal else 1
        return 0


class _Leftovers:
    """What a stdin daemon leaves when it is stopped early: its runs executing and its pending
    invocations, each as (key, stdin line or None, argv)."""

    def __init__(self, signal: int | None) -> None:
        self.signal = signal
        self.stopped: list[tuple[str, int | None, list[str]]] = []
        self.pending: list[tuple[str, int | None, list[str]]] = []
        self.first_due = 0.0  # seconds from now until the first pending one falls due
        self.runs: list[Run] = []  # the runs of ``stopped``, in the same order until settled

    def settle(self) -> None:
        """Once the runs have ended: a run that ended with status 0 did its work (it may have
        exited by itself a moment before the stop reached it), so it was not stopped."""
        self.stopped = [item for item, run in zip(self.stopped, self.runs, strict=True)
                        if not (run.outcome == EXITED or run.exit_code == 0)]
        self.stopped.sort(key=lambda item: item[1] or 0)

    @classmethod
    def of(cls, core: Core, sig: int | None) -> _Leftovers:
        from debounce_cli.daemon.records import job_of

        left = cls(sig)
        now = core.clock.monotonic()
        dues = []
        for ks in core.scheduler.keys.values():
            if ks.running is not None:
                job = job_of(ks.running.invocation)
                left.stopped.append((ks.key, job.line, job.argv))
                left.runs.append(ks.running)
            if ks.pending is not None:
                job = job_of(ks.pending)
                left.pending.append((ks.key, job.line, job.argv))
                dues.append(ks.pending.due - now)
        left.first_due = max(0.0, min(dues, default=0.0))
        left.pending.sort(key=lambda item: item[1] or 0)
        return left
