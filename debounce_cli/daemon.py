"""The daemon: socket and stdin sources feed the scheduler; its effects drive the runner.

One asyncio loop does everything. After each event the scheduler is asked for its next deadline
and a single timer is set for it, so an idle daemon sleeps in ``epoll_wait`` with nothing to do.

Durability follows one rule: change the scheduler, commit the journal, then act. Effects
(starting a process, answering a client) wait in an outbox until the end of the loop's turn,
when one commit covers every change made in that turn (group commit). A client is told its
invocation was accepted only after the commit that holds it, and a process starts only after
the commit that records its run, so after a crash the journal never promises less than the
clients were told and never forgets a run that started.

Start-up takes a lock file beside the socket before touching the socket, so two daemons racing
for one socket end with exactly one serving; the loser sees the lock held and leaves. A socket
file without a lock holder is stale (its daemon died) and is replaced.
"""

from __future__ import annotations

import asyncio
import binascii
import fcntl
import os
import shlex
import signal
import socket
import sqlite3
import stat
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from debounce_cli import keys, paths, protocol
from debounce_cli.durations import DurationError, parse_duration
from debounce_cli.journal import LOST, Journal, JournalError
from debounce_cli.logfile import LogWriter, read_log
from debounce_cli.protocol import ProtocolError
from debounce_cli.runner import RunProcess, _pdeathsig_prefix, kill_leftovers
from debounce_cli.scheduler import (
    Cancelled,
    Invocation,
    Joined,
    Options,
    Run,
    RunFinished,
    Scheduler,
    SignalRun,
    StartRun,
    Updated,
)

#: A connection must send its hello and request within this many seconds.
READ_TIMEOUT = 10.0
#: At most this many connections at once; more are refused with a clear error.
MAX_CONNECTIONS = 1024
#: Unsent output a waiting client may fall behind by before its copy stops (see output()).
OUTPUT_BACKLOG = 16 * 1024 * 1024
#: How long an auto-started daemon waits for a previous one that is still shutting down.
LOCK_PATIENCE = 30.0
#: Output kept in memory for clients joining a run that has no log (--no-journal).
REPLAY_BUFFER = 8 * 1024 * 1024
#: Processes started per turn of the event loop, at most (see Daemon._spawn_some).
SPAWNS_PER_TURN = 8
#: Finished runs kept in memory for `debounce wait` and `status` ("last result").
RECENT_RUNS = 1000


class DaemonError(Exception):
    """The daemon cannot start; the message says why and what to do."""


class AlreadyRunning(DaemonError):
    """Another daemon holds the socket's lock."""


@dataclass(eq=False, slots=True)
class Job:
    """What the scheduler calls an invocation's payload: everything needed to run it."""

    argv: list[str]
    cwd: str
    env: dict[str, str]
    pid: int | None = None
    log_path: str | None = None


@dataclass(eq=False)
class Config:
    socket: str
    state_dir: str = ""
    jobs: int | None = None
    idle_exit: float | None = 600.0
    stdin: bool = False
    defaults: dict[str, Any] = field(default_factory=dict)  # options and "key" for stdin lines
    ready_fd: int | None = None
    journal: bool = True
    keep_logs: int = 10  # per key
    keep_logs_total: int = 1000
    keep_history: int = 10000
    listen_fd: int | None = None  # a listening socket handed over (systemd socket activation)


