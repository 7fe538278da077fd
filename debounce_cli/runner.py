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
outright, its spawner (``spawner.py``) sees the daemon's end of their socket close and kills
every run it started, each with its process group, at once; and the next daemon on the socket
kills whatever is left of those runs (:func:`kill_leftovers`) before it records them as lost. A
run is never left going on its own while a new daemon could start the same key again.

The spawn path is one vfork and one exec of the command itself, as ``subprocess`` starts a
process. The daemon never forks: its spawner (``spawner.py``), a small Python process of its
own (about 9 MB, started with the daemon), starts each run with ``os.posix_spawn`` in a session
of its own. What must come before the command comes just before the spawn, in the spawner: a
look at its parent (a daemon that is gone gets no more runs), the run's directory, and the run
id appended to the started ledger, so the run is on record as started before its command can
exist. A ledger line that cannot be written (a full disk) means no spawn: the run ends with one
line saying so and status 126, and since it is not in the ledger, a daemon restarted after a
crash knows it never started.

If no spawner can be started, the daemon forks its runs itself (:func:`_fork_exec`): the
child asks for the parent-death signal, re-checks that its parent is alive (the signal is only
armed for a parent alive when it is asked), and then takes the same steps.

Why not what came before, ``setpriv --pdeathsig`` then ``sh`` writing the ledger line then
the command: two more execs a run, a ledger line whose failure did not stop the command, and
setpriv does not re-check its parent after arming the signal, so a run forked as the daemon
died ran its whole command with no daemon. Nor a fork with Python in the child (a
``preexec_fn``, or the fallback): the fork and the child's Python (every page it touches is
copied) cost about 1.4 ms of CPU a run against about 0.7 ms for posix_spawn, here.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import importlib
import os
import signal
import time
from collections.abc import Callable, Iterable
from typing import NamedTuple

from debounce_cli import outputs
from debounce_cli.spawner import spawner as _spawner

#: How long to keep reading output after the command exited: a background child that inherited
#: the pipes must not keep the run open.
DRAIN_GRACE = 1.0

#: How often a stopped run whose first process has exited looks for the rest of its group.
GROUP_POLL = 0.05
#: How long after SIGKILL a stopped run waits for the rest of its group to go.
KILL_PATIENCE = 5.0

OnOutput = Callable[[int, bytes], None]


#: In every run's environment: the daemon (socket) it belongs to, so that the next daemon on
#: the socket finds what is left of its runs without a committed pid (with DEBOUNCE_RUN_ID).
DAEMON_MARK = "DEBOUNCE_DAEMON"

#: The status of a run whose process could not be started (as a shell's 126).
CANNOT_START = 126


class RunProcess:
    """One run's process: ``start`` it, ``signal`` it, ``wait`` for its exit status.

    With a ``ledger`` (an open ``O_APPEND`` descriptor of the started ledger, and its path
    for messages), the process appends its ``DEBOUNCE_RUN_ID`` to it between fork and exec,
    and is not executed if that fails: the evidence the next daemon needs, after a crash, to
    tell a run that started from one that never did.
    """

    def __init__(self, argv: list[str], cwd: str, env: dict[str, str], on_output: OnOutput,
                 ledger: tuple[int, str] | None = None):
        self.argv = argv
        self.cwd = cwd
        self.env = env
        self.on_output = on_output
        self.ledger = ledger
        self.pid: int | None = None
        self.child: _Child | None = None
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
        problem, found = _resolve(name, self.env.get("PATH", os.defpath), self.cwd)
        shell: tuple[str, ...] = ()
        if problem is not None and isinstance(problem[0], int):
            # (A directory that is gone is said first. When the command is found, the child
            # enters the directory just before its exec, and says the same if it cannot.)
            if not os.path.isdir(self.cwd):
                self.start_error = self._failure("chdir", errno.ENOENT)
            else:
                self.start_error = (problem[0], str(problem[1]))
            return
        if problem is not None:
            shell = tuple(str(word) for word in problem)
        argv = [*shell, *self.argv]
        program = shell[0] if shell else found or name
        line = None
        if self.ledger is not None:
            line = f"{self.env.get('DEBOUNCE_RUN_ID', '0')}\n".encode()
        child = _Child(self.on_output)
        failure = await child.start(program, argv, self.cwd, self.env,
                                    self.ledger[0] if self.ledger else None, line)
        if failure is None:
            self.pid = child.pid
            self.child = child
            child.watch()
            return
        self.pid = None
        stage, code = failure
        self.start_error = self._failure(stage, code)

    def _failure(self, stage: str, code: int) -> tuple[int, str]:
        """The status and message of a child that stopped short of the exec at ``stage``."""
        name = self.argv[0]
        why = os.strerror(code)
        if stage == "ledger":
            where = self.ledger[1] if self.ledger else "the started ledger"
            return (CANNOT_START, f"debounce: not started: cannot record the run as started in "
                                  f"{where}: {why}\n")
        if stage == "chdir":
            return (CANNOT_START, f"debounce: cannot enter {self.cwd}: {why}\n")
        if stage == "exec":
            if code == errno.ENOENT:
                return (127, _not_found(name))
            if code == errno.EACCES:
                return (CANNOT_START, f"debounce: {name}: permission denied\n")
            return (CANNOT_START, f"debounce: {name}: {why}\n")
        if stage == "parent":
            return (CANNOT_START, "debounce: not started: the daemon is gone\n")
        if stage == "spawner":
            return (CANNOT_START, "debounce: not started: the daemon's spawner is gone\n")
        return (CANNOT_START, f"debounce: {name}: cannot start ({stage}): {why}\n")

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
        child = self.child
        assert child is not None
        status = await child.exited
        # What the command wrote before it exited is still in the pipes: read it, but do not
        # wait for a background child that keeps them open. (Mostly both pipes have ended by
        # now: then no timer, shield and wait.)
        if not child.drained.done():
            try:
                await asyncio.wait_for(asyncio.shield(child.drained), DRAIN_GRACE)
            except TimeoutError:
                pass
        if self.kill_at is not None:
            await self._until_group_gone(self.kill_at)
        child.close()
        self.finished = True
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


