"""The spawn path (issue 21; issue 23, items 3 and 11): one exec of the command, and every
promise kept around it.

- A run is on record as started (its line in the started ledger) before its command can run,
  and a run whose line cannot be written never runs its command: it ends with one line saying
  so and status 126, and is not run again after a crash (item 3: a full disk and kill -9 ran
  acknowledged work twice).
- A run dies with its daemon, also when the daemon dies while the run's process is being
  started (item 11: a first process that began after its daemon had died ran the whole command
  with no daemon, because setpriv armed the parent-death signal without looking at the parent;
  now the spawner looks at its parent before each start and kills its runs when the daemon's
  socket closes).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import pytest
from test_chaos import connect, proc_stat
from test_durability import lock_pid

from debounce_cli import protocol

from conftest import World, lines, status, wait_until

#: Notes its key in $2, sleeps $3 seconds, then notes its key in $4 (the run completed).
SCRIPT = 'echo "$1" >> "$2"; sleep "$3"; echo "$1" >> "$4"'


def start_daemon(world: World, env: dict[str, str], log: Path) -> subprocess.Popen:
    """``debounce daemon --idle-exit 0`` for ``env``'s socket; wait until it answers."""
    with open(log, "ab") as out:
        proc = world.popen("daemon", "--idle-exit", "0", env=env, stdout=out,
                           stderr=subprocess.STDOUT)
    probe = World.__new__(World)
    probe.socket = env["DEBOUNCE_SOCKET"]

    def serving() -> bool:
        if proc.poll() is not None:
            return True
        try:
            sock, reader, pid = connect(probe)
        except OSError:
            return False
        reader.close()
        sock.close()
        return pid == proc.pid

    wait_until(serving, timeout=30)
    assert proc.poll() is None, log.read_text()
    return proc


def submit_all(socket_path: str, requests: list[protocol.RunRequest]) -> set[str]:
    """Send every request pipelined on one connection; return the keys acknowledged."""
    probe = World.__new__(World)
    probe.socket = socket_path
    sock, reader, _pid = connect(probe)
    try:
        sock.sendall(b"".join(protocol.encode(r) for r in requests))
        acked = set()
        for _ in requests:
            reply = protocol.decode(reader.readline(), protocol.REPLIES)
            if isinstance(reply, protocol.Accepted):
                acked.add(reply.key)
        return acked
    finally:
        reader.close()
        sock.close()


def pending(socket_path: str) -> int:
    """How many keys the daemon on ``socket_path`` holds pending (not yet started)."""
    probe = World.__new__(World)
    probe.socket = socket_path
    sock, reader, _pid = connect(probe)
    try:
        sock.sendall(protocol.encode(protocol.StatusRequest()))
        reply = protocol.decode(reader.readline(), protocol.REPLIES)
    finally:
        reader.close()
        sock.close()
    assert isinstance(reply, protocol.StatusReply), reply
    return sum(1 for k in reply.keys if k.pending is not None)


def marked(socket_path: str) -> list[int]:
    """Live processes (not zombies) whose environment names ``socket_path``: runs and theirs."""
    mark = f"DEBOUNCE_SOCKET={socket_path}".encode()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        st = proc_stat(int(name))
        if mark in env and st is not None and st[0] not in ("Z", "X"):
            found.append(int(name))
    return found