# ------------------------------------------------------------------ waiters
class Connection(asyncio.Protocol):
    """One client connection: request lines in, answers out, in order.

    A connection carries one-shot requests one after the other; a request whose answer waits
    for the journal commit holds back the lines after it, so answers never overtake each
    other. A request that waits for a run (``run`` with ``wait``, ``wait``) makes the
    connection a waiter of that run, and its last request: the scheduler moves it along the
    chain of replacements like any waiter, and the run's events go down the socket. Until the
    client has been told its invocation was accepted, those events are held back, so the
    client always reads ``accepted`` first.

    A connection that says nothing for ``READ_TIMEOUT`` seconds between requests is closed.
    """

    def __init__(self, daemon: Daemon):
        self.daemon = daemon
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.greeted = False
        self.owed = False  # an answer waits for the commit; later lines wait for it
        self.waiting = False  # waits for a run: no more requests on this connection
        self.acked = True
        self.held: list[bytes] = []
        self.closed = False
        self.finishing = False  # the waiter's last message is out (or held): close after it
        self.eof = False
        self.output_dropped = False
        self.run_id: int | None = None  # the run whose output this waiter gets
        self.timer: asyncio.TimerHandle | None = None
        self.active = 0.0  # loop time of the last request or answer

    # ---------------------------------------------------------------- asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        daemon = self.daemon
        daemon.connections += 1
        daemon._cancel_idle()
        if not _peer_allowed(transport):
            self.refuse("permission denied: this daemon serves only its owner's uid", "refused")
        elif daemon.connections > MAX_CONNECTIONS:
            self.refuse("too many connections; try again", "refused")
        else:
            self._arm()

    def data_received(self, data: bytes) -> None:
        if self.closed or self.waiting:
            return  # a waiting client has nothing more to say; only its going away counts
        self.buffer += data
        self._process()

    def eof_received(self) -> bool:
        if self.waiting:
            self._gone()  # the client went away (Ctrl-C): stop waiting, the run goes on
            return False
        self.eof = True  # the client has said all it will; answer what it asked, then close
        if not self.owed:
            self.close()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._gone()
        self._disarm()
        self.daemon.connections -= 1
        self.daemon._after()

    # ---------------------------------------------------------------- requests
    def _process(self) -> None:
        while not (self.owed or self.waiting or self.closed):
            newline = self.buffer.find(b"\n")
            if newline < 0:
                if len(self.buffer) > protocol.MAX_MESSAGE:
                    self.refuse(f"message exceeds the limit of {protocol.MAX_MESSAGE} bytes")
                return
            line = bytes(self.buffer[: newline + 1])
            del self.buffer[: newline + 1]
            self._arm()
            try:
                request = protocol.decode(line, protocol.REQUESTS)
            except ProtocolError as exc:
                self.refuse(str(exc))
                return
            try:
                self._request(request)
            except Exception as exc:  # noqa: BLE001 - one bad request must not end the daemon
                import traceback

                traceback.print_exc()
                self.refuse(f"internal error: {type(exc).__name__}: {exc}", "refused")
                return

    def _request(self, request: protocol.Message) -> None:
        daemon = self.daemon
        if not self.greeted:
            if not isinstance(request, protocol.Hello):
                self.refuse("expected a hello message first")
            elif request.version != protocol.VERSION:
                self.refuse(
                    f"protocol version {request.version} is not supported by this daemon "
                    f"(version {protocol.VERSION}); run 'debounce stop' and retry",
                    "refused",
                )
            else:
                self.greeted = True
                self.write(protocol.HelloReply(pid=os.getpid()))
            return
        if daemon.stopping:
            self.refuse("the daemon is shutting down; retry", "refused")
        elif isinstance(request, protocol.RunRequest):
            daemon.handle_run(self, request)
        elif isinstance(request, protocol.WaitRequest):
            daemon.handle_wait(self, request)
        elif isinstance(request, protocol.StatusRequest):
            self.write(daemon.handle_status())
        elif isinstance(request, protocol.HistoryRequest):
            self.write(daemon.handle_history(request))
        elif isinstance(request, protocol.LogsRequest):
            self.write(daemon.handle_logs(request))
        elif isinstance(request, protocol.FlushRequest):
            found, effects = daemon.scheduler.flush(request.key)
            daemon._apply(effects)
            self.write(_done(found, request.key, "flushed"))
        elif isinstance(request, protocol.CancelRequest):
            found, effects = daemon.scheduler.cancel(request.key)
            daemon._apply(effects)
            self.write(_done(found, request.key, "cancelled"))
        elif isinstance(request, protocol.StopRequest):
            self.write(protocol.Done(ok=True, message="stopping"))
            self.close()
            daemon.shutdown()
        else:
            self.refuse(f"{request.type} is not a request")

    def answered(self, msg: protocol.Message) -> None:
        """The answer owed after the commit: send it, then go on with the lines held back."""
        self.owed = False
        if self.waiting:
            if isinstance(msg, protocol.Error):
                self.refuse(msg.message, msg.code)
                self.daemon.scheduler.detach(self)
                return
            self.acked = True
            self.write(msg)
            held, self.held = self.held, []
            for line in held:
                self.raw(line)
            if self.finishing:
                self.close()
            return
        self.write(msg)
        self._arm()
        self._process()
        if self.eof and not self.owed:
            self.close()

    # ---------------------------------------------------------------- waiter interface
    def send(self, msg: protocol.Message) -> None:
        self.raw(protocol.encode(msg))

    def raw(self, line: bytes) -> None:
        if self.closed:
            return
        if not self.acked:
            self.held.append(line)
            return
        assert self.transport is not None
        self.transport.write(line)

    def follows(self, run_id: int) -> bool:
        """Has this waiter been told the run started (and so gets its output live)?"""
        return self.run_id == run_id

    def start(self, run_id: int, line: bytes) -> None:
        self.run_id = run_id
        self.raw(line)

    def output(self, fd: int, data: bytes, line: bytes) -> None:
        """A chunk of the run's output, unless this client has fallen too far behind.

        A client that stops reading (a pager, a suspended terminal) must not make the daemon
        hold the whole output in memory: past OUTPUT_BACKLOG unsent bytes its copy stops, it
        is told so at the end, and the full output stays in the run's log.
        """
        transport = self.transport
        if transport is not None and transport.get_write_buffer_size() > OUTPUT_BACKLOG:
            self.output_dropped = True
            return
        self.raw(line)

    def finish(self, msg: protocol.Message) -> None:
        """The run's result (or its cancellation): the waiter's last message."""
        self.finishing = True
        if self.output_dropped and isinstance(msg, protocol.Finished):
            note = (f"debounce: this client read too slowly and missed some of the output; "
                    f"'debounce logs {msg.run_id}' has all of it\n").encode()
            self.raw(_output_line(2, note))
        self.send(msg)
        if self.acked:
            self.close()

    # ---------------------------------------------------------------- helpers
    def write(self, msg: protocol.Message) -> None:
        if not self.closed and self.transport is not None:
            self.transport.write(protocol.encode(msg))

    def refuse(self, message: str, code: str = "bad_request") -> None:
        """Answer with an error and close: used for anything malformed or not allowed."""
        self.write(protocol.Error(message=message, code=code))
        self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._disarm()
            if self.transport is not None:
                self.transport.close()  # after what was written has been sent

    def wait_for_runs(self, acked: bool) -> None:
        """From now on this connection is a waiter; it stops reading requests."""
        self.waiting = True
        self.acked = acked
        self._disarm()

    def _gone(self) -> None:
        if not self.closed:
            self.closed = True
            if self.waiting:
                self.daemon.scheduler.detach(self)  # Ctrl-C: the invocation stays

    def _arm(self) -> None:
        """Note activity. One timer per connection checks it, so requests never touch timers."""
        loop = self.daemon.loop
        self.active = loop.time()
        if self.timer is None and not (self.waiting or self.closed):
            self.timer = loop.call_at(self.active + READ_TIMEOUT, self._timed_out)

    def _disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _timed_out(self) -> None:
        self.timer = None
        if self.owed or self.waiting or self.closed:
            return
        loop = self.daemon.loop
        if loop.time() - self.active >= READ_TIMEOUT:
            self.refuse(f"no request within {READ_TIMEOUT:g}s; closing")
        else:
            self.timer = loop.call_at(self.active + READ_TIMEOUT, self._timed_out)


