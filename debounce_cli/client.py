"""The synchronous client: connect (starting a daemon when none answers), send, stream back.

This is the hot path of ``debounce run``: it imports only the standard library's light
modules, never asyncio, sqlite3, rich or watchfiles (nor ``socket``, whose enum set-up alone
costs more than this whole module; the ``_socket`` C module underneath does the same work).
"""

from __future__ import annotations

import _socket  # the C module: socket.py's enum conversions cost ~4 ms at start-up
import os
import sys
import time

from debounce_cli import paths, protocol
from debounce_cli.protocol import Message

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

#: How long a client waits for an auto-started daemon to say it is ready.
START_TIMEOUT = 10.0

#: How long connect() waits for room in a daemon's listen backlog.
CONNECT_TIMEOUT = 5.0

# struct timeval for SO_SNDTIMEO, which bounds a blocking connect() on a Unix socket (the
# kernel wakes us as soon as the backlog has room). settimeout() would not do: with it the
# socket is non-blocking, and connect() to a full backlog fails at once with EAGAIN.
# Two C longs (seconds, microseconds), packed by hand: struct's import is start-up time too.
_LONG = 8 if sys.maxsize > 2**32 else 4
_CONNECT_TIMEVAL = int(CONNECT_TIMEOUT).to_bytes(_LONG, sys.byteorder) + bytes(_LONG)
_NO_TIMEVAL = bytes(2 * _LONG)


class ClientError(Exception):
    """The daemon could not be reached or refused us; ``str()`` is the one-line reason."""

    def __init__(self, message: str, code: str = "unreachable"):
        super().__init__(message)
        self.code = code


class DaemonLost(Exception):
    """The connection closed before the answer we waited for.

    ``key`` is the key the daemon filed the invocation under, when it said so (it differs
    from the client's for --no-defer), for the ``debounce wait`` hint.
    """

    def __init__(self, key: str | None = None):
        super().__init__(key)
        self.key = key


class Connection:
    """One protocol conversation over a Unix socket."""

    def __init__(self, sock: _socket.socket):
        self.sock = sock
        self.buffer = bytearray()
        self.scanned = 0  # no newline before this offset of the buffer
        self.key: str | None = None  # the key the daemon filed what we follow under

    def send(self, *messages: Message) -> None:
        self.sock.sendall(b"".join(protocol.encode(m) for m in messages))

    def recv(self, timeout: float | None = None) -> Message | None:
        """The next message, ``None`` at end of stream; raises TimeoutError after ``timeout``."""
        while True:
            newline = self.buffer.find(b"\n", self.scanned)
            if newline < 0:
                self.scanned = len(self.buffer)
            else:
                line = bytes(self.buffer[: newline + 1])
                del self.buffer[: newline + 1]
                self.scanned = 0
                try:
                    return protocol.decode(line, protocol.REPLIES, protocol.MAX_REPLY)
                except protocol.ProtocolError as exc:
                    raise ClientError(f"the daemon sent a malformed message: {exc}") from None
            if len(self.buffer) > protocol.MAX_REPLY:
                raise ClientError("the daemon sent an oversized message")
            self.sock.settimeout(timeout)
            try:
                chunk = self.sock.recv(262144)
            except TimeoutError:
                raise TimeoutError from None
            except ConnectionError:
                chunk = b""
            if not chunk:
                return None
            self.buffer += chunk

    def close(self) -> None:
        self.sock.close()


def connect(sock_path: str, request: Message, autostart: bool = True) -> Connection:
    """Open a conversation and send ``request`` after the hello; start a daemon if needed."""
    try:
        paths.socket_dir_check(sock_path, create=False)
    except paths.PathError as exc:
        raise ClientError(str(exc), "unsafe") from None
    try:
        conn = _connect(sock_path)
    except (FileNotFoundError, ConnectionRefusedError):
        if not autostart:
            raise ClientError(f"no daemon is running on {sock_path}") from None
        conn = _start_and_connect(sock_path)
    except OSError as exc:
        raise ClientError(f"cannot connect to {sock_path}: {exc.strerror}") from None
    # Nothing is sent before _connect has seen that the daemon runs as us.
    try:
        conn.send(protocol.Hello(client="debounce"), request)
    except OSError:
        pass  # a daemon that refuses us closes at once: its one line is still to be read
    try:
        hello = conn.recv(timeout=START_TIMEOUT)
    except (OSError, TimeoutError):
        raise ClientError(f"the daemon on {sock_path} does not answer") from None
    if isinstance(hello, protocol.Error):
        raise ClientError(f"the daemon refused the connection: {hello.message}", hello.code)
    if not isinstance(hello, protocol.HelloReply):
        raise ClientError(f"the daemon on {sock_path} does not answer")
    return conn