def kill_marked(socket_path: str) -> None:
    for pid in marked(socket_path):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def history(world: World, env: dict[str, str]) -> list[dict]:
    r = world.run("history", "--json", "--limit", "100000", env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    return [json.loads(line) for line in r.stdout.splitlines() if line.strip()]


# ----------------------------------------------------------------------------- item 11


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_no_run_outlives_a_daemon_killed_while_its_runs_start(world):
    """Issue 23, item 11: 1,000 keys fall due at once and the daemon is killed with SIGKILL
    while their processes start. Each run notes its key, sleeps 20 s and notes its key
    again: a second note can only come from a run that went on without its daemon (a run
    that began before the kill had far less than 20 s of it, even on a machine so busy that
    the kill comes seconds after the first runs began; 3 s was not enough there). Several
    rounds, a fresh daemon and state each, since the race is a matter of a fraction of a
    millisecond."""
    keys, rounds = 1000, 6
    mid_start = 0
    for number in range(rounds):
        base = world.root / f"r{number}"
        (base / "s").mkdir(parents=True, mode=0o700)
        os.chmod(base / "s", 0o700)
        env = dict(world.env, DEBOUNCE_SOCKET=str(base / "s" / "d.sock"),
                   DEBOUNCE_STATE_DIR=str(base / "state"))
        began, done = base / "began", base / "done"
        daemon = start_daemon(world, env, base / "daemon.out")
        try:
            requests = [protocol.RunRequest(
                argv=["sh", "-c", SCRIPT, "sh", f"k{i}", str(began), "20", str(done)],
                cwd=str(world.work), env=env, key=f"k{i}", options={"delay": 0.3},
                wait=False) for i in range(keys)]
            assert len(submit_all(env["DEBOUNCE_SOCKET"], requests)) == keys
            # Kill while the runs start: some have begun, most are still to come.
            least = 20 + 30 * number
            wait_until(lambda b=began, n=least: len(lines(b)) >= n, timeout=60,
                       interval=0.001)
            os.kill(daemon.pid, signal.SIGKILL)
            daemon.wait(timeout=30)
            killed_at = time.monotonic()
            # A round where every run had begun before the kill still checks that they all
            # die with their daemon; at least one round must kill mid-start (below).
            mid_start += len(lines(began)) < keys
            # Processes a dead daemon left: a run's `sleep`, orphaned when the kernel killed
            # its `sh`, may stay its 20 s; a run that outlived its daemon ends its script.
            sock = env["DEBOUNCE_SOCKET"]
            wait_until(lambda s=sock: not marked(s), timeout=45)
            survivors = lines(done)
            assert time.monotonic() - killed_at < 60
            assert survivors == [], (
                f"round {number}: {len(survivors)} run(s) ran their whole command after "
                f"their daemon died: {survivors[:5]}")
        finally:
            if daemon.poll() is None:
                daemon.kill()
                daemon.wait()
            kill_marked(env["DEBOUNCE_SOCKET"])
    if not mid_start:
        pytest.skip(f"in none of {rounds} rounds did the kill come while runs were still "
                    "starting (a machine this busy starts all 1,000 before the test acts)")


# ----------------------------------------------------------------------------- item 3


@pytest.fixture
def small_tmpfs():
    """An 8 MiB tmpfs, unmounted afterwards; skip where mounting is not allowed."""
    if sys.platform != "linux" or os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("needs root on Linux to mount a small tmpfs")
    where = Path(tempfile.mkdtemp(prefix="dbt-fs-", dir="/tmp"))
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m,mode=0700", "tmpfs", str(where)],
                       capture_output=True, text=True, check=False)
    if r.returncode != 0:
        where.rmdir()
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, check=False)
        shutil.rmtree(where, ignore_errors=True)