def _peer_allowed(transport: asyncio.BaseTransport) -> bool:
    """The kernel's word on who connected (SO_PEERCRED): only our own uid gets in."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return False
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return False
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid == os.getuid()


def _done(found: bool, key: str, verb: str) -> protocol.Message:
    if found:
        return protocol.Done(ok=True, message=f"{verb} {key}")
    return protocol.Error(message=f"nothing is pending for key {key!r}", code="not_found")


class StdinWaiter:
    """Invocations read from stdin: their runs' output goes to the daemon's own stdout/stderr."""

    def __init__(self) -> None:
        self.failures = 0
        self.runs: set[int] = set()  # runs whose output goes to stdout/stderr now

    def send(self, msg: protocol.Message) -> None:
        pass

    def raw(self, line: bytes) -> None:
        pass

    def follows(self, run_id: int) -> bool:
        return run_id in self.runs

    def start(self, run_id: int, line: bytes) -> None:
        self.runs.add(run_id)

    def output(self, fd: int, data: bytes, line: bytes) -> None:
        stream = sys.stdout.buffer if fd == 1 else sys.stderr.buffer
        try:
            stream.write(data)
            stream.flush()
        except (OSError, ValueError):
            pass

    def finish(self, msg: protocol.Message) -> None:
        if isinstance(msg, protocol.Finished):
            self.runs.discard(msg.run_id)
        if isinstance(msg, protocol.Finished) and msg.exit_code != 0:
            self.failures += 1
        elif isinstance(msg, protocol.Cancelled):
            self.failures += 1


def _unique(waiters: Iterable[Any]) -> list[Any]:
    """One delivery per waiter, even when it stands for several coalesced invocations."""
    return list(dict.fromkeys(waiters))


@dataclass(eq=False, slots=True)
class Ack:
    """An answer owed to a submitter once the turn's commit is done."""

    invocation: Invocation
    connection: Connection | None
    line: int | None = None  # stdin line number


