"""Start and stop the processes of runs.

Each run gets its own process group (``start_new_session``), so stopping a run reaches the
children it started too (``make`` and its compilers): SIGTERM to the group, then SIGKILL if it
is still there after the stop timeout (the scheduler times that while the first process runs;
once it has exited, :meth:`RunProcess.stop` holds the run open until the rest of the group is
gone, and kills it at the same deadline). Output is read from pipes and
handed to a callback chunk by chunk, as it comes.

Failures to start are reported the way a shell reports them, so a waiter cannot tell debounce
from ``sh -c``: a message on the run's stderr and exit status 127 (not found) or 126 (found but
not executable).

A run ends when its command exits and its output is read; a background child that still holds
the pipes open gets ``DRAIN_GRACE`` to let go and is then left alone, like a shell leaves a job
started with ``&``. Until then, stopping the run (timeout, restart) reaches it through the
process group.

Runs die with their daemon. On SIGTERM the daemon stops them itself; if the daemon is killed
outright, the kernel sends SIGKILL to each run's first process (``PR_SET_PDEATHSIG``, set by
``setpriv`` where util-linux has it, else by a ``preexec_fn``), and the
next daemon on the socket kills what is left of those runs' process groups
(:func:`kill_leftovers`) before it records them as lost. A run is never left going on its own
while a new daemon could start the same key again.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import os
import signal
import subprocess
import time
from collections.abc import Callable
from typing import NamedTuple

#: How long to keep reading output after the command exited: a background child that inherited
#: the pipes must not keep the run open.
DRAIN_GRACE = 1.0

#: How often a stopped run whose first process has exited looks for the rest of its group.
GROUP_POLL = 0.05
#: How long after SIGKILL a stopped run waits for the rest of its group to go.
KILL_PATIENCE = 5.0

OnOutput = Callable[[int, bytes], None]


class _Protocol(asyncio.SubprocessProtocol):
    """Output as it comes, and the process's exit apart from its pipes closing.

    asyncio's ``Process.wait()`` (3.11) returns only once the pipes are closed too, so a
    background child that inherited them would hold the run open after the command exited.
    """

    def __init__(self, on_output: OnOutput):
        loop = asyncio.get_running_loop()
        self.on_output = on_output
        self.exited: asyncio.Future[None] = loop.create_future()
        self.drained: asyncio.Future[None] = loop.create_future()

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        self.on_output(fd, data)

    def process_exited(self) -> None:
        if not self.exited.done():
            self.exited.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.drained.done():
            self.drained.set_result(None)


#: In every run's environment: the daemon (socket) it belongs to, so that the next daemon on
#: the socket finds what is left of its runs without a committed pid (with DEBOUNCE_RUN_ID).
DAEMON_MARK = "DEBOUNCE_DAEMON"

#: Run before the command, in the command's own process: note its run id in the started
#: ledger, then become the command. A run id missing from the ledger never ran.
_LEDGER_SCRIPT = 'printf "%s\\n" "$DEBOUNCE_RUN_ID" >>"$0"; exec "$@"'


class RunProcess:
    """One run's process: ``start`` it, ``signal`` it, ``wait`` for its exit status.

    With a ``ledger`` path, the process appends its ``DEBOUNCE_RUN_ID`` to that file before
    the command itself is executed (``sh -c``, about half a millisecond): the evidence the
    next daemon needs, after a crash, to tell a run that started from one that never did.
    """

    def __init__(self, argv: list[str], cwd: str, env: dict[str, str], on_output: OnOutput,
                 ledger: str | None = None):
        self.argv = argv
        self.cwd = cwd
        self.env = env
        self.on_output = on_output
        self.ledger = ledger
        self.pid: int | None = None
        self.transport: asyncio.SubprocessTransport | None = None
        self.protocol: _Protocol | None = None
        self.finished = False
        self.start_error: tuple[int, str] | None = None
        #: Once stopped (:meth:`stop`): when what is left of the process group gets SIGKILL.
        self.kill_at: float | None = None

    async def start(self) -> None:
        """Spawn the process; on failure remember the shell-like status and message.

        Never raises: whatever goes wrong before the command runs ends the run with a status
        (126, as a shell says of what it cannot execute), never leaves it running for good.
        """
        if self.start_error is not None:
            return  # known not to start (see daemon.runs)
        try:
            await self._start()
        except Exception as exc:  # noqa: BLE001 - a failure to start is the run's status
            self.pid = None
            self.start_error = (126, f"debounce: {self.argv[0]}: cannot start: {exc}\n")

    async def _start(self) -> None:
        name = self.argv[0]
        if not os.path.isdir(self.cwd):
            self.start_error = (126, f"debounce: cannot enter {self.cwd}: no such directory\n")
            return
        problem = _check_program(name, self.env.get("PATH", os.defpath), self.cwd)
        shell: tuple[str, ...] = ()
        if problem is not None and isinstance(problem[0], int):
            self.start_error = (problem[0], str(problem[1]))
            return
        if problem is not None:
            shell = tuple(str(word) for word in problem)
        prefix = pdeathsig_prefix()
        # The parent-death signal first (it survives the exec of sh and of the command), then
        # the ledger line, then the command.
        ledger = ("/bin/sh", "-c", _LEDGER_SCRIPT, self.ledger) if self.ledger else ()
        loop = asyncio.get_running_loop()
        try:
            self.transport, self.protocol = await loop.subprocess_exec(
                lambda: _Protocol(self.on_output),
                *prefix,
                *ledger,
                *shell,
                *self.argv,
                cwd=self.cwd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
                preexec_fn=None if prefix else _die_with_daemon(),
            )
            self.pid = self.transport.get_pid()
        except FileNotFoundError:
            self.start_error = (127, _not_found(name))
        except PermissionError:
            self.start_error = (126, f"debounce: {name}: permission denied\n")
        except OSError as exc:
            code = 127 if exc.errno == errno.ENOENT else 126
            self.start_error = (code, f"debounce: {name}: {exc.strerror}\n")
        except ValueError as exc:  # an embedded NUL byte in argv, cwd or environment
            self.start_error = (126, f"debounce: {name}: {exc}\n")

    def signal(self, name: str) -> None:
        """Send a signal (``TERM``, ``KILL``, ``HUP``...) to the run's whole process group.

        Also after the first process exited, while the run drains: the rest of the group (a
        background child holding the output open) is part of the run. A process group id is
        not reused while any member of the group lives.
        """
        if self.pid is None or self.finished:
            return
        sig = getattr(signal, f"SIG{name}", signal.SIGTERM)
        try:
            os.killpg(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass  # the whole group is gone

    def stop(self, timeout: float) -> None:
        """Stop the run: SIGTERM to its process group now, and SIGKILL to whatever is left of
        the group ``timeout`` seconds later, also after the first process has exited (a child
        that ignores SIGTERM outlives it); the run ends only when the group is gone or killed.
        """
        if self.finished:
            return
        kill_at = time.monotonic() + timeout
        if self.kill_at is None or kill_at < self.kill_at:
            self.kill_at = kill_at
        self.signal("TERM")

    async def wait(self) -> int:
        """Stream the output to ``on_output`` and return the shell-style exit status."""
        if self.start_error is not None:
            code, message = self.start_error
            self.finished = True
            self.on_output(2, _bytes_of(message))
            return code
        transport, protocol = self.transport, self.protocol
        assert transport is not None and protocol is not None
        await protocol.exited
        # What the command wrote before it exited is still in the pipes: read it, but do not
        # wait for a background child that keeps them open.
        try:
            await asyncio.wait_for(asyncio.shield(protocol.drained), DRAIN_GRACE)
        except TimeoutError:
            pass
        if self.kill_at is not None:
            await self._until_group_gone(self.kill_at)
        status = transport.get_returncode()
        transport.close()
        self.finished = True
        assert status is not None
        return 128 - status if status < 0 else status

    async def _until_group_gone(self, kill_at: float) -> None:
        """A stopped run whose first process has exited: wait for the rest of its group to go,
        and SIGKILL what is left at ``kill_at`` (a process group id is not reused while any
        member lives, so the group is still this run's)."""
        assert self.pid is not None
        killed = False
        while _group_alive(self.pid):
            now = time.monotonic()
            if now >= kill_at:
                if killed:
                    if now >= kill_at + KILL_PATIENCE:
                        return  # unkillable (uninterruptible sleep): do not hold the run
                else:
                    killed = True
                    try:
                        os.killpg(self.pid, signal.SIGKILL)
                    except OSError:
                        return
            await asyncio.sleep(GROUP_POLL)


def _group_alive(pgid: int) -> bool:
    """Whether process group ``pgid`` still has a member that is not a zombie."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        names = os.listdir("/proc")
    except OSError:
        return True
    for name in names:
        if name.isdigit():
            fields = _stat_fields(int(name))
            if fields and len(fields) > 2 and fields[2] == str(pgid) and fields[0] != "Z":
                return True
    return False  # only zombies left, waiting for their new parent to reap them


def _bytes_of(message: str) -> bytes:
    """A message naming a command or directory as the bytes it was given: names that are not
    UTF-8 reach Python as surrogates (``surrogateescape``), and go back to their own bytes."""
    try:
        return message.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate that stands for no byte
        return message.encode("utf-8", "backslashreplace")


def batches(argvs: list[list[str]], env: dict[str, str]) -> list[list[str]]:
    """``--collect``: the command lines that stand for coalesced invocations ``argvs`` (oldest
    first): the last one's argv with its last argument replaced by the distinct last arguments
    of all, in order, split into several command lines where one would pass the system's
    limit on arguments and environment together."""
    winner = argvs[-1]
    if len(winner) < 2:
        return [winner]
    head = winner[:-1]
    lasts = list(dict.fromkeys(argv[-1] for argv in argvs if len(argv) >= 2))
    try:
        limit = os.sysconf("SC_ARG_MAX")
    except (ValueError, OSError):
        limit = 131072
    # Pointers count too (8 bytes an item); keep a quarter for the loader and the unknown.
    fixed = sum(len(os.fsencode(k)) + len(os.fsencode(v)) + 10 for k, v in env.items())
    fixed += sum(len(os.fsencode(a)) + 9 for a in head)
    budget = max(4096, limit * 3 // 4 - fixed)
    out: list[list[str]] = []
    chunk: list[str] = []
    used = 0
    for arg in lasts:
        size = len(os.fsencode(arg)) + 9
        if chunk and used + size > budget:
            out.append(head + chunk)
            chunk, used = [], 0
        chunk.append(arg)
        used += size
    out.append(head + chunk)
    return out


def _check_program(name: str, path: str, cwd: str) -> tuple[int, str] | tuple[str, ...] | None:
    """What a shell would say before running ``name``: not found (127), not executable or a
    bad interpreter (126), as ``(status, message)``; else how to run it: ``None`` as it is,
    or a prefix (``("/bin/sh",)`` for an executable text file without ``#!``, which shells
    run as a script).

    Checked here rather than left to exec so the message is debounce's own whichever way the
    process is started (directly, or through setpriv and sh).
    """
    if "/" in name:
        candidates = [os.path.join(cwd, name)]
    else:
        candidates = [os.path.join(d or cwd, name) for d in path.split(os.pathsep)]
    denied = None
    for candidate in candidates:
        if os.path.isfile(candidate):
            if os.access(candidate, os.X_OK):
                return _interpreter_of(name, candidate)
            denied = denied or candidate
        elif "/" in name and os.path.isdir(candidate):
            return (126, f"debounce: {name}: is a directory\n")
    if denied is not None:
        return (126, f"debounce: {name}: permission denied\n")
    return (127, _not_found(name))


def _not_found(name: str) -> str:
    """As a shell says it: a path names a file that is not there; a bare name is looked up
    in PATH."""
    if "/" in name:
        return f"debounce: {name}: No such file or directory\n"
    return f"debounce: {name}: command not found\n"


def _interpreter_of(name: str, program: str) -> tuple[int, str] | tuple[str, ...] | None:
    try:
        with open(program, "rb") as f:
            head = f.read(256)
    except OSError:
        return None  # not readable: exec will say
    if head.startswith(b"#!"):
        words = head[2:].split(b"\n", 1)[0].split()
        if not words:
            return None
        interpreter = os.fsdecode(words[0])
        if not os.path.exists(interpreter):
            return (126, f"debounce: {name}: {interpreter}: bad interpreter: "
                         "No such file or directory\n")
        if not os.access(interpreter, os.X_OK) or os.path.isdir(interpreter):
            return (126, f"debounce: {name}: {interpreter}: bad interpreter: "
                         "Permission denied\n")
        return None
    if head and not head.startswith(b"\x7fELF"):
        return ("/bin/sh",)  # a script without #!: shells run it with sh
    return None


# ---------------------------------------------------------------- dying with the daemon
_PR_SET_PDEATHSIG = 1


@functools.cache
def pdeathsig_prefix() -> tuple[str, ...]:
    """``setpriv --pdeathsig KILL --`` when util-linux's setpriv can do it, else nothing.

    A parent-death signal needs code in the child between fork and exec. Python's
    ``preexec_fn`` can do that, but it rules out vfork and runs the interpreter in the child:
    about 3 ms a run instead of 1. setpriv sets the signal and execs the command in the same
    process, so the command keeps it.
    """
    import shutil

    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return ()
    prefix = (setpriv, "--pdeathsig", "KILL", "--")
    try:
        done = subprocess.run([*prefix, "true"], capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return ()
    return prefix if done.returncode == 0 else ()


@functools.cache
def _die_with_daemon() -> Callable[[], None] | None:
    """A ``preexec_fn`` asking the kernel to SIGKILL the child if the daemon dies first."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()
    sigkill = int(signal.SIGKILL)

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, sigkill)
        if os.getppid() != parent:  # the daemon died before the request took effect
            os._exit(137)

    return preexec


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode(errors="replace")
    except OSError:
        return None
    # The command name is in parentheses and may hold anything; the fields follow the last ')'.
    return data[data.rfind(")") + 2 :].split()