def fill(directory: Path) -> Path:
    """Take every free byte of ``directory``'s file system; return the file that holds them."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for size in (1 << 16, 512, 1):
            chunk = b"\0" * size
            try:
                while os.write(fd, chunk) == size:
                    pass
            except OSError:
                pass  # full at this size: on with a smaller one, to the last byte
    finally:
        os.close(fd)
    return filler


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_full_disk_and_kill_9_never_run_acknowledged_work_twice(world, small_tmpfs):
    """Issue 23, item 3: the state directory on a small tmpfs, filled once 300 invocations
    are acknowledged (and the journal checkpointed); kill -9 when 40 % of them have been
    started (left pending); free the space; a new daemon
    works off the rest. No command may run twice (before: the ledger line failed with "I/O
    error", the command ran anyway, and the next daemon, seeing no line, ran it again); and
    every acknowledged key either ran once or ended with status 126 and a line that says it
    was not started."""
    keys = 300
    env = dict(world.env, DEBOUNCE_STATE_DIR=str(small_tmpfs / "state"))
    began = world.root / "began"
    daemon = start_daemon(world, env, world.root / "daemon.out")
    filler = None
    try:
        requests = [protocol.RunRequest(
            argv=["sh", "-c", 'echo "$1" >> "$2"', "sh", f"k{i}", str(began)],
            cwd=str(world.work), env=env, key=f"k{i}", options={"delay": 1.5}, wait=False)
            for i in range(keys)]
        acked = submit_all(world.socket, requests)
        assert len(acked) == keys
        # A checkpoint, as a long-lived daemon's journal has from time to time: its log file
        # keeps its size and is written again from the start, so commits need no new space
        # on the full disk, while the started ledger (emptied at start-up) does.
        db = sqlite3.connect(small_tmpfs / "state" / "journal.db", timeout=10)
        try:
            assert db.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()[0] == 0
        finally:
            db.close()
        filler = fill(small_tmpfs)
        wait_until(lambda: keys - pending(world.socket) >= keys * 2 // 5, timeout=60,
                   interval=0.001)
        os.kill(daemon.pid, signal.SIGKILL)
        daemon.wait(timeout=30)
        wait_until(lambda: lock_pid(world.socket) is None, timeout=10)
        filler.unlink()
        filler = None
        daemon = start_daemon(world, env, world.root / "daemon.out")

        def settled() -> bool:
            r = world.run("status", "--json", env=env, timeout=60)
            return r.returncode == 0 and not json.loads(r.stdout)["keys"]

        wait_until(settled, timeout=120, interval=0.2)
        twice = {key: n for key, n in Counter(lines(began)).items() if n > 1}
        assert not twice, f"{len(twice)} acknowledged run(s) started twice: {sorted(twice)[:5]}"
        ran = set(lines(began))
        runs = history(world, env)
        not_started = {r["key"] for r in runs if r["exit_code"] == 126}
        assert not (not_started & ran), "a run said not started ran its command"
        assert acked <= ran | not_started | {r["key"] for r in runs if r["outcome"] == "lost"}
        for run in [r for r in runs if r["exit_code"] == 126][:3]:
            out = world.run("logs", "--run", str(run["run_id"]), env=env)
            if out.returncode == 0 and out.stderr:
                assert "not started: cannot record the run as started" in out.stderr, out.stderr
                assert out.stderr.count("\n") == 1, out.stderr
    finally:
        if filler is not None:
            filler.unlink()
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        kill_marked(world.socket)


# ----------------------------------------------------------------------------- the spawner


def spawner_of(daemon_pid: int) -> int | None:
    """The daemon's spawner: its child ``python -I -S -c ...`` (see spawner.PROGRAM)."""
    from test_chaos import children, is_spawner

    found = [pid for pid in children(daemon_pid) if is_spawner(pid)]
    return found[0] if found else None


def test_a_spawner_killed_on_its_own_takes_its_runs_and_the_daemon_goes_on(world):
    """The runs' processes are started by the daemon's spawner. Killed by itself (kill -9),
    the daemon kills the runs it had started (none goes on unwatched): the run ends killed
    (137) and its waiter learns it; the daemon starts another spawner for the next run."""
    r = world.run("status")
    assert r.returncode == 0, r.stderr
    daemon = world.daemon_pid()
    assert daemon
    spawner = wait_until(lambda: spawner_of(daemon))
    waiter = world.popen("run", "--key", "long", "--delay", "0", "--", "sleep", "30")
    wait_until(lambda: any(k["running"] for k in status(world)["keys"]), timeout=15)
    os.kill(spawner, signal.SIGKILL)
    _out, err = waiter.communicate(timeout=30)
    assert waiter.returncode == 137, err
    r = world.run("run", "--delay", "0", "--", "sh", "-c", "echo again")
    assert (r.returncode, r.stdout) == (0, "again\n"), r.stderr
    assert world.daemon_pid() == daemon
    assert spawner_of(daemon) not in (None, spawner)


def test_the_spawner_dies_with_its_daemon(world):
    """kill -9 of the daemon: its spawner goes too, at once (nothing starts runs for a daemon
    that is gone)."""
    r = world.run("status")
    assert r.returncode == 0, r.stderr
    daemon = world.daemon_pid()
    assert daemon
    spawner = wait_until(lambda: spawner_of(daemon))
    os.kill(daemon, signal.SIGKILL)
    wait_until(lambda: (proc_stat(spawner) or ("X",))[0] in ("Z", "X"), timeout=10)


#: Exits 3 if the log of its own run exists while it runs (it has written nothing yet).
NO_LOG_YET = ('test -z "$(find "$DEBOUNCE_STATE_DIR" -name "$DEBOUNCE_RUN_ID.log")" || exit 3; '
              'printf "$1"')


def test_a_runs_log_is_made_at_its_first_output_not_before_its_spawn(world):
    """Creating a file costs a start ~0.1 ms of CPU and more of waiting on the disk, which a
    burst of runs paid before each later command started: a run's log is made at its first
    output. A run that writes nothing still has its (empty) log for ``debounce logs``."""
    quiet = world.run("run", "--delay", "0", "--json", "--", "sh", "-c", NO_LOG_YET, "sh", "")
    assert quiet.returncode == 0, quiet.stderr
    run_id = json.loads(quiet.stdout)["run_id"]
    said = world.run("run", "--delay", "0", "--", "sh", "-c", NO_LOG_YET, "sh", "said\\n")
    assert (said.returncode, said.stdout) == (0, "said\n"), said.stderr
    shown = world.run("logs", "--run", str(run_id))
    assert (shown.returncode, shown.stdout, shown.stderr) == (0, "", "")
    shown = world.run("logs", "--run", str(run_id + 1))
    assert (shown.returncode, shown.stdout) == (0, "said\n"), shown.stderr


def test_a_lazy_log_is_made_by_its_first_write_or_when_asked(tmp_path):
    from debounce_cli.logfile import LogWriter, read_log

    first, second = tmp_path / "1.log", tmp_path / "2.log"
    written = LogWriter(str(first), lazy=True)
    asked = LogWriter(str(second), lazy=True)
    assert not first.exists() and not second.exists()
    assert written.write(1, b"out") == 8
    assert list(read_log(str(first))) == [(1, b"out")]
    asked.close()  # the run ended with no output: made when a reader asks, and empty
    assert not second.exists()
    assert asked.make()
    assert list(read_log(str(second))) == []
    written.close()
    (tmp_path / "ro").mkdir(mode=0o500)
    if os.geteuid() != 0:  # root may create files in a read-only directory
        blocked = LogWriter(str(tmp_path / "ro" / "3.log"), lazy=True)
        assert blocked.write(1, b"x") is None and not blocked.make()
        assert blocked.error is not None and "cannot create it" in blocked.error


def test_a_command_found_in_path_is_looked_up_once_a_second_while_it_is_the_same_file(
        tmp_path, monkeypatch):
    """A burst of runs of one command searched PATH for each (a stat per directory, and the
    file's first bytes read): about 0.1 ms a run. Found once, it is taken as found for
    RESOLVED_FOR seconds while it is the same file; a change to the file (its mode, its
    contents) or its going away is seen at once, and failures are never remembered."""
    from debounce_cli import runner

    now = [1000.0]
    monkeypatch.setattr(runner.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(runner, "_resolved", {})
    searches = []
    check = runner._check_program

    def counted(name: str, path: str, cwd: str):  # type: ignore[no-untyped-def]
        searches.append(name)
        return check(name, path, cwd)

    monkeypatch.setattr(runner, "_check_program", counted)
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    tool = second / "tool"
    tool.write_text("#!/bin/sh\necho b\n")
    tool.chmod(0o755)
    path = f"{first}:{second}"
    assert runner._resolve("tool", path, "/") == (None, str(tool))
    assert runner._resolve("tool", path, "/") == (None, str(tool))
    assert len(searches) == 1
    tool.chmod(0o644)  # no longer executable: seen at once
    assert runner._resolve("tool", path, "/")[0] == (126, "debounce: tool: permission denied\n")
    assert runner._resolve("tool", path, "/")[0][0] == 126  # never remembered
    assert len(searches) == 3
    tool.chmod(0o755)
    assert runner._resolve("tool", path, "/") == (None, str(tool))
    earlier = first / "tool"  # a file of that name new in an earlier directory of PATH
    earlier.write_text("#!/bin/sh\necho a\n")
    earlier.chmod(0o755)
    assert runner._resolve("tool", path, "/") == (None, str(tool))  # within the second
    now[0] += runner.RESOLVED_FOR
    assert runner._resolve("tool", path, "/") == (None, str(earlier))
    earlier.unlink()
    assert runner._resolve("tool", path, "/") == (None, str(tool))
    tool.unlink()
    assert runner._resolve("tool", path, "/")[0] == (127, "debounce: tool: command not found\n")
    assert len(searches) == 7


def test_a_log_that_cannot_be_made_at_the_first_output_is_said_once_and_the_run_has_none(world):
    """Made lazily, a log that cannot be created fails at the run's first output, not at its
    start: the daemon says so in one line, the waiter still gets the output live, and the run
    is recorded with no log, so ``debounce logs`` says there is none (as when it failed at the
    start) instead of pointing the client at a file that is not there."""
    from debounce_cli.client import daemon_log_path

    first = world.run("run", "--delay", "0", "--", "true")
    assert first.returncode == 0, first.stderr
    (log_dir,) = (world.state / "logs").iterdir()
    (log_dir / "2.log").mkdir()  # the next run's log cannot be created (EISDIR, even as root)
    said = world.run("run", "--delay", "0", "--json", "--", "sh", "-c", "echo said >&2")
    assert said.returncode == 0 and said.stderr == "said\n", said.stderr
    assert json.loads(said.stdout)["run_id"] == 2
    shown = world.run("logs", "--run", "2")
    assert shown.returncode == 117 and shown.stdout == "", shown
    assert shown.stderr == "debounce: the log of run 2 is no longer kept\n", shown.stderr
    (daemon_log,) = world.state.glob(Path(daemon_log_path(world.socket)).name)
    daemon_said = daemon_log.read_text()
    assert daemon_said.count("run 2 keeps no log: cannot create it (Is a directory)") == 1, \
        daemon_said


@pytest.mark.parametrize("command", [["echo", "hi"], ["./hello"]])
def test_a_run_whose_directory_is_gone_by_its_start_says_so_and_ends_126(world, command):
    """The directory is entered by the spawner just before the exec (a command found in PATH),
    or found missing when a command named by a relative path is looked for: either way one
    line naming the directory, and 126, as a shell says of what it cannot run."""
    gone = world.work / "gone"
    gone.mkdir()
    script = gone / "hello"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o755)
    waiting = world.popen("run", "--key", "gone", "--delay", "1s", "--", *command, cwd=gone)
    wait_until(lambda: any(k["key"] == "gone" and k["pending"]
                           for k in status(world)["keys"]), timeout=15)
    shutil.rmtree(gone)
    out, err = waiting.communicate(timeout=30)
    assert waiting.returncode == 126, err
    assert out == ""
    assert f"debounce: cannot enter {gone}: No such file or directory" in err