# ------------------------------------------------------------------ the daemon
class Daemon:
    def __init__(self, config: Config):
        self.config = config
        self.journal: Journal | None = None
        self.scheduler = Scheduler(time.monotonic, wall=time.time, jobs=config.jobs)
        self.procs: dict[int, RunProcess] = {}
        self.logs: dict[int, LogWriter] = {}
        self.buffers: dict[int, list[tuple[int, bytes]]] = {}  # output of runs without a log
        self.connections = 0
        self.server: asyncio.AbstractServer | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.idle_timer: asyncio.TimerHandle | None = None
        self.stopping = False
        self.by_signal = False
        self.stopped: asyncio.Future[None] | None = None
        self.stdin_waiter = StdinWaiter() if config.stdin else None
        self.stdin_open = config.stdin
        self.lock_fd: int | None = None
        self.serving_socket = False
        self.tasks: set[asyncio.Task[Any]] = set()
        self.recent: dict[int, Run] = {}  # finished runs by id, oldest first
        self.last_by_key: dict[str, Run] = {}
        self.outbox: list[Any] = []
        self.acks: list[Ack] = []
        self.flush_handle: asyncio.Handle | None = None
        self.log_dir = ""
        self.shared = Shared()
        self.retention_due = False
        self.runs_since_prune = 0
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]  # set by serve
        self.to_spawn: deque[tuple[Run, RunProcess]] = deque()

    # -------------------------------------------------------------- start-up
    def acquire(self) -> None:
        """Take the socket's lock and replace a stale socket; raise if another daemon serves."""
        sock = self.config.socket
        paths.socket_dir_check(sock, create=True)
        lock_path = sock + ".lock"
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        # An auto-started daemon may find the previous one still finishing (it has stopped
        # listening and is stopping its runs): it waits to take over. By hand, it says so.
        patience = LOCK_PATIENCE if self.config.ready_fd is not None else 0.0
        deadline = time.monotonic() + patience
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise AlreadyRunning(
                        f"another debounce daemon already serves {sock}"
                    ) from None
                time.sleep(0.05)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.lock_fd = fd
        if self.config.listen_fd is None and os.path.lexists(sock):
            if not stat.S_ISSOCK(os.lstat(sock).st_mode):
                os.close(fd)
                self.lock_fd = None
                raise DaemonError(f"{sock} exists and is not a socket; choose another --socket")
            # The lock is ours, so no live daemon of ours serves this socket: it is stale.
            os.unlink(sock)

    def restore(self) -> None:
        """Open the journal and take back what the previous daemon on this socket left."""
        if not self.config.journal:
            return
        state = self.config.state_dir
        paths.check_private_dir(state, "state directory", create=True)
        digest = paths.socket_digest(self.config.socket)
        self.log_dir = os.path.join(state, "logs", digest)
        try:
            paths.check_private_dir(os.path.join(state, "logs"), "log directory", create=True)
            paths.check_private_dir(self.log_dir, "log directory", create=True)
        except paths.PathError as exc:
            print(f"debounce: {exc}; runs will keep no logs", file=sys.stderr)
            self.log_dir = ""
        journal = Journal(state, self.config.socket)
        try:
            journal.open()
            restored = journal.load()
        except JournalError as exc:
            raise DaemonError(str(exc)) from None
        self.journal = journal
        if restored.lost:
            for run in restored.lost:
                kill_leftovers(run["pid"], run["run_id"], run["key"])
        try:
            if restored.lost:
                journal.mark_lost([run["run_id"] for run in restored.lost])
            journal.prune_envs()
        except (JournalError, sqlite3.Error) as exc:
            # Serve what was restored anyway; new submissions are refused while this lasts.
            journal.broken = journal.broken or str(exc)
            print(f"debounce: {journal.broken}", file=sys.stderr)
        self.scheduler = Scheduler(
            time.monotonic, wall=time.time, jobs=self.config.jobs, observer=journal.observe,
            first_id=restored.next_id, first_run_id=restored.next_run_id,
        )
        offset = time.time() - time.monotonic()
        for row in restored.pending:
            if row["env"] is None:
                print(f"debounce: the stored environment of {row['key']!r} is missing; "
                      "it runs with the daemon's own", file=sys.stderr)
                row["env"] = dict(os.environ)
            try:
                options = _options(row["options"])
            except (ProtocolError, ValueError, TypeError) as exc:
                print(f"debounce: dropping a stored invocation of {row['key']!r}: {exc}",
                      file=sys.stderr)
                continue
            self.scheduler.restore(
                row["id"], row["key"], options, Job(row["argv"], row["cwd"], row["env"]),
                received_at=row["received_at"] - offset, due=row["due_at"] - offset,
                first_at=row["first_at"] - offset, coalesced=row["coalesced"],
                leading_edge=row["leading_edge"],
            )
        journal.dirty_keys.clear()  # restored rows are already stored as they are

    async def serve(self) -> int:
        """Serve until stopped; return the process exit status."""
        loop = self.loop = asyncio.get_running_loop()
        self.stopped = loop.create_future()
        if self.config.listen_fd is not None:
            sock = socket.socket(fileno=self.config.listen_fd)
            sock.setblocking(False)
            self.server = await loop.create_unix_server(lambda: Connection(self), sock=sock)
        elif self.serving_socket:
            old_umask = os.umask(0o177)
            try:
                self.server = await loop.create_unix_server(
                    lambda: Connection(self), path=self.config.socket
                )
            finally:
                os.umask(old_umask)
            os.chmod(self.config.socket, 0o600)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.shutdown)
        if self.config.ready_fd is not None:
            try:
                os.write(self.config.ready_fd, b"ready\n")
                os.close(self.config.ready_fd)
            except OSError:
                pass
        if self.config.stdin:
            self._start_stdin_reader(loop)
        self._after()
        await self.stopped
        await self._finish_shutdown()
        if self.stdin_waiter is not None and not self.by_signal:
            return 1 if self.stdin_waiter.failures else 0
        return 0

    # -------------------------------------------------------------- requests
    def handle_run(self, conn: Connection, req: protocol.RunRequest) -> None:
        try:
            options = self.shared.options(req.options)
            _check_job(req.argv, req.cwd, req.key)
        except (ProtocolError, ValueError) as exc:
            conn.refuse(str(exc))
            return
        refusal = self._refusal()
        if refusal:
            conn.refuse(refusal, "refused")
            return
        conn.owed = True
        if req.wait:
            conn.wait_for_runs(acked=False)
        job = Job(self.shared.argv(req.argv), sys.intern(req.cwd), self.shared.env(req.env))
        self.submit(req.key, options, job, conn if req.wait else None, conn=conn)

    def _refusal(self) -> str | None:
        """Why new submissions cannot be accepted now, if they cannot."""
        journal = self.journal
        if journal is not None and journal.broken and not journal.probe():
            return f"cannot store new invocations: {journal.broken}"
        return None

    def handle_wait(self, conn: Connection, req: protocol.WaitRequest) -> None:
        target = self._find(req.target)
        if target is None:
            finished = self._finished_from_journal(req.target)
            if finished is not None:
                conn.write(finished)
                conn.close()
            else:
                conn.refuse(f"no key or run {req.target!r} pending, running or finished",
                            "not_found")
            return
        conn.wait_for_runs(acked=True)
        if isinstance(target, Invocation):
            conn.send(self._pending_msg(target))
        self._apply(self.scheduler.attach(target, conn))

    def _find(self, target: str) -> Invocation | Run | None:
        """What ``debounce wait TARGET`` follows: pending, else running, else the last result."""
        ks = self.scheduler.keys.get(target)
        if ks is not None and (ks.pending or ks.running):
            return ks.pending or ks.running
        if target in self.last_by_key:
            return self.last_by_key[target]
        run_id = _run_id(target)
        if run_id is not None:
            return self.scheduler.runs.get(run_id) or self.recent.get(run_id)
        return None

    def _stored_run(self, target: str) -> dict[str, Any] | None:
        """The journal's latest finished run of key ``target``, else its run of that id."""
        if self.journal is None:
            return None
        row = self.journal.finished_run(key=target)
        if row is None and _run_id(target) is not None:
            row = self.journal.finished_run(run_id=_run_id(target))
        return row

    def _finished_from_journal(self, target: str) -> protocol.Finished | None:
        row = self._stored_run(target)
        if row is None:
            return None
        return protocol.Finished(
            run_id=row["run_id"], invocation=row["invocation"] or 0, key=row["key"],
            argv=row["argv"],
            exit_code=row["exit_code"] if row["exit_code"] is not None else -1,
            coalesced=row["coalesced"], started_at=row["started_at"],
            finished_at=row["finished_at"], outcome=row["outcome"] or LOST,
        )

    def _remember(self, run: Run) -> None:
        if run.id in self.recent:
            return
        self.recent[run.id] = run
        self.last_by_key[run.key] = run
        while len(self.recent) > RECENT_RUNS:
            old = self.recent.pop(next(iter(self.recent)))
            if self.last_by_key.get(old.key) is old:
                del self.last_by_key[old.key]

    def submit(
        self,
        key: str,
        options: Options,
        job: Job,
        waiter: Any,
        conn: Connection | None = None,
        line: int | None = None,
    ) -> Invocation:
        """Hand an invocation to the scheduler; its answer goes out after the commit."""
        inv, effects = self.scheduler.submit(key, options, job, waiter)
        self.acks.append(Ack(inv, conn, line))
        self._apply(effects)
        return inv

    def _accepted_msg(self, inv: Invocation) -> protocol.Accepted:
        head = inv.head()
        if head.run is not None:
            return protocol.Accepted(
                id=inv.id, key=head.key, state=head.run.state, due_in=None,
                coalesced=head.run.coalesced,
            )
        return protocol.Accepted(
            id=inv.id, key=head.key, state=head.state, due_in=self._due_in(head),
            coalesced=head.coalesced,
        )

    def handle_status(self) -> protocol.StatusReply:
        now = time.monotonic()
        rows = []
        for ks in self.scheduler.keys.values():
            if ks.pending is None and ks.running is None:
                continue
            row: dict[str, Any] = {"key": ks.key, "pending": None, "running": None}
            if ks.pending is not None:
                inv = ks.pending
                row["pending"] = {
                    "id": inv.id,
                    "argv": inv.payload.argv,
                    "cwd": inv.payload.cwd,
                    "state": inv.state,
                    "due_in": max(0.0, inv.due - now),
                    "coalesced": inv.coalesced,
                }
            if ks.running is not None:
                run = ks.running
                row["running"] = {
                    "run_id": run.id,
                    "argv": run.invocation.payload.argv,
                    "started_at": run.started_wall,
                    "coalesced": run.coalesced,
                    "stopping": run.stop_reason,
                }
            last = self.last_by_key.get(ks.key)
            row["last"] = None if last is None else {
                "run_id": last.id, "exit_code": last.exit_code, "finished_at": last.finished_wall,
            }
            rows.append(row)
        rows.sort(key=lambda r: r["key"])
        return protocol.StatusReply(keys=rows, pid=os.getpid(), jobs=self.config.jobs)

    def handle_history(self, req: protocol.HistoryRequest) -> protocol.Message:
        if self.journal is not None:
            runs = self.journal.history(req.key, max(0, req.limit))
            for run in runs:
                run.pop("log_path", None)
            return protocol.HistoryReply(runs=runs)
        rows = [r for r in reversed(self.recent.values()) if req.key in (None, r.key)]
        return protocol.HistoryReply(runs=[_run_dict(r) for r in rows[: max(0, req.limit)]])

    def handle_logs(self, req: protocol.LogsRequest) -> protocol.Message:
        target = req.target
        ks = self.scheduler.keys.get(target)
        run = ks.running if ks is not None else None
        if run is None and _run_id(target) is not None:
            run = self.scheduler.runs.get(_run_id(target))
        if run is not None:
            return protocol.LogsReply(run_id=run.id, key=run.key,
                                      log_path=run.invocation.payload.log_path, running=True)
        row = self._stored_run(target)
        if row is None:
            return protocol.Error(message=f"no run of key or id {target!r} is known",
                                  code="not_found")
        if not row["log_path"]:
            return protocol.Error(
                message=f"the log of run {row['run_id']} is no longer kept", code="not_found")
        return protocol.LogsReply(run_id=row["run_id"], key=row["key"],
                                  log_path=row["log_path"], running=False)

    # -------------------------------------------------------------- effects and commits
    def _apply(self, effects: list[Any]) -> None:
        """Queue effects until the end of this turn of the loop, when the commit is done."""
        self.outbox.extend(effects)
        if self.flush_handle is None:
            self.flush_handle = self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Commit what changed in this turn, then answer submitters and carry out effects."""
        self.flush_handle = None
        failure = None
        if self.journal is not None:
            try:
                self.journal.commit(self.scheduler, time.time() - time.monotonic())
            except JournalError as exc:
                failure = str(exc)
        # Only what this commit covers is acted on: answering a client may read its next
        # request, whose effects wait for the next commit.
        acks, self.acks = self.acks, []
        effects, self.outbox = self.outbox, []
        refused = set()
        if failure is not None:
            for ack in reversed(acks):  # newest first, so each one's predecessor is back
                if self.scheduler.withdraw(ack.invocation, ack.connection):
                    refused.add(ack)
        for ack in acks:
            self._answer(ack, failure if ack in refused else None)
        if failure is None and self.retention_due:
            self.retention_due = False
            self._retain()
        for effect in effects:
            self._carry_out(effect)
        self._after()

    def _answer(self, ack: Ack, failure: str | None) -> None:
        """Tell a submitter: accepted, or refused (``failure``) and already taken back."""
        inv = ack.invocation
        inv.replaced = inv.joined = None  # only needed to take it back; let the chain go
        if failure is None:
            msg: protocol.Message = self._accepted_msg(inv)
        else:
            msg = protocol.Error(message=f"cannot store the invocation: {failure}",
                                 code="refused")
            if ack.line is not None:
                print(f"debounce: stdin line {ack.line}: {msg.message}", file=sys.stderr,
                      flush=True)
                if self.stdin_waiter is not None:
                    self.stdin_waiter.failures += 1
        if ack.connection is not None:
            ack.connection.answered(msg)

    def _carry_out(self, effect: Any) -> None:
        if isinstance(effect, StartRun):
            self._start(effect.run)
        elif isinstance(effect, SignalRun):
            proc = self.procs.get(effect.run.id)
            if proc is not None:
                proc.signal(effect.signal)
        elif isinstance(effect, RunFinished):
            self._remember(effect.run)
            msg = self._finished_msg(effect.run)
            for waiter in _unique(effect.waiters):
                waiter.finish(msg)
        elif isinstance(effect, Joined):
            # Output that came between joining and now was not sent live (the waiter did not
            # follow the run yet): the replay from the log covers it, once.
            run = effect.run
            joining = [w for w in _unique(effect.waiters) if not w.follows(run.id)]
            if joining:
                started = protocol.encode(self._started_msg(run))
                for waiter in joining:
                    waiter.start(run.id, started)
                for fd, data in self._output_so_far(run):
                    line = _output_line(fd, data)
                    for waiter in joining:
                        waiter.output(fd, data, line)
        elif isinstance(effect, Updated):
            if effect.invocation.waiters:  # --no-wait submissions have nobody to tell
                line = protocol.encode(self._pending_msg(effect.invocation))
                for waiter in _unique(effect.invocation.waiters):
                    waiter.raw(line)
        elif isinstance(effect, Cancelled):
            cancelled = protocol.Cancelled(key=effect.invocation.key)
            for waiter in _unique(effect.waiters):
                waiter.finish(cancelled)

    def _after(self) -> None:
        """Set the one timer for the scheduler's next deadline; manage idle exit."""
        deadline = self.scheduler.next_deadline()
        timer = self.timer
        if timer is not None and deadline is not None and timer.when() == deadline:
            pass  # most submissions leave the earliest deadline where it was
        else:
            if timer is not None:
                timer.cancel()
                self.timer = None
            if deadline is not None:
                self.timer = self.loop.call_at(deadline, self._on_timer)
        self._check_idle()

    def _on_timer(self) -> None:
        self.timer = None
        self._apply(self.scheduler.tick())

    # -------------------------------------------------------------- runs
    def _start(self, run: Run) -> None:
        job: Job = run.invocation.payload
        env = dict(job.env)
        env["DEBOUNCE_KEY"] = run.key
        env["DEBOUNCE_RUN_ID"] = str(run.id)
        env["DEBOUNCE_COALESCED"] = str(run.coalesced)
        log = self._open_log(run)
        if log is None:
            self.buffers[run.id] = []
        buffered = 0

        def on_output(fd: int, data: bytes) -> None:
            nonlocal buffered
            if log is not None:
                log.write(fd, data)
            elif buffered < REPLAY_BUFFER:  # without a log, late joiners get the first part
                self.buffers[run.id].append((fd, data))
                buffered += len(data)
            line = _output_line(fd, data)
            for waiter in _unique(run.waiters):
                if waiter.follows(run.id):
                    waiter.output(fd, data, line)

        proc = RunProcess(job.argv, job.cwd, env, on_output)
        self.procs[run.id] = proc
        started = protocol.encode(self._started_msg(run))
        for waiter in _unique(run.waiters):
            waiter.start(run.id, started)
        self.to_spawn.append((run, proc))
        if len(self.to_spawn) == 1:
            self.loop.call_soon(self._spawn_some)

    def _spawn_some(self) -> None:
        """Start a few runs per turn of the loop, so clients are answered between the forks.

        When thousands of invocations fall due together, starting them all in one turn would
        leave every connection unanswered until the last fork.
        """
        for _ in range(SPAWNS_PER_TURN):
            if not self.to_spawn:
                return
            run, proc = self.to_spawn.popleft()
            task = asyncio.ensure_future(self._execute(run, proc))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        if self.to_spawn:
            self.loop.call_soon(self._spawn_some)

    def _open_log(self, run: Run) -> LogWriter | None:
        if not self.log_dir:
            return None
        path = os.path.join(self.log_dir, f"{run.id}.log")
        try:
            log = LogWriter(path)
        except OSError as exc:
            print(f"debounce: run {run.id} keeps no log: {exc.strerror}", file=sys.stderr)
            return None
        self.logs[run.id] = log
        run.invocation.payload.log_path = path
        return log

    def _output_so_far(self, run: Run) -> Iterable[tuple[int, bytes]]:
        if run.id in self.buffers:
            return list(self.buffers[run.id])
        path = run.invocation.payload.log_path
        if path:
            try:
                return read_log(path)
            except OSError:
                return []
        return []

    async def _execute(self, run: Run, proc: RunProcess) -> None:
        await proc.start()
        job: Job = run.invocation.payload
        if proc.pid is not None:
            job.pid = proc.pid
            if self.journal is not None:
                self.journal.note_run(run)
                self._apply([])  # commit it soon: the next daemon needs it to clean up
        if run.stop_reason is not None:  # stopped before it could start
            proc.signal("TERM")
        code = await proc.wait()
        self.procs.pop(run.id, None)
        self.buffers.pop(run.id, None)
        log = self.logs.pop(run.id, None)
        if log is not None:
            log.close()
        self.retention_due = True  # after the commit that records this run
        self._apply(self.scheduler.run_exited(run.id, code))

    def _retain(self) -> None:
        """Keep history and logs within their limits (--keep-history, --keep-logs...)."""
        journal = self.journal
        if journal is None or journal.broken:
            return
        self.runs_since_prune += 1
        try:
            if self.runs_since_prune >= 256:  # environments no pending invocation uses
                self.runs_since_prune = 0
                journal.prune_envs()
            old = journal.old_logs(self.config.keep_logs, self.config.keep_logs_total)
            if old:
                journal.forget_logs([run_id for run_id, _ in old])
            paths = [path for _, path in old] + journal.prune_history(self.config.keep_history)
        except sqlite3.Error:
            return  # retention must never take the daemon down; the next run tries again
        for path in paths:
            try:
                os.unlink(path)
            except OSError:
                pass

    # -------------------------------------------------------------- messages
    @staticmethod
    def _due_in(inv: Invocation) -> float:
        return max(0.0, inv.due - time.monotonic())

    def _pending_msg(self, inv: Invocation) -> protocol.Pending:
        return protocol.Pending(
            key=inv.key, state=inv.state, due_in=self._due_in(inv), coalesced=inv.coalesced
        )

    @staticmethod
    def _started_msg(run: Run) -> protocol.Started:
        return protocol.Started(
            run_id=run.id,
            invocation=run.invocation.id,
            key=run.key,
            argv=run.invocation.payload.argv,
            coalesced=run.coalesced,
            started_at=run.started_wall,
        )

    @staticmethod
    def _finished_msg(run: Run) -> protocol.Finished:
        return protocol.Finished(
            run_id=run.id,
            invocation=run.invocation.id,
            key=run.key,
            argv=run.invocation.payload.argv,
            exit_code=run.exit_code if run.exit_code is not None else -1,
            coalesced=run.coalesced,
            started_at=run.started_wall,
            finished_at=run.finished_wall or time.time(),
            outcome=run.outcome or "exited",
        )

    # -------------------------------------------------------------- stdin
    def _start_stdin_reader(self, loop: asyncio.AbstractEventLoop) -> None:
        """Read stdin in a thread: it works for pipes, files and terminals alike."""
        stream = sys.stdin.buffer

        def reader() -> None:
            number = 0
            try:
                for raw in stream:
                    number += 1
                    loop.call_soon_threadsafe(self._on_stdin_line, number, raw)
            except (OSError, ValueError):
                pass
            loop.call_soon_threadsafe(self._on_stdin_eof)

        threading.Thread(target=reader, name="stdin", daemon=True).start()

    def _on_stdin_line(self, number: int, raw: bytes) -> None:
        if self.stopping:
            return
        assert self.stdin_waiter is not None
        try:
            parsed = parse_stdin_line(raw, self.config.defaults)
        except ValueError as exc:
            print(f"debounce: stdin line {number}: {exc}", file=sys.stderr, flush=True)
            self.stdin_waiter.failures += 1
            return
        if parsed is None:
            return
        refusal = self._refusal()
        if refusal:
            print(f"debounce: stdin line {number}: {refusal}", file=sys.stderr, flush=True)
            self.stdin_waiter.failures += 1
            return
        key, options, job = parsed
        self.submit(key, options, job, self.stdin_waiter, line=number)

    def _on_stdin_eof(self) -> None:
        self.stdin_open = False
        self._after()

    # -------------------------------------------------------------- idle and shutdown
    def _check_idle(self) -> None:
        if self.stopping or self.stopped is None:
            return
        busy = self.outbox or self.acks or not self.scheduler.is_idle() or self.connections
        if busy:
            self._cancel_idle()
            return
        if self.config.stdin and not self.stdin_open:
            self._stop_now()  # end of input and all done
            return
        idle = self.config.idle_exit
        if idle and self.idle_timer is None and not self.config.stdin:
            loop = asyncio.get_running_loop()
            self.idle_timer = loop.call_later(idle, self._stop_now)

    def _cancel_idle(self) -> None:
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None

    def _stop_now(self) -> None:
        """Stop accepting at once; the rest of the shutdown (runs, journal) follows.

        The socket goes first, so a client arriving meanwhile starts the next daemon instead
        of being refused; that one takes over when this one has released the lock.
        """
        if not self.stopping:
            self.stopping = True
            if self.server is not None:
                self.server.close()
            if self.serving_socket and self.config.listen_fd is None:
                try:
                    os.unlink(self.config.socket)
                except FileNotFoundError:
                    pass
        if self.stopped is not None and not self.stopped.done():
            self.stopped.set_result(None)

    def shutdown(self) -> None:
        """SIGTERM, SIGINT or ``debounce stop``: stop accepting, stop runs, keep what is pending."""
        if self.stopping:
            return
        self.by_signal = True
        self._apply(self.scheduler.stop_all())
        self._stop_now()

    async def _finish_shutdown(self) -> None:
        self._cancel_idle()
        while self.tasks:
            await asyncio.wait(list(self.tasks))
            await asyncio.sleep(0)  # let the last commit and answers go out
        if self.flush_handle is not None:
            self.flush_handle.cancel()
            self._flush()
        if self.timer is not None:
            self.timer.cancel()
        if self.journal is not None:
            self.journal.close()