#: How long a command found in PATH is taken to be the same file without searching again.
RESOLVED_FOR = 1.0
_Found = tuple[tuple[int, str] | tuple[str, ...] | None, str | None]
#: (name, PATH, cwd) -> what _check_program said, the file's identity, when it was looked up.
_resolved: dict[tuple[str, str, str], tuple[_Found, tuple[int, int, int, int], float]] = {}


def _identity(path: str) -> tuple[int, int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_mode)


def _resolve(name: str, path: str, cwd: str) -> _Found:
    """:func:`_check_program`, remembered for ``RESOLVED_FOR`` seconds while the file found
    is the same one (same inode, times and mode: one ``stat``), as a shell's hash table
    remembers where a command is. A burst of runs of one command searched PATH, stat'ing
    each directory and reading the file's first bytes, for every run: about a tenth of a
    millisecond each. Failures are never remembered: their message must be the truth of now.
    (What is not seen within that second: a file of that name new in an earlier directory
    of PATH.)"""
    key = (name, path, cwd)
    now = time.monotonic()
    known = _resolved.get(key)
    if known is not None and now - known[2] < RESOLVED_FOR:
        said, same, _when = known
        if said[1] is not None and _identity(said[1]) == same:
            return said
    found = _check_program(name, path, cwd)
    identity = _identity(found[1]) if found[1] is not None else None
    if identity is not None and (found[0] is None or not isinstance(found[0][0], int)):
        if len(_resolved) >= 256:
            _resolved.clear()
        _resolved[key] = (found, identity, now)
    else:
        _resolved.pop(key, None)
    return found


def _check_program(name: str, path: str, cwd: str
                   ) -> tuple[tuple[int, str] | tuple[str, ...] | None, str | None]:
    """What a shell would say before running ``name``: not found (127), not executable or a
    bad interpreter (126), as ``(status, message)``; else how to run it: ``None`` as it is,
    or a prefix (``("/bin/sh",)`` for an executable text file without ``#!``, which shells
    run as a script). With it, the file found (what exec is given), or None.

    Checked here rather than left to exec so the message is debounce's own, and the PATH
    search is done once, in the daemon, rather than again in the child.
    """
    if "/" in name:
        candidates = [os.path.join(cwd, name)]
    else:
        candidates = [os.path.join(d or cwd, name) for d in path.split(os.pathsep)]
    denied = None
    for candidate in candidates:
        if os.path.isfile(candidate):
            if os.access(candidate, os.X_OK):
                return _interpreter_of(name, candidate), candidate
            denied = denied or candidate
        elif "/" in name and os.path.isdir(candidate):
            return (126, f"debounce: {name}: is a directory\n"), None
    if denied is not None:
        return (126, f"debounce: {name}: permission denied\n"), None
    return (127, _not_found(name)), None


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



# ---------------------------------------------------------------- the spawn path
_PR_SET_PDEATHSIG = 1
_SIGKILL = int(signal.SIGKILL)
#: ``signal.pthread_sigmask`` turns each of the 60-odd signals of a mask into an enum member
#: (a quarter of a millisecond a call); the C function underneath works on plain ints.
_sigmask: Callable[[int, Iterable[int]], set[int]] = (
    importlib.import_module("_signal").pthread_sigmask)
_ALL_SIGNALS = frozenset(int(s) for s in signal.valid_signals())
#: Signals the daemon may handle or ignore: back to their defaults in a run's process.
_HANDLED = tuple(getattr(signal, name) for name in (
    "SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGCHLD", "SIGPIPE",
    "SIGXFSZ", "SIGWINCH", "SIGALRM") if hasattr(signal, name))