def _connect(sock_path: str) -> Connection:
    """Connect to the socket at ``sock_path`` and make sure the daemon answering runs as us.

    Raises FileNotFoundError or ConnectionRefusedError when no daemon listens there (the
    caller may start one), ClientError when the path is unsafe, the daemon is another
    user's, or it does not accept the connection within CONNECT_TIMEOUT.
    """
    try:
        paths.socket_file_check(sock_path)
    except paths.NotASocket as exc:
        raise ClientError(str(exc)) from None
    except paths.PathError as exc:
        raise ClientError(str(exc), "unsafe") from None
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_SNDTIMEO, _CONNECT_TIMEVAL)
        try:
            sock.connect(sock_path)
        except (BlockingIOError, TimeoutError):
            raise ClientError(
                f"the daemon on {sock_path} does not accept connections (none within "
                f"{CONNECT_TIMEOUT:g}s): it is stopped, wedged or overloaded"
            ) from None
        sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_SNDTIMEO, _NO_TIMEVAL)
        _check_peer(sock, sock_path)
    except BaseException:
        sock.close()
        raise
    return Connection(sock)


def _check_peer(sock: _socket.socket, sock_path: str) -> None:
    """Refuse a daemon that is not ours, before anything (hello, command, environment) is sent.

    The kernel records who listens on a socket (SO_PEERCRED: pid, uid, gid); whatever path
    led here, that is the one check a swapped directory or socket cannot fool.
    """
    cred = sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, 12)
    uid = int.from_bytes(cred[4:8], sys.byteorder)  # struct ucred: int pid, uid_t uid, gid
    if uid != os.getuid():
        raise ClientError(
            f"the process answering on {sock_path} runs as uid {uid}, not as you "
            f"(uid {os.getuid()}); nothing was sent to it: {paths.SOCKET_REMEDY}",
            "unsafe",
        )


def _start_and_connect(sock_path: str) -> Connection:
    """Start a daemon for ``sock_path`` unless a racing client already did, then connect.

    Clients that race take turns on a start lock: the first starts the daemon and waits for it
    to say it is listening; the others then find it answering and never start a second one.
    """
    try:
        paths.socket_dir_check(sock_path, create=True)
    except paths.PathError as exc:
        raise ClientError(str(exc), "unsafe") from None
    start_lock = paths.start_lock_path(sock_path)
    try:
        lock_fd = paths.lock(start_lock, wait=True)
    except OSError as exc:
        raise ClientError(f"cannot start the daemon: cannot open {start_lock}: "
                          f"{exc.strerror}") from None
    assert lock_fd is not None
    try:
        try:
            return _connect(sock_path)
        except (FileNotFoundError, ConnectionRefusedError):
            pass
        except OSError as exc:
            raise ClientError(f"cannot connect to {sock_path}: {exc.strerror}") from None
        try:
            _spawn_daemon(sock_path)
        except ClientError as failure:
            # A daemon started by hand may have won the socket meanwhile: use it if it answers.
            try:
                return _connect(sock_path)
            except OSError:
                raise failure from None
        try:
            return _connect(sock_path)
        except OSError as exc:
            raise ClientError(
                f"started a daemon but cannot connect to {sock_path}: {exc.strerror}"
            ) from None
    finally:
        os.close(lock_fd)


class DaemonProcess:
    """The process of the daemon serving a socket, named before it is asked to stop.

    Its pid comes from the lock file (the daemon writes it there once the lock is its own).
    On Linux a pidfd is opened at once: it names that process and no other, even if the pid
    is reused after it exits, and it becomes readable when the process has exited.
    """

    def __init__(self, pid: int, pidfd: int | None):
        self.pid = pid
        self.pidfd = pidfd

    def wait(self, timeout: float) -> bool:
        """Wait until the process has exited (a zombie not yet reaped counts as exited)."""
        if self.pidfd is not None:
            import select

            return bool(select.select([self.pidfd], [], [], max(0.0, timeout))[0])
        deadline = time.monotonic() + timeout
        while _running(self.pid):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        return True

    def close(self) -> None:
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None


