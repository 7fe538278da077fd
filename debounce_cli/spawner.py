"""The spawner: the process that starts every run of a daemon.

The spawner's program (``python -I -S -c``): a small process of its own (about 9 MB) that
starts the runs with ``posix_spawn`` (vfork and one exec of the command, the way
``subprocess`` starts a process), so the daemon never forks. Nothing runs between fork and
exec, so what must come before the command is done by the spawner just before it: it looks
at its parent (a daemon that is gone gets no more runs), enters the run's directory,
appends the run id to the started ledger (a line that cannot be written means no spawn),
and spawns the command in a session of its own. Runs die with the daemon through the
spawner: when the daemon dies, however it dies, the kernel closes its end of the socket,
and the spawner kills every run it started that has not ended (each with its process
group) and exits. Killed on its own, the spawner leaves that to the daemon (``Spawner._lost``).

Requests come on a Unix stream socket: a 4-byte length, a ``marshal``-ed tuple (request id,
program, argv, cwd, env, ledger line), and the run's stdout, stderr (and ledger) descriptors
as SCM_RIGHTS. Answers: ``("S", id, pid, failure)`` once the command is executing (failure
"") or a step failed (pid 0, failure "stage:errno"), and ``("X", pid, wait status)`` at each
exit.
"""

from __future__ import annotations

import array
import asyncio
import errno
import marshal
import os
import signal
import socket
import struct
import subprocess
import sys
from collections import deque
from typing import Any, Protocol


class Child(Protocol):
    """A run's process as the spawner reports to it (``runner._Child``)."""

    def ended(self, code: int) -> None:
        """It exited with ``code`` (negative: killed by that signal)."""


PROGRAM = r"""
import array, errno, marshal, os, select, signal, socket, struct, sys
daemon = int(sys.argv[1])
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, fileno=int(sys.argv[2]))
os.set_inheritable(sock.fileno(), False)
if os.getppid() != daemon:
    os._exit(0)
devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
wake_r, wake_w = os.pipe()
os.set_blocking(wake_r, False)
os.set_blocking(wake_w, False)
signal.set_wakeup_fd(wake_w)
signal.signal(signal.SIGCHLD, lambda *_: None)
DEFAULTS = (signal.SIGPIPE, signal.SIGXFSZ)  # ignored here (Python), default in a command
HEAD = struct.Struct("<I")
children = set()

def die():
    # The daemon is gone: so are its runs, each with its process group, before anything else.
    for pid in children:
        for kill, target in ((os.killpg, pid), (os.kill, pid)):
            try:
                kill(target, signal.SIGKILL)
            except OSError:
                pass
    os._exit(0)

def send(obj):
    data = marshal.dumps(obj)
    try:
        sock.sendall(HEAD.pack(len(data)) + data)
    except OSError:
        die()

def exact(n, first=b""):
    data = [first]
    got = len(first)
    while got < n:
        chunk = sock.recv(n - got)
        if not chunk:
            die()
        data.append(chunk)
        got += len(chunk)
    return b"".join(data)

def start(request, fds):
    ident, program, argv, cwd, env, line = request
    out, err = fds[0], fds[1]
    ledger = fds[2] if len(fds) > 2 else -1
    stage = "parent"
    try:
        if os.getppid() != daemon:
            raise OSError(errno.ESRCH, "parent")
        stage = "chdir"
        os.chdir(cwd)
        if line and ledger >= 0:
            stage = "ledger"
            if os.write(ledger, line) != len(line):
                raise OSError(errno.ENOSPC, "short write")
        stage = "exec"
        pid = os.posix_spawn(program, argv, env, setsid=True, setsigdef=DEFAULTS,
                             file_actions=[(os.POSIX_SPAWN_DUP2, devnull, 0),
                                           (os.POSIX_SPAWN_DUP2, out, 1),
                                           (os.POSIX_SPAWN_DUP2, err, 2)])
    except OSError as exc:
        send(("S", ident, 0, "%s:%d" % (stage, exc.errno or errno.EINVAL)))
        return
    except (ValueError, TypeError):
        send(("S", ident, 0, "%s:%d" % (stage, errno.EINVAL)))
        return
    finally:
        for fd in fds:
            os.close(fd)
    children.add(pid)
    send(("S", ident, pid, ""))

def reap():
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        children.discard(pid)
        send(("X", pid, status))

room = socket.CMSG_SPACE(8 * array.array("i").itemsize)
poller = select.epoll()
poller.register(sock.fileno(), select.EPOLLIN)
poller.register(wake_r, select.EPOLLIN)
while True:
    ready = {fd for fd, _events in poller.poll()}
    if wake_r in ready:
        try:
            while os.read(wake_r, 512):
                pass
        except BlockingIOError:
            pass
        reap()
    if sock.fileno() in ready:
        try:
            head, ancillary, _flags, _addr = sock.recvmsg(HEAD.size, room,
                                                          socket.MSG_CMSG_CLOEXEC)
        except OSError:
            head, ancillary = b"", []
        fds = array.array("i")
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
        if not head:
            for fd in fds:
                os.close(fd)
            die()
        size = HEAD.unpack(exact(HEAD.size, head))[0]
        start(marshal.loads(exact(size)), list(fds))
"""