class Shared:
    """One copy of each distinct environment, command line and option set.

    Invocations from one shell session carry the same environment (a few kilobytes) and the
    same options; sharing them keeps a pending invocation to a few hundred bytes. The tables
    are bounded: once full they are cleared, which only ends the sharing for later arrivals.
    """

    LIMIT = 4096

    def __init__(self) -> None:
        self.envs: dict[frozenset[tuple[str, str]], dict[str, str]] = {}
        self.option_sets: dict[tuple[tuple[str, Any], ...], Options] = {}
        self.argvs: dict[tuple[str, ...], list[str]] = {}

    def env(self, env: dict[str, str]) -> dict[str, str]:
        key = frozenset(env.items())
        found = self.envs.get(key)
        if found is None:
            if len(self.envs) >= self.LIMIT:
                self.envs.clear()
            found = self.envs[key] = env
        return found

    def argv(self, argv: list[str]) -> list[str]:
        """The same command line from many keys (a template key) is kept once."""
        key = tuple(argv)
        found = self.argvs.get(key)
        if found is None:
            if len(self.argvs) >= self.LIMIT:
                self.argvs.clear()
            found = self.argvs[key] = argv
        return found

    def options(self, raw: dict[str, Any]) -> Options:
        try:
            key = tuple(sorted(raw.items()))
            found = self.option_sets.get(key)
        except TypeError:  # unhashable values: let validation say what is wrong
            return _options(raw)
        if found is None:
            found = _options(raw)
            if len(self.option_sets) >= self.LIMIT:
                self.option_sets.clear()
            self.option_sets[key] = found
        return found