def _running(pid: int) -> bool:
    """Whether ``pid`` is a process that has not exited (zombies have)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[-1].split()[:1] != [b"Z"]
    except FileNotFoundError:
        return False
    except OSError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        pass
    return True


def daemon_process(sock_path: str) -> DaemonProcess | None:
    """The daemon that holds ``sock_path``'s lock now, ``None`` if it cannot be told."""
    try:
        with open(paths.lock_path(sock_path), "rb") as f:
            pid = int(f.read(32).strip() or b"0")
    except (OSError, ValueError):
        return None
    if pid <= 0:
        return None
    try:
        pidfd: int | None = os.pidfd_open(pid)
    except ProcessLookupError:
        return None
    except (AttributeError, OSError):
        pidfd = None  # not Linux, or an old kernel: poll the pid instead
    return DaemonProcess(pid, pidfd)


def wait_until_gone(sock_path: str, timeout: float,
                    process: DaemonProcess | None = None) -> bool:
    """After a stop request: wait until the daemon on ``sock_path`` has exited.

    The daemon lets go of its lock file as its last act, but Python still takes a while to
    finish after that: so once the lock is free (or a newer daemon, started by a client
    meanwhile, has taken it over), wait for ``process`` itself to exit too. False when
    ``timeout`` passes first.
    """
    import fcntl

    deadline = time.monotonic() + timeout
    try:
        fd = os.open(paths.lock_path(sock_path), os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        fd = -1
    if fd >= 0:
        try:
            stopping = os.pread(fd, 32, 0)
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if os.pread(fd, 32, 0) != stopping:
                        break
                    if time.monotonic() >= deadline:
                        return False
                    time.sleep(0.02)
        finally:
            os.close(fd)
    return process is None or process.wait(deadline - time.monotonic())


def daemon_log_path(sock_path: str) -> str:
    """Where an auto-started daemon for ``sock_path`` writes its own messages."""
    return os.path.join(paths.state_dir(), f"daemon-{paths.socket_digest(sock_path)}.log")


def _spawn_daemon(sock_path: str) -> None:
    import select
    import subprocess

    log_path = daemon_log_path(sock_path)
    try:
        paths.check_private_dir(os.path.dirname(log_path), "state directory", create=True,
                                 follow=True)
        log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    except (OSError, paths.PathError) as exc:
        raise ClientError(f"cannot start the daemon: {exc}") from None
    read_fd, write_fd = os.pipe()
    try:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "debounce_cli", "daemon", "--socket", sock_path,
             "--ready-fd", str(write_fd)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            pass_fds=(write_fd,),
            start_new_session=True,
            cwd="/",
        )
    except OSError as exc:
        raise ClientError(f"cannot start the daemon: {exc.strerror}") from None
    finally:
        os.close(write_fd)
        os.close(log)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        answer = b""
        while b"\n" not in answer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ClientError(f"the daemon did not start within {START_TIMEOUT:g}s; "
                                  f"see {log_path}")
            if not select.select([read_fd], [], [], min(left, RACE_POLL))[0]:
                # A daemon started by hand (`daemon --stdin`) may hold the socket's lock and
                # listen a moment later; ours then waits for that lock, for a previous daemon
                # still finishing. Whoever answers first is used.
                if _answers(sock_path):
                    return
                continue
            chunk = os.read(read_fd, 64)
            if not chunk:
                break
            answer += chunk
    finally:
        os.close(read_fd)
    if not answer.startswith(b"ready"):
        try:
            status = daemon.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            status = None
        last = _last_line(log_path)
        if status == 2:
            # A usage error of the daemon's: a setting it took from our environment, such as
            # a DEBOUNCE_STORE that is no store URL. Mended the same way as our own options.
            prefix, hint = "debounce daemon: ", " (see 'debounce daemon --help')"
            last = last.removeprefix(prefix).removesuffix(hint)
            raise ClientError(last, "usage")
        raise ClientError(f"the daemon failed to start: {last}")


#: Seconds between looks at the socket while a daemon we started is not ready yet.
RACE_POLL = 0.05


def _answers(sock_path: str) -> bool:
    """Whether a daemon of ours listens on ``sock_path`` now."""
    try:
        conn = _connect(sock_path)
    except (OSError, ClientError):
        return False
    conn.close()
    return True


def _last_line(path: str) -> str:
    try:
        with open(path, "rb") as f:
            lines = f.read()[-4096:].decode(errors="replace").strip().splitlines()
    except OSError:
        return f"see {path}"
    return lines[-1] if lines else f"see {path}"


class Display:
    """What a waiting client shows; the CLI picks the terminal or the plain version."""

    def pending(self, msg: protocol.Accepted | protocol.Pending) -> None: ...
    def started(self, msg: protocol.Started) -> None: ...
    def tick(self) -> None: ...
    def close(self) -> None: ...
    refresh: float | None = None  # seconds between ticks, None for no ticking