def kill_leftovers(daemon_id: str, run_ids: set[int], patience: float = 5.0) -> set[int]:
    """Kill what is left of the given runs of a daemon that died; return the runs found alive.

    Every process that carries ``DEBOUNCE_DAEMON=daemon_id`` and one of the ``run_ids`` in its
    environment (the marks every run's processes inherit) is killed with its whole process
    group, so nothing is missed for want of a committed pid, and an unrelated program that
    happens to reuse a pid is left alone. Waits up to ``patience`` seconds for them to go.
    """
    if not run_ids:
        return set()
    mark = f"{DAEMON_MARK}={daemon_id}".encode()
    wanted = {f"DEBOUNCE_RUN_ID={run_id}".encode(): run_id for run_id in run_ids}
    found: dict[int, int] = {}  # pid -> run id
    me = os.getpid()
    try:
        names = os.listdir("/proc")
    except OSError:
        return set()
    for name in names:
        if not name.isdigit() or int(name) == me:
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        if mark not in env:
            continue
        for item in env:
            run_id = wanted.get(item)
            if run_id is not None:
                found[int(name)] = run_id
                break
    for pid in found:
        fields = _stat_fields(pid)
        for target, kill in ((int(fields[2]) if fields and len(fields) > 2 else 0, os.killpg),
                             (pid, os.kill)):
            if target > 1:
                try:
                    kill(target, signal.SIGKILL)
                except OSError:
                    pass
    deadline = time.monotonic() + patience
    while time.monotonic() < deadline and any(_alive(pid) for pid in found):
        time.sleep(0.01)
    return set(found.values())