# ------------------------------------------------------------------ parsing helpers
def _run_id(target: str) -> int | None:
    """``target`` as a run id, if it can be one (digits, and small enough to be stored)."""
    if target.isascii() and target.isdigit() and len(target) <= 18:
        return int(target)
    return None


def _output_line(fd: int, data: bytes) -> bytes:
    """One Output message, encoded once for all the waiters of a run."""
    return protocol.encode(
        protocol.Output(fd=fd, data=binascii.b2a_base64(data, newline=False).decode())
    )


def _run_dict(run: Run) -> dict[str, Any]:
    return {
        "run_id": run.id, "key": run.key, "argv": run.invocation.payload.argv,
        "cwd": run.invocation.payload.cwd, "exit_code": run.exit_code,
        "coalesced": run.coalesced, "started_at": run.started_wall,
        "finished_at": run.finished_wall, "outcome": run.outcome, "due_at": run.due_wall,
        "invocation": run.invocation.id,
    }


def _options(raw: dict[str, Any]) -> Options:
    protocol.check_options(raw)
    options = Options(**raw)
    problems = options.problems()
    if problems:
        raise ValueError(problems[0])
    return options


def _check_job(argv: list[str], cwd: str, key: str) -> None:
    if not argv:
        raise ValueError("run: argv must name a command")
    if not os.path.isabs(cwd):
        raise ValueError(f"run: cwd must be an absolute path, not {cwd!r}")
    if not key:
        raise ValueError("run: key must not be empty")