@functools.cache
def _prctl() -> Callable[[int, int], int] | None:
    """libc's ``prctl``, loaded once in the daemon (never in a child), or None."""
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def start_spawner() -> None:
    """Start the daemon's spawner, and load ``prctl`` for the fallback fork (see
    :func:`_fork_exec`), before the first run: not in the middle of its start."""
    _prctl()
    _devnull()
    _spawner.launch()


@functools.cache
def _devnull() -> int:
    """One descriptor of /dev/null for every run's stdin (close-on-exec; dup2 makes a copy)."""
    return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)


def _fork_exec(program: str, argv: list[str], cwd: str, env: dict[str, str],
               ledger_fd: int | None, line: bytes | None, report_w: int, out_w: int,
               err_w: int, daemon: int, mask: Iterable[int]) -> None:
    """In the forked child: everything between fork and exec, then the exec. Never returns.

    Each step that fails writes ``stage:errno`` on ``report_w`` and exits 127 before the
    command could run. The child starts with every signal blocked (the daemon blocks them
    around the fork): until its handlers are reset, a signal for the run (a quick ``debounce
    kill``) would run the daemon's handlers here and reach the daemon's wakeup descriptor.
    They are unblocked (``mask``, the daemon's own) just before the exec, with default
    dispositions, so a signal sent meanwhile acts on the command as it would have. The order
    is the point:

    1. the parent-death signal, then a look at the parent: ``PR_SET_PDEATHSIG`` only arms for
       the parent alive when it is asked, so a daemon that died a moment before (the child
       already belongs to init) would go unnoticed, and the command would run with no daemon;
    2. its own session and process group (``setsid``), so stopping the run reaches its
       children; stdin from /dev/null, stdout and stderr to the run's pipes; the signals
       Python ignores (SIGPIPE, SIGXFSZ) back to their defaults, as subprocess does;
    3. the working directory;
    4. the run id appended to the started ledger (one ``write`` on an ``O_APPEND``
       descriptor, no fsync: the line must outlive the daemon, not the machine): the run is
       on record as started before its command can exist, and a line that cannot be written
       means the command never runs;
    5. every other descriptor closed (``close_range``), and the exec.
    """
    stage = "signals"
    try:
        signal.set_wakeup_fd(-1)
        for sig in _HANDLED:
            if signal.getsignal(sig) not in (signal.SIG_DFL, None):
                signal.signal(sig, signal.SIG_DFL)
        stage = "pdeathsig"
        prctl = _prctl()
        if prctl is not None and prctl(_PR_SET_PDEATHSIG, _SIGKILL) != 0:
            raise OSError(errno.EINVAL, "prctl")
        if os.getppid() != daemon:
            stage = "parent"
            raise OSError(errno.ESRCH, "parent")
        stage = "setsid"
        os.setsid()
        os.dup2(_devnull(), 0)
        os.dup2(out_w, 1)
        os.dup2(err_w, 2)
        stage = "chdir"
        os.chdir(cwd)
        if ledger_fd is not None and line is not None:
            stage = "ledger"
            if os.write(ledger_fd, line) != len(line):
                raise OSError(errno.ENOSPC, "short write")
        stage = "exec"
        os.closerange(3, report_w)
        os.closerange(report_w + 1, 1 << 20)
        _sigmask(signal.SIG_SETMASK, mask)
        os.execve(program, argv, env)
    except BaseException as exc:  # noqa: BLE001 - the child only reports and exits
        code = exc.errno if isinstance(exc, OSError) and exc.errno else errno.EINVAL
        try:
            os.write(report_w, f"{stage}:{code}".encode())
        finally:
            os._exit(127)
    os._exit(127)


