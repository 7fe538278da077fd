"""The daemon: socket and stdin sources feed the scheduler; its effects drive the runner.

One asyncio loop does everything. After each event the scheduler is asked for its next deadline
and a single timer is set for it, so an idle daemon sleeps in ``epoll_wait`` with nothing to do.

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
import struct
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from debounce_cli import keys, paths, protocol
from debounce_cli.durations import DurationError, parse_duration
from debounce_cli.protocol import ProtocolError
from debounce_cli.runner import RunProcess
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


@dataclass(eq=False)
class Config:
    socket: str
    jobs: int | None = None
    idle_exit: float | None = 600.0
    stdin: bool = False
    defaults: dict[str, Any] | None = None  # scheduling options and "key" for stdin lines
    ready_fd: int | None = None


# ------------------------------------------------------------------ waiters
class ConnWaiter:
    """A client connection waiting for a run: the run's events go down its socket."""

    def __init__(self, writer: asyncio.StreamWriter):
        self.writer = writer
        self.closed = False
        self.done = asyncio.get_running_loop().create_future()

    def send(self, msg: protocol.Message) -> None:
        if self.closed:
            return
        try:
            self.writer.write(protocol.encode(msg))
        except (ConnectionError, RuntimeError):
            self.closed = True

    def output(self, fd: int, data: bytes) -> None:
        self.send(protocol.Output(fd=fd, data=binascii.b2a_base64(data, newline=False).decode()))

    def finish(self, msg: protocol.Message) -> None:
        self.send(msg)
        if not self.done.done():
            self.done.set_result(None)


class StdinWaiter:
    """Invocations read from stdin: their runs' output goes to the daemon's own stdout/stderr."""

    def __init__(self) -> None:
        self.failures = 0

    def send(self, msg: protocol.Message) -> None:
        pass

    def output(self, fd: int, data: bytes) -> None:
        stream = sys.stdout.buffer if fd == 1 else sys.stderr.buffer
        try:
            stream.write(data)
            stream.flush()
        except (OSError, ValueError):
            pass

    def finish(self, msg: protocol.Message) -> None:
        if isinstance(msg, protocol.Finished) and msg.exit_code != 0:
            self.failures += 1
        elif isinstance(msg, protocol.Cancelled):
            self.failures += 1


def _unique(waiters: Iterable[Any]) -> list[Any]:
    """One delivery per waiter, even when it stands for several coalesced invocations."""
    return list(dict.fromkeys(waiters))