_STDIN_FIELDS = {"argv", "key", "cwd", "env"} | set(protocol.OPTION_FIELDS) | {"no_defer"}


def parse_stdin_line(
    raw: bytes, defaults: dict[str, Any]
) -> tuple[str, Options, Job] | None:
    """One line of ``debounce daemon --stdin``: a shell-quoted command line or a JSON object.

    ``defaults`` are the daemon's own options (``key`` is a template). Returns ``None`` for a
    blank line; raises ``ValueError`` with a one-line reason for anything it cannot use.
    """
    import json

    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("not valid UTF-8") from None
    text = text.strip()
    if not text:
        return None
    settings = dict(defaults)
    template = settings.pop("key", None)
    cwd = os.getcwd()
    env = dict(os.environ)
    if text.startswith("{"):
        try:
            obj = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise ValueError(f"invalid JSON: {exc}") from None
        if not isinstance(obj, dict):
            raise ValueError("a JSON line must be an object")
        unknown = sorted(set(obj) - _STDIN_FIELDS)
        if unknown:
            raise ValueError(
                f"unknown field {unknown[0]!r}; known fields: {', '.join(sorted(_STDIN_FIELDS))}"
            )
        argv = obj.get("argv")
        if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
            raise ValueError('"argv" must be a non-empty list of strings')
        if "key" in obj:
            if not isinstance(obj["key"], str):
                raise ValueError('"key" must be a string (a template like --key)')
            template = obj["key"]
        if "cwd" in obj:
            if not isinstance(obj["cwd"], str):
                raise ValueError('"cwd" must be a string')
            cwd = os.path.abspath(obj["cwd"])
        if "env" in obj:
            extra = obj["env"]
            if not isinstance(extra, dict) or not all(isinstance(v, str) for v in extra.values()):
                raise ValueError('"env" must be an object of string values')
            env.update(extra)
        for name in protocol.OPTION_FIELDS:
            if name in obj:
                value = obj[name]
                if name in ("delay", "max_wait", "stop_timeout", "timeout") and isinstance(
                    value, str
                ):
                    try:
                        value = parse_duration(value)
                    except DurationError as exc:
                        raise ValueError(f'"{name}": {exc}') from None
                settings[name] = value
        if "no_defer" in obj:
            if not isinstance(obj["no_defer"], bool):
                raise ValueError('"no_defer" must be true or false')
            settings["defer"] = not obj["no_defer"]
    else:
        try:
            argv = shlex.split(text)
        except ValueError as exc:
            raise ValueError(f"cannot split command line: {exc}") from None
    try:
        options = _options(settings)
    except ProtocolError as exc:
        raise ValueError(str(exc).removeprefix("run: ")) from None
    try:
        key = keys.compute_key(template, argv, cwd, env)
    except keys.KeyTemplateError as exc:
        raise ValueError(str(exc)) from None
    return key, options, Job(argv, cwd, env)


def run_daemon(config: Config) -> int:
    """Entry point of ``debounce daemon``: returns the exit status."""
    daemon = Daemon(config)
    try:
        daemon.acquire()
        daemon.serving_socket = True
    except AlreadyRunning as exc:
        if not config.stdin:
            raise
        # The other daemon owns this socket's journal; this one keeps its lines in memory.
        config.journal = False
        print(f"debounce: {exc}; reading stdin without a socket or journal", file=sys.stderr)
    daemon.restore()
    _pdeathsig_prefix()  # probe setpriv now, not in the middle of the first run's start
    if sys.version_info < (3, 12) and hasattr(os, "pidfd_open"):
        # 3.11 watches each child with a thread of its own; a pidfd is one file descriptor in
        # the loop instead (3.12 does this by itself).
        try:
            os.close(os.pidfd_open(os.getpid()))
            asyncio.set_child_watcher(asyncio.PidfdChildWatcher())
        except OSError:
            pass
    return asyncio.run(daemon.serve())