class Spawner:
    """The daemon's side of the spawner process (see :data:`PROGRAM`), one per daemon.

    Started when the daemon starts (``runner.start_spawner``), attached to the event loop at
    the first run. If it dies (killed on its own), the daemon kills its runs: they end as
    killed, starts in flight fail, and the next run starts a new spawner.
    """

    HEAD = struct.Struct("<I")

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.sock: socket.socket | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.buffer = b""
        self.next_id = 0
        self.starting: dict[int, tuple[asyncio.Future[tuple[int, str]], Child]] = {}
        self.running: dict[int, Child] = {}
        self.out: deque[tuple[bytes, list[int]]] = deque()  # to send: bytes, descriptors
        self.writing = False
        self.broken = False

    def launch(self) -> bool:
        """Start the spawner process unless it runs; False if it cannot be started."""
        if self.proc is not None and self.sock is not None and running(self.proc):
            return True
        if self.broken:
            return False
        self._drop()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", PROGRAM, str(os.getpid()),
                 str(theirs.fileno())],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, env={}, close_fds=True, start_new_session=True)
        except OSError as exc:
            print(f"debounce: cannot start the spawner ({exc}); the daemon forks its runs "
                  "itself", file=sys.stderr)
            self.broken = True
            ours.close()
            return False
        finally:
            theirs.close()
        self.sock = ours
        return True

    def attach(self, loop: asyncio.AbstractEventLoop) -> bool:
        if not self.launch():
            return False
        assert self.sock is not None
        if self.loop is not loop:
            self.loop = loop
            self.sock.setblocking(False)
            loop.add_reader(self.sock.fileno(), self._readable)
        return True

    def spawn(self, child: Child, request: tuple[Any, ...], fds: list[int]
              ) -> asyncio.Future[tuple[int, str]]:
        """Queue one start request with its descriptors, which the spawner now owns (they
        are closed here once sent); the future gives (pid, "") or (0, "stage:errno").

        Requests are written without blocking, as the socket takes them: a daemon blocked on
        a full socket while the spawner is blocked on its answers would be a deadlock.
        """
        assert self.sock is not None and self.loop is not None
        self.next_id += 1
        ident = self.next_id
        future: asyncio.Future[tuple[int, str]] = self.loop.create_future()
        self.starting[ident] = (future, child)
        data = marshal.dumps((ident, *request))
        self.out.append((self.HEAD.pack(len(data)) + data, fds))
        self._write()
        return future

    def _write(self) -> None:
        sock, loop = self.sock, self.loop
        if sock is None or loop is None:
            return
        while self.out:
            data, fds = self.out[0]
            try:
                if fds:
                    sent = sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                  array.array("i", fds))])
                    for fd in fds:
                        os.close(fd)
                else:
                    sent = sock.send(data)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._lost()
                return
            if sent < len(data):
                self.out[0] = (data[sent:], [])
            else:
                self.out.popleft()
        if self.out and not self.writing:
            loop.add_writer(sock.fileno(), self._write)
            self.writing = True
        elif not self.out and self.writing:
            loop.remove_writer(sock.fileno())
            self.writing = False

    def _readable(self) -> None:
        assert self.sock is not None
        try:
            data = self.sock.recv(1 << 16)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._lost()
            return
        buffer = self.buffer + data
        head = self.HEAD.size
        while len(buffer) >= head:
            size = self.HEAD.unpack_from(buffer)[0]
            if len(buffer) < head + size:
                break
            message = marshal.loads(buffer[head:head + size])
            buffer = buffer[head + size:]
            self._dispatch(message)
        self.buffer = buffer

    def _dispatch(self, message: Any) -> None:
        if message[0] == "S":
            _s, ident, pid, failure = message
            entry = self.starting.pop(ident, None)
            if entry is None:
                return
            future, child = entry
            if pid:
                self.running[pid] = child
            if not future.done():
                future.set_result((pid, failure))
        elif message[0] == "X":
            _x, pid, status = message
            done = self.running.pop(pid, None)
            if done is not None:
                done.ended(os.waitstatus_to_exitcode(status))

    def _lost(self) -> None:
        """The spawner is gone (killed on its own): its runs go too, each with its process
        group, as they would with the daemon; starts in flight fail."""
        for _data, fds in self.out:
            for fd in fds:
                os.close(fd)
        self.out.clear()
        for future, _child in self.starting.values():
            if not future.done():
                future.set_result((0, f"spawner:{errno.EPIPE}"))
        self.starting = {}
        for pid, child in self.running.items():
            for kill, target in ((os.killpg, pid), (os.kill, pid)):
                try:
                    kill(target, signal.SIGKILL)
                except OSError:
                    pass
            child.ended(-signal.SIGKILL)
        self.running = {}
        self._drop()

    def _drop(self) -> None:
        if self.sock is not None:
            if self.loop is not None:
                self.loop.remove_reader(self.sock.fileno())
                if self.writing:
                    self.loop.remove_writer(self.sock.fileno())
            self.writing = False
            self.sock.close()
            self.sock = None
        self.loop = None
        self.buffer = b""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            self.proc = None


spawner = Spawner()


def running(proc: subprocess.Popen[bytes]) -> bool:
    """Whether ``proc`` has not exited, without reaping it: one ``waitid``, where
    ``Popen.poll`` (a lock and its own bookkeeping around ``waitpid``) was a twentieth of the
    daemon's CPU for a run in a burst."""
    if proc.returncode is not None:
        return False
    try:
        return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None
    except ChildProcessError:
        return proc.poll() is None  # (reaped elsewhere: Popen knows what became of it)