# ------------------------------------------------------------------ the daemon
class Daemon:
    def __init__(self, config: Config):
        self.config = config
        self.scheduler = Scheduler(time.monotonic, wall=time.time, jobs=config.jobs)
        self.procs: dict[int, RunProcess] = {}
        self.outputs: dict[int, list[tuple[int, bytes]]] = {}  # running run id -> output so far
        self.connections = 0
        self.server: asyncio.AbstractServer | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.idle_timer: asyncio.TimerHandle | None = None
        self.stopping = False
        self.stopped: asyncio.Future[None] | None = None
        self.stdin_waiter = StdinWaiter() if config.stdin else None
        self.stdin_open = config.stdin
        self.lock_fd: int | None = None
        self.serving_socket = False
        self.tasks: set[asyncio.Task[Any]] = set()
        self.recent: dict[int, Run] = {}  # finished runs by id, oldest first
        self.last_by_key: dict[str, Run] = {}

    # -------------------------------------------------------------- start-up
    def acquire(self) -> None:
        """Take the socket's lock and replace a stale socket; raise if another daemon serves."""
        sock = self.config.socket
        paths.socket_dir_check(sock, create=True)
        lock_path = sock + ".lock"
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise AlreadyRunning(f"another debounce daemon already serves {sock}") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.lock_fd = fd
        if os.path.lexists(sock):
            # The lock is ours, so no live daemon of ours serves this socket: it is stale.
            os.unlink(sock)

    async def serve(self) -> int:
        """Serve until stopped; return the process exit status."""
        loop = asyncio.get_running_loop()
        self.stopped = loop.create_future()
        if self.serving_socket:
            old_umask = os.umask(0o177)
            try:
                self.server = await asyncio.start_unix_server(
                    self._on_connection, path=self.config.socket, limit=protocol.MAX_MESSAGE
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
        if self.stdin_waiter is not None and not self.shutting_down_by_signal:
            return 1 if self.stdin_waiter.failures else 0
        return 0

    shutting_down_by_signal = False

    # -------------------------------------------------------------- connections
    async def _on_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.connections += 1
        self._cancel_idle()
        try:
            await self._converse(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.connections -= 1
            try:
                writer.close()
            except Exception:  # noqa: BLE001 - the peer may already be gone
                pass
            self._after()

    async def _converse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self._peer_allowed(writer):
            writer.write(protocol.encode(protocol.Error(
                message="permission denied: this daemon serves only its owner's uid",
                code="refused",
            )))
            return
        if self.connections > MAX_CONNECTIONS:
            writer.write(protocol.encode(protocol.Error(
                message="too many connections; try again", code="refused")))
            return
        hello = await self._read(reader, writer)
        if hello is None:
            return
        if not isinstance(hello, protocol.Hello):
            self._reply_error(writer, "expected a hello message first")
            return
        if hello.version != protocol.VERSION:
            self._reply_error(
                writer,
                f"protocol version {hello.version} is not supported by this daemon "
                f"(version {protocol.VERSION}); run 'debounce stop' and retry",
                "refused",
            )
            return
        writer.write(protocol.encode(protocol.HelloReply(pid=os.getpid())))
        request = await self._read(reader, writer)
        if request is None:
            return
        if self.stopping:
            self._reply_error(writer, "the daemon is shutting down; retry", "refused")
            return
        if isinstance(request, protocol.RunRequest):
            await self.handle_run(request, reader, writer)
        elif isinstance(request, protocol.WaitRequest):
            await self.handle_wait(request, reader, writer)
        elif isinstance(request, protocol.StatusRequest):
            writer.write(protocol.encode(self.handle_status()))
        elif isinstance(request, protocol.FlushRequest):
            found, effects = self.scheduler.flush(request.key)
            self._apply(effects)
            writer.write(protocol.encode(self._done(found, request.key, "flushed")))
        elif isinstance(request, protocol.CancelRequest):
            found, effects = self.scheduler.cancel(request.key)
            self._apply(effects)
            writer.write(protocol.encode(self._done(found, request.key, "cancelled")))
        elif isinstance(request, protocol.StopRequest):
            writer.write(protocol.encode(protocol.Done(ok=True, message="stopping")))
            await writer.drain()
            self.shutdown()
        else:
            self._reply_error(writer, f"{request.type} is not a request")
        await writer.drain()

    @staticmethod
    def _done(found: bool, key: str, verb: str) -> protocol.Message:
        if found:
            return protocol.Done(ok=True, message=f"{verb} {key}")
        return protocol.Error(message=f"nothing is pending for key {key!r}", code="not_found")

    def _peer_allowed(self, writer: asyncio.StreamWriter) -> bool:
        sock = writer.get_extra_info("socket")
        if sock is None:
            return False
        try:
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        except OSError:
            return False
        _pid, uid, _gid = struct.unpack("3i", creds)
        return uid == os.getuid()

    async def _read(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> protocol.Message | None:
        try:
            line = await asyncio.wait_for(reader.readline(), READ_TIMEOUT)
        except asyncio.TimeoutError:
            self._reply_error(writer, f"no request within {READ_TIMEOUT:g}s; closing")
            return None
        except (asyncio.LimitOverrunError, ValueError):
            self._reply_error(
                writer, f"message exceeds the limit of {protocol.MAX_MESSAGE} bytes"
            )
            return None
        if not line:
            return None
        try:
            return protocol.decode(line, protocol.REQUESTS)
        except ProtocolError as exc:
            self._reply_error(writer, str(exc))
            return None

    @staticmethod
    def _reply_error(writer: asyncio.StreamWriter, message: str, code: str = "bad_request") -> None:
        writer.write(protocol.encode(protocol.Error(message=message, code=code)))

    # -------------------------------------------------------------- requests
    async def handle_run(
        self, req: protocol.RunRequest, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            options = _options(req.options)
            _check_job(req.argv, req.cwd, req.env)
        except (ProtocolError, ValueError) as exc:
            self._reply_error(writer, str(exc))
            return
        if not req.key:
            self._reply_error(writer, "run: key must not be empty")
            return
        waiter = ConnWaiter(writer) if req.wait else None
        inv = self.submit(req.key, options, Job(req.argv, req.cwd, req.env), waiter, accept=writer)
        if waiter is None:
            return
        del inv
        await self._hold(waiter, reader)

    async def handle_wait(
        self, req: protocol.WaitRequest, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        target = self._find(req.target)
        if target is None:
            self._reply_error(
                writer, f"nothing pending or running for {req.target!r}", "not_found"
            )
            return
        waiter = ConnWaiter(writer)
        if isinstance(target, Invocation):
            waiter.send(self._pending_msg(target))
        self._apply(self.scheduler.attach(target, waiter))
        await self._hold(waiter, reader)

    def _find(self, target: str) -> Invocation | Run | None:
        """What ``debounce wait TARGET`` follows: pending, else running, else the last result."""
        ks = self.scheduler.keys.get(target)
        if ks is not None and (ks.pending or ks.running):
            return ks.pending or ks.running
        if target in self.last_by_key:
            return self.last_by_key[target]
        if target.isdigit():
            run_id = int(target)
            return self.scheduler.runs.get(run_id) or self.recent.get(run_id)
        return None

    def _remember(self, run: Run) -> None:
        if run.id in self.recent:
            return
        self.recent[run.id] = run
        self.last_by_key[run.key] = run
        while len(self.recent) > RECENT_RUNS:
            old = self.recent.pop(next(iter(self.recent)))
            if self.last_by_key.get(old.key) is old:
                del self.last_by_key[old.key]

    async def _hold(self, waiter: ConnWaiter, reader: asyncio.StreamReader) -> None:
        """Keep the connection while the waiter waits; a client that leaves is detached."""
        gone = asyncio.ensure_future(reader.read(1))
        try:
            await asyncio.wait([waiter.done, gone], return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not waiter.done.done():
                waiter.closed = True
                self.scheduler.detach(waiter)
            gone.cancel()
        try:
            await waiter.writer.drain()
        except ConnectionError:
            pass

    def submit(
        self,
        key: str,
        options: Options,
        job: Job,
        waiter: Any,
        accept: asyncio.StreamWriter | None = None,
    ) -> Invocation:
        inv, effects = self.scheduler.submit(key, options, job, waiter)
        if accept is not None:
            head = inv.head()
            if head.run is not None:
                msg = protocol.Accepted(
                    id=inv.id, key=head.key, state=head.run.state, due_in=None,
                    coalesced=head.run.coalesced,
                )
            else:
                msg = protocol.Accepted(
                    id=inv.id, key=head.key, state=head.state, due_in=self._due_in(head),
                    coalesced=head.coalesced,
                )
            accept.write(protocol.encode(msg))
        self._apply(effects)
        return inv

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

    # -------------------------------------------------------------- effects
    def _apply(self, effects: list[Any]) -> None:
        for effect in effects:
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
                started = self._started_msg(effect.run)
                for waiter in _unique(effect.waiters):
                    waiter.send(started)
                    for fd, data in self.outputs.get(effect.run.id, ()):
                        waiter.output(fd, data)
            elif isinstance(effect, Updated):
                msg = self._pending_msg(effect.invocation)
                for waiter in _unique(effect.invocation.waiters):
                    waiter.send(msg)
            elif isinstance(effect, Cancelled):
                msg = protocol.Cancelled(key=effect.invocation.key)
                for waiter in _unique(effect.waiters):
                    waiter.finish(msg)
        self._after()

    def _after(self) -> None:
        """Set the one timer for the scheduler's next deadline; manage idle exit."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        deadline = self.scheduler.next_deadline()
        if deadline is not None:
            loop = asyncio.get_running_loop()
            self.timer = loop.call_at(deadline, self._on_timer)
        self._check_idle()

    def _on_timer(self) -> None:
        self.timer = None
        self._apply(self.scheduler.tick())

    def _start(self, run: Run) -> None:
        job: Job = run.invocation.payload
        env = dict(job.env)
        env["DEBOUNCE_KEY"] = run.key
        env["DEBOUNCE_RUN_ID"] = str(run.id)
        env["DEBOUNCE_COALESCED"] = str(run.coalesced)
        buffer: list[tuple[int, bytes]] = []
        self.outputs[run.id] = buffer

        def on_output(fd: int, data: bytes) -> None:
            buffer.append((fd, data))
            for waiter in _unique(run.waiters):
                waiter.output(fd, data)

        proc = RunProcess(job.argv, job.cwd, env, on_output)
        self.procs[run.id] = proc
        started = self._started_msg(run)
        for waiter in _unique(run.waiters):
            waiter.send(started)
        task = asyncio.ensure_future(self._execute(run, proc))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _execute(self, run: Run, proc: RunProcess) -> None:
        await proc.start()
        if run.stop_reason is not None:  # stopped before it could start
            proc.signal("TERM")
        code = await proc.wait()
        self.procs.pop(run.id, None)
        self.outputs.pop(run.id, None)
        self._apply(self.scheduler.run_exited(run.id, code))

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
            key=run.key,
            argv=run.invocation.payload.argv,
            coalesced=run.coalesced,
            started_at=run.started_wall,
        )

    @staticmethod
    def _finished_msg(run: Run) -> protocol.Finished:
        return protocol.Finished(
            run_id=run.id,
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
        try:
            parsed = parse_stdin_line(raw, self.config.defaults or {})
        except ValueError as exc:
            print(f"debounce: stdin line {number}: {exc}", file=sys.stderr, flush=True)
            assert self.stdin_waiter is not None
            self.stdin_waiter.failures += 1
            return
        if parsed is None:
            return
        key, options, job = parsed
        self.submit(key, options, job, self.stdin_waiter)

    def _on_stdin_eof(self) -> None:
        self.stdin_open = False
        self._after()

    # -------------------------------------------------------------- idle and shutdown
    def _check_idle(self) -> None:
        if self.stopping or self.stopped is None:
            return
        if not self.scheduler.is_idle() or self.connections:
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
        self.stopping = True
        if self.stopped is not None and not self.stopped.done():
            self.stopped.set_result(None)

    def shutdown(self) -> None:
        """SIGTERM, SIGINT or ``debounce stop``: stop accepting, stop runs, leave."""
        if self.stopping:
            return
        self.shutting_down_by_signal = True
        self._apply(self.scheduler.stop_all())
        self._stop_now()

    async def _finish_shutdown(self) -> None:
        self._cancel_idle()
        if self.server is not None:
            self.server.close()
        if self.tasks:
            await asyncio.wait(list(self.tasks))
        if self.timer is not None:
            self.timer.cancel()
        if self.serving_socket:
            try:
                os.unlink(self.config.socket)
            except FileNotFoundError:
                pass


# ------------------------------------------------------------------ parsing helpers
def _options(raw: dict[str, Any]) -> Options:
    protocol.check_options(raw)
    options = Options(**raw)
    problems = options.problems()
    if problems:
        raise ValueError(problems[0])
    return options


def _check_job(argv: list[str], cwd: str, env: dict[str, str]) -> None:
    if not argv:
        raise ValueError("run: argv must name a command")
    if not os.path.isabs(cwd):
        raise ValueError(f"run: cwd must be an absolute path, not {cwd!r}")


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
        print(f"debounce: {exc}; reading stdin without a socket", file=sys.stderr)
    return asyncio.run(daemon.serve())