class _Child:
    """One forked run process seen from the daemon: its pipes, its report, its exit.

    Output arrives through two pipes read by the event loop; the exit through a pidfd (one
    descriptor in the loop, no thread), else by polling ``waitpid``. The exit status is kept
    as ``subprocess`` gives it: negative for a signal.
    """

    def __init__(self, on_output: OnOutput) -> None:
        self.loop = asyncio.get_running_loop()
        self.on_output = on_output
        self.pid = 0
        self.fds: dict[int, int] = {}  # read end -> 1 (stdout) or 2 (stderr)
        self.report_r = -1
        self.pidfd = -1
        self.exited: asyncio.Future[int] = self.loop.create_future()
        self.drained: asyncio.Future[None] = self.loop.create_future()
        self.spawned = False  # started by the spawner rather than forked here

    async def start(self, program: str, argv: list[str], cwd: str, env: dict[str, str],
                    ledger_fd: int | None, line: bytes | None) -> tuple[str, int] | None:
        """Start the run's process: by the spawner, else by a fork of the daemon itself.
        Return None once the command is executing, else the step that failed and its errno."""
        if not _spawner.attach(self.loop):
            pid = self.fork(program, argv, cwd, env, ledger_fd, line)
            failure = await self.report()
            if failure is not None:
                self.reap(pid)
            return failure
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        self.fds = {out_r: 1, err_r: 2}
        fds = [out_w, err_w] if ledger_fd is None else [out_w, err_w, os.dup(ledger_fd)]
        # The spawner owns these descriptors now (closed here once sent).
        waiting = _spawner.spawn(self, (program, argv, cwd, env, line), fds)
        self.spawned = True
        pid, said = await waiting
        if said:
            for fd in self.fds:
                os.close(fd)
            self.fds = {}
            stage, _, code = said.partition(":")
            try:
                return stage, int(code)
            except ValueError:
                return stage, errno.EINVAL
        self.pid = pid
        return None

    def ended(self, code: int) -> None:
        """The spawner saw the process exit with ``code`` (negative: killed by a signal)."""
        if not self.exited.done():
            self.exited.set_result(code)

    def fork(self, program: str, argv: list[str], cwd: str, env: dict[str, str],
             ledger_fd: int | None, line: bytes | None) -> int:
        """Fork the child (see :func:`_fork_exec`); return its pid."""
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        report_r, report_w = os.pipe()
        daemon = os.getpid()
        mask = _sigmask(signal.SIG_BLOCK, _ALL_SIGNALS)
        try:
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child never returns
                _fork_exec(program, argv, cwd, env, ledger_fd, line, report_w, out_w, err_w,
                           daemon, mask)
        except BaseException:
            for fd in (out_r, err_r, report_r):
                os.close(fd)
            raise
        finally:
            _sigmask(signal.SIG_SETMASK, mask)
            for fd in (out_w, err_w, report_w):
                os.close(fd)
        self.pid = pid
        self.fds = {out_r: 1, err_r: 2}
        self.report_r = report_r
        return pid

    async def report(self) -> tuple[str, int] | None:
        """Wait for the child to exec (None) or to say which step failed, and with what.

        The loop goes on meanwhile (answering clients, starting the next run) rather than
        block as ``subprocess`` does: on two cores that overlap is worth more than the pages
        the daemon copies by writing to them while the child still shares them.
        """
        future: asyncio.Future[bytes] = self.loop.create_future()
        got: list[bytes] = []
        fd = self.report_r
        os.set_blocking(fd, False)

        def readable() -> None:
            try:
                data = os.read(fd, 256)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if data:
                got.append(data)
                return
            self.loop.remove_reader(fd)
            if not future.done():
                future.set_result(b"".join(got))

        self.loop.add_reader(fd, readable)
        try:
            text = await future
        finally:
            self.loop.remove_reader(fd)
            os.close(fd)
            self.report_r = -1
        if not text:
            return None
        stage, _, code = text.decode(errors="replace").partition(":")
        try:
            return stage, int(code)
        except ValueError:
            return stage, errno.EINVAL

    def reap(self, pid: int) -> None:
        """A child that reported a failure: it has exited (or is about to); collect it."""
        for fd in self.fds:
            os.close(fd)
        self.fds = {}
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass

    def watch(self) -> None:
        """Read the output pipes and watch for the exit, in the event loop."""
        watched = outputs.pipes(self.loop)
        for fd in self.fds:
            os.set_blocking(fd, False)
            watched.add(fd, self._readable)
        if self.spawned:
            return  # the spawner reports the exit (ended)
        try:
            self.pidfd = os.pidfd_open(self.pid)
        except (AttributeError, OSError):
            self.loop.create_task(self._poll_exit())
        else:
            self.loop.add_reader(self.pidfd, self._collect)

    def _readable(self, fd: int) -> None:
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            self.on_output(self.fds[fd], data)
            return
        self._close_pipe(fd)

    def _close_pipe(self, fd: int) -> None:
        outputs.pipes(self.loop).remove(fd)
        os.close(fd)
        del self.fds[fd]
        if not self.fds and not self.drained.done():
            self.drained.set_result(None)

    def _collect(self) -> bool:
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:  # reaped elsewhere: the status is unknown
            pid, status = self.pid, 255 << 8
        if pid == 0:
            return False
        if self.pidfd >= 0:
            self.loop.remove_reader(self.pidfd)
            os.close(self.pidfd)
            self.pidfd = -1
        if not self.exited.done():
            self.exited.set_result(os.waitstatus_to_exitcode(status))
        return True

    async def _poll_exit(self) -> None:
        while not self._collect():
            await asyncio.sleep(0.01)

    def close(self) -> None:
        """Stop reading (a background child may still hold the pipes open)."""
        for fd in list(self.fds):
            self._close_pipe(fd)


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