def wait_for_run(
    conn: Connection,
    display: Display,
    out: Callable[[int, bytes], None] | None,
    timeout: float | None = None,
) -> Message:
    """Follow a conversation to its end: Finished, Cancelled or Error.

    Output chunks go to ``out(fd, data)``; progress goes to ``display``; ``conn.key`` learns
    the key the daemon filed it under. Raises :class:`DaemonLost` when the daemon closes the
    connection first, and ``TimeoutError`` when ``timeout`` seconds pass first.
    """
    from binascii import a2b_base64  # only a waiting client decodes output

    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while True:
            wait = display.refresh
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                wait = left if wait is None else min(wait, left)
            try:
                msg = conn.recv(timeout=wait)
            except TimeoutError:
                display.tick()
                continue
            if msg is None:
                raise DaemonLost(conn.key)
            if isinstance(msg, protocol.Output):
                if out is not None:
                    out(msg.fd, a2b_base64(msg.data))
            elif isinstance(msg, (protocol.Accepted, protocol.Pending)):
                conn.key = msg.key
                display.pending(msg)
            elif isinstance(msg, protocol.Started):
                conn.key = conn.key or msg.key
                display.started(msg)
            elif isinstance(msg, (protocol.Finished, protocol.Cancelled, protocol.Error)):
                return msg
    finally:
        display.close()


#: Our own streams that could not be written, by fd: the error, or ``None`` when the reader
#: went away (EPIPE: ``| head -1`` has what it wants, which is no error, as for coreutils).
#: Nothing more is written to a stream once it is here.
lost: dict[int, OSError | None] = {}


def write_output(fd: int, data: bytes) -> None:
    """Copy a chunk of the run's output to our own stdout or stderr, at once.

    A stream that cannot take it (closed with ``>&-``, a full disk) is noted in :data:`lost`,
    and the caller still gets the run's exit status: the CLI reports the write error at the
    end. A reader that went away is noted too, quietly.
    """
    if fd in lost or not data:
        return
    stream = sys.stdout if fd == 1 else sys.stderr
    try:
        if stream is None:
            raise OSError(9, os.strerror(9))  # EBADF: the stream was closed before we began
        stream.buffer.write(data)
        stream.buffer.flush()
    except (OSError, ValueError) as exc:
        _lose(fd, stream, exc)


def write_text(text: str) -> None:
    """Print ``text`` on our stdout, at once; a failure is noted as for :func:`write_output`."""
    if 1 in lost:
        return
    stream = sys.stdout
    try:
        if stream is None:
            raise OSError(9, os.strerror(9))  # EBADF
        stream.write(text)
        stream.flush()
    except (OSError, ValueError) as exc:
        _lose(1, stream, exc)


def flush_stdout() -> None:
    """Flush what print() left in our stdout's buffer; a failure is noted."""
    if 1 not in lost and sys.stdout is not None:
        try:
            sys.stdout.flush()
        except (OSError, ValueError) as exc:
            _lose(1, sys.stdout, exc)


def write_error() -> OSError | None:
    """The first failure to write our stdout or stderr, if any (a reader gone is none)."""
    return next((exc for exc in lost.values() if exc is not None), None)


def note_lost(fd: int, exc: OSError) -> None:
    """Writing to our ``fd`` failed somewhere else (click's own output): note it."""
    _lose(fd, sys.stdout if fd == 1 else sys.stderr, exc)


def _lose(fd: int, stream: Any, exc: OSError | ValueError) -> None:
    if isinstance(exc, ValueError):  # the file object was closed
        exc = OSError(9, os.strerror(9))
    lost.setdefault(fd, None if exc.errno == 32 else exc)  # 32: EPIPE
    if stream is not None:
        # What is still buffered, and anything written later, now goes to /dev/null, so that
        # Python's own flush at exit does not fail (and print a traceback) all over again.
        try:
            null = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.dup2(null, stream.fileno())
            finally:
                os.close(null)
        except (OSError, ValueError):
            pass


def request(sock_path: str, message: Message, autostart: bool = True) -> Message:
    """A one-shot request (status, flush, cancel, stop): the daemon's single answer."""
    conn = connect(sock_path, message, autostart=autostart)
    try:
        reply = conn.recv(timeout=30)
    except TimeoutError:
        raise ClientError("the daemon did not answer within 30s") from None
    finally:
        conn.close()
    if reply is None:
        raise DaemonLost
    return reply