def _alive(pid: int) -> bool:
    """Still a process (a zombie waiting for its new parent to reap it counts as gone)."""
    fields = _stat_fields(pid)
    return fields is not None and bool(fields) and fields[0] != "Z"


class Ledger(NamedTuple):
    """What a started ledger says: the runs whose process started, and of those the runs whose
    end their daemon saw (exit status and wall-clock time) before it could commit it."""

    started: set[int]
    ended: dict[int, tuple[int, float]]


def read_ledger(path: str) -> Ledger:
    """Read a started ledger (see RunProcess and note_end); a torn last line is ignored."""
    started: set[int] = set()
    ended: dict[int, tuple[int, float]] = {}
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return Ledger(started, ended)
    for line in data.split(b"\n"):
        fields = line.split()
        try:
            if len(fields) == 1:
                started.add(int(fields[0]))
            elif len(fields) == 3:
                ended[int(fields[0])] = (int(fields[1]), float(fields[2]))
        except ValueError:
            continue
    return Ledger(started, ended)


def note_end(fd: int, run_id: int, code: int, when: float) -> None:
    """Append a run's end to the ledger at once, ahead of the commit that records it."""
    try:
        os.write(fd, f"{run_id} {code} {when:.3f}\n".encode())
    except OSError:
        pass  # then a crash before the commit records it lost, as without the line
