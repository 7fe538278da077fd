"""Durability: what the daemon acknowledged survives kill -9, SIGTERM, dying clients and a
full disk; history, logs and the permissions of everything stored.

Every test drives the real CLI and daemon as subprocesses in an isolated world (conftest.py).
Runs append a line to a file in ``world.work`` so the tests observe what ran, and when.
Waiting is on conditions with deadlines; a sleep only spaces submissions out or waits past a
due time to show that something did *not* happen.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import stat
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest

from conftest import lines, status, wait_until

# ----------------------------------------------------------------------------- helpers

#: A command that appends "<key> <wall-clock time>" to a file: what ran, and when.
STAMP = 'echo "$DEBOUNCE_KEY $(date +%s.%N)" >> "$0"'


def stamps(path: Path) -> list[tuple[str, float]]:
    """(key, wall time) per line written by STAMP."""
    out = []
    for line in lines(path):
        key, when = line.split()
        out.append((key, float(when)))
    return out


def history(world, *args: str, env=None) -> list[dict]:
    proc = world.run("history", "--json", *args, timeout=20, **({"env": env} if env else {}))
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]


def pending_keys(world, env=None) -> set[str]:
    return {row["key"] for row in status(world, env)["keys"] if row.get("pending")}


def pid_gone(pid: int) -> bool:
    """The process no longer runs (absent, or a zombie waiting to be reaped)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in (b"Z", b"X")


def lock_pid(sock_path: str) -> int | None:
    """The pid of the daemon holding the lock of ``sock_path`` (like World.daemon_pid)."""
    import fcntl

    try:
        fd = os.open(sock_path + ".lock", os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None
    except BlockingIOError:
        text = os.read(fd, 64).decode().strip()
        return int(text) if text else None
    finally:
        os.close(fd)


def kill9(sock_path: str) -> None:
    """SIGKILL the daemon of ``sock_path`` and wait until it has let go of its lock."""
    pid = lock_pid(sock_path)
    assert pid, f"no daemon on {sock_path}"
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: lock_pid(sock_path) is None, timeout=10)


def no_wait(world, key: str, delay: str, *cmd: str, env=None) -> tuple[float, float]:
    """Submit with --no-wait; return the wall-clock window in which it was accepted."""
    before = time.time()
    proc = world.run("run", "--no-wait", "--key", key, "--delay", delay, "--", *cmd,
                     **({"env": env} if env else {}))
    after = time.time()
    assert proc.returncode == 0, proc.stderr
    return before, after


def fill(path: Path) -> None:
    """Write ``path`` until its file system has no byte left (ENOSPC)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for size in (65536, 4096, 1):
            chunk = b"\0" * size
            try:
                while True:
                    os.write(fd, chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
    finally:
        os.close(fd)


def start_daemon_by_hand(world, *options: str, env=None) -> subprocess.Popen:
    """``debounce daemon OPTIONS`` in the background, output to a file; wait until it serves."""
    with open(world.root / "daemon.out", "ab") as out:
        proc = world.popen("daemon", *options, stdout=out, stderr=subprocess.STDOUT,
                           **({"env": env} if env else {}))
    wait_until(lambda: proc.poll() is not None or (lock_pid(world.socket) == proc.pid
               and os.path.exists(world.socket)), timeout=15)
    assert proc.poll() is None, (world.root / "daemon.out").read_text()
    assert status(world, env)["pid"] == proc.pid
    return proc


# ----------------------------------------------------------------------------- kill -9


def test_pending_invocations_survive_kill_9_and_fire_once_at_their_due_time(world):
    log = world.work / "stamps.log"
    status(world)  # the daemon is up, so submissions are quick
    due: dict[str, tuple[float, float]] = {}
    # Longest delay first: the dues end up close together but distinct, all after the kill.
    for key, delay in (("k1", 2.0), ("k2", 1.7), ("k3", 1.4), ("k4", 1.1)):
        before, after = no_wait(world, key, f"{delay}s", "sh", "-c", STAMP, str(log))
        due[key] = (before + delay, after + delay)
    kill9(world.socket)
    killed_at = time.time()
    assert killed_at < min(lo for lo, _ in due.values()), "submissions took too long to test"
    assert lines(log) == [], "something ran before its due time"

    status(world)  # any client command starts a new daemon
    wait_until(lambda: len(lines(log)) >= 4, timeout=15)
    ran = stamps(log)
    assert sorted(k for k, _ in ran) == ["k1", "k2", "k3", "k4"], ran
    for key, when in ran:
        lo, hi = due[key]
        assert when >= lo - 0.05, f"{key} ran {lo - when:.2f}s before its due time"
        assert when <= hi + 1.5, f"{key} ran {when - hi:.2f}s after its due time"

    # Nothing runs twice: not later, and not after yet another crash and restart.
    wait_until(lambda: not status(world)["keys"], timeout=10)
    kill9(world.socket)
    status(world)
    time.sleep(1.0)  # past any due time: nothing may show up
    assert Counter(k for k, _ in stamps(log)) == {"k1": 1, "k2": 1, "k3": 1, "k4": 1}


def test_an_overdue_invocation_runs_at_once_after_restart(world):
    log = world.work / "stamps.log"
    status(world)
    no_wait(world, "late", "300ms", "sh", "-c", STAMP, str(log))
    kill9(world.socket)
    time.sleep(1.0)  # the daemon is dead past the due time
    assert lines(log) == []
    restarted = time.time()
    status(world)
    wait_until(lambda: lines(log), timeout=10)
    [(key, when)] = stamps(log)
    assert key == "late"
    assert when - restarted < 3.0, "an overdue invocation must run at once after a restart"


def test_a_waiting_client_reattaches_with_debounce_wait_after_kill_9(world):
    status(world)
    submitted = time.time()
    client = world.popen("run", "--key", "k", "--delay", "1.5s", "--", "sh", "-c", "exit 6")
    wait_until(lambda: "k" in pending_keys(world), timeout=10)
    kill9(world.socket)
    _, err = client.communicate(timeout=10)
    assert client.returncode == 113, err
    assert "debounce wait --key k" in err, err

    status(world)  # restart
    waiter = world.popen("wait", "k")
    _out, err = waiter.communicate(timeout=15)
    finished = time.time()
    assert waiter.returncode == 6, err
    assert finished >= submitted + 1.5 - 0.05, "wait returned before the run could have finished"

    began = time.time()
    again = world.run("wait", "k")
    assert again.returncode == 6, again.stderr
    assert time.time() - began < 3.0, "wait on a finished key must exit at once"

    [row] = history(world, "k")
    assert row["exit_code"] == 6
    by_id = world.run("wait", str(row["run_id"]))
    assert by_id.returncode == 6, by_id.stderr

    nope = world.run("wait", "nope")
    assert nope.returncode == 117, nope.stderr
    assert nope.stderr.strip()


def _start_a_long_run(world) -> tuple[int, int]:
    """A run of key "lost" whose shell execs a sleep and leaves a background sleep behind it;
    returns (pid of the run's own process, pid of its background child)."""
    child_pid_file = world.work / "child.pid"
    main_pid_file = world.work / "main.pid"
    script = f"sleep 300 & echo $! > {child_pid_file}; echo $$ > {main_pid_file}; exec sleep 300"
    status(world)
    no_wait(world, "lost", "100ms", "sh", "-c", script)
    wait_until(lambda: lines(main_pid_file) and lines(child_pid_file), timeout=10)
    main_pid, child_pid = int(lines(main_pid_file)[0]), int(lines(child_pid_file)[0])
    assert not pid_gone(main_pid) and not pid_gone(child_pid)
    return main_pid, child_pid


def _reap(pid: int) -> None:
    """Do not leave a process of this test behind, whatever the product did."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def test_a_run_executing_at_kill_9_dies_and_is_recorded_as_lost(world):
    main_pid, child_pid = _start_a_long_run(world)
    try:
        kill9(world.socket)
        wait_until(lambda: pid_gone(main_pid), timeout=5)  # dies with its daemon

        status(world)  # the next daemon records it
        rows = [r for r in history(world) if r["key"] == "lost"]
        assert len(rows) == 1, rows
        assert rows[0]["outcome"] == "lost"
        assert rows[0]["finished_at"]
        # A waiter asking for it learns it was lost (daemon-lost code), not a made-up success.
        proc = world.run("wait", "lost")
        assert proc.returncode == 113, (proc.returncode, proc.stderr)
        assert "lost" in proc.stderr
    finally:
        _reap(main_pid)
        _reap(child_pid)


def test_the_output_of_a_run_lost_at_kill_9_can_still_be_read(world):
    """A run's log is named in the journal soon after its start (core.NOTE_AFTER), not only
    at its end, so `debounce logs` finds what a run lost in a crash wrote. (Its start itself
    is recorded by the started ledger, so no commit is forced for it.)"""
    import sqlite3

    pid_file = world.work / "main.pid"
    status(world)
    no_wait(world, "lost", "10ms", "sh", "-c",
            f"echo before the crash; echo $$ > {pid_file}; exec sleep 300")
    wait_until(lambda: lines(pid_file), timeout=10)
    main_pid = int(lines(pid_file)[0])

    def noted() -> bool:
        with contextlib.closing(sqlite3.connect(world.state / "journal.db")) as db:
            return bool(db.execute("SELECT 1 FROM runs WHERE run_id = 1 AND log_path IS NOT "
                                   "NULL AND pid = ?", (main_pid,)).fetchall())

    try:
        wait_until(noted, timeout=10)
        kill9(world.socket)
        wait_until(lambda: pid_gone(main_pid), timeout=5)
        assert [r["outcome"] for r in history(world) if r["key"] == "lost"] == ["lost"]
        logs = world.run("logs", "1")
        assert (logs.returncode, logs.stdout) == (0, "before the crash\n"), logs.stderr
    finally:
        _reap(main_pid)


def test_processes_left_by_a_run_at_kill_9_are_killed_by_the_next_daemon(world):
    main_pid, child_pid = _start_a_long_run(world)
    try:
        kill9(world.socket)
        wait_until(lambda: pid_gone(main_pid), timeout=5)
        status(world)  # the next daemon kills what is left of the lost run (runner.py docs)
        wait_until(lambda: pid_gone(child_pid), timeout=5)
    finally:
        _reap(main_pid)
        _reap(child_pid)


# ----------------------------------------------------------------------------- SIGTERM


def test_sigterm_stops_runs_keeps_pending_and_removes_the_socket(world):
    log = world.work / "stamps.log"
    busy = world.work / "busy.started"
    daemon = start_daemon_by_hand(world)
    no_wait(world, "busy", "100ms", "sh", "-c", f"echo x > {busy}; exec sleep 300")
    wait_until(busy.exists, timeout=10)
    no_wait(world, "p1", "1500ms", "sh", "-c", STAMP, str(log))
    no_wait(world, "p2", "1500ms", "sh", "-c", STAMP, str(log))

    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(timeout=20) == 0
    assert not os.path.exists(world.socket), "the socket must be removed on SIGTERM"
    assert lines(log) == [], "pending invocations must not run at shutdown"

    status(world)  # restart
    wait_until(lambda: len(lines(log)) >= 2, timeout=15)
    rows = [r for r in history(world) if r["key"] == "busy"]
    assert [r["outcome"] for r in rows] == ["stopped"], rows
    wait_until(lambda: not any(r.get("pending") for r in status(world)["keys"]), timeout=10)
    time.sleep(0.5)
    assert Counter(k for k, _ in stamps(log)) == {"p1": 1, "p2": 1}


# ----------------------------------------------------------------------------- dying clients


def test_a_client_killed_mid_wait_does_not_disturb_the_run(world):
    log = world.work / "runs.log"
    script = f'echo start >> {log}; sleep 1; echo done-output; exit 3'
    args = ("run", "--key", "w", "--delay", "1s", "--json", "--", "sh", "-c", script)
    pid = status(world)["pid"]
    killed_pending = world.popen(*args)
    survivor = world.popen(*args)
    killed_running = world.popen(*args)

    def coalesced() -> int:
        for row in status(world)["keys"]:
            if row["key"] == "w" and row.get("pending"):
                return row["pending"]["coalesced"]
        return 0

    wait_until(lambda: coalesced() >= 3, timeout=15)
    killed_pending.kill()  # while its invocation is pending
    killed_pending.wait()
    wait_until(lambda: lines(log), timeout=10)
    killed_running.kill()  # while the run streams to it
    killed_running.wait()

    out, err = survivor.communicate(timeout=15)
    assert survivor.returncode == 3, err
    result = json.loads(out)
    assert result["exit_code"] == 3
    assert result["coalesced"] == 3
    assert lines(log) == ["start"]
    assert status(world)["pid"] == pid, "the daemon must keep serving"
    again = world.run("run", "--key", "after", "--delay", "50ms", "--", "sh", "-c", "exit 4")
    assert again.returncode == 4, again.stderr


# ----------------------------------------------------------------------------- full disk


@contextlib.contextmanager
def tiny_state_dir(world):
    """A 256 KiB tmpfs as the state dir: yields the environment that uses it."""
    mnt = world.root / "tiny"
    mnt.mkdir()
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs", str(mnt)],
        capture_output=True, text=True,
    )
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs for the full-disk test: {mount.stderr.strip()}")
    env = dict(world.env, DEBOUNCE_STATE_DIR=str(mnt))
    try:
        yield env
    finally:
        world.run("stop", env=env, timeout=60)
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_a_full_disk_refuses_new_submissions_and_keeps_acknowledged_ones(world):
    """New submissions are refused; acknowledged ones run once the journal can record them."""
    runs_log = world.work / "runs.log"
    with tiny_state_dir(world) as env:
        mnt = Path(env["DEBOUNCE_STATE_DIR"])
        pid = status(world, env)["pid"]
        no_wait(world, "ack", "1500ms", "sh", "-c", f"echo ack >> {runs_log}", env=env)

        fill(mnt / "filler")
        assert os.statvfs(mnt).f_bavail == 0

        refused = world.run("run", "--no-wait", "--key", "new", "--delay", "200ms", "--",
                            "true", env=env)
        assert refused.returncode == 116, (refused.returncode, refused.stderr)
        err_lines = refused.stderr.strip().splitlines()
        assert len(err_lines) == 1, refused.stderr
        assert "full" in err_lines[0].lower(), refused.stderr
        waiting = world.run("run", "--key", "new2", "--delay", "200ms", "--", "true", env=env)
        assert waiting.returncode == 116, (waiting.returncode, waiting.stderr)
        assert "full" in waiting.stderr.lower() and len(waiting.stderr.strip().splitlines()) == 1

        # Acknowledged, but its run cannot be recorded while the disk is full: it waits.
        due = time.monotonic() + 1.6
        wait_until(lambda: time.monotonic() > due, timeout=5)
        assert lines(runs_log) == []
        assert status(world, env)["pid"] == pid

        (mnt / "filler").unlink()
        wait_until(lambda: lines(runs_log) == ["ack"], timeout=10)  # then it runs, once
        again = world.run("run", "--key", "again", "--delay", "100ms", "--",
                          "sh", "-c", f"echo again >> {runs_log}", env=env)
        assert again.returncode == 0, again.stderr
        assert lines(runs_log) == ["ack", "again"]
        assert status(world, env)["pid"] == pid


def test_a_submission_refused_for_a_full_disk_never_runs(world):
    marker = world.work / "refused-ran"
    sentinel = world.work / "sentinel"
    with tiny_state_dir(world) as env:
        mnt = Path(env["DEBOUNCE_STATE_DIR"])
        status(world, env)
        no_wait(world, "ack", "800ms", "touch", str(sentinel), env=env)
        fill(mnt / "filler")
        refused = world.run("run", "--no-wait", "--key", "new", "--delay", "200ms", "--",
                            "touch", str(marker), env=env)
        assert refused.returncode == 116, (refused.returncode, refused.stderr)
        (mnt / "filler").unlink()
        wait_until(sentinel.exists, timeout=10)  # due after the refused one would have been
        time.sleep(0.3)
        assert not marker.exists(), "the daemon said 'refused' (exit 116) but ran it anyway"


# ----------------------------------------------------------------------------- history and logs


def four_runs_of_h(world) -> None:
    for n in (1, 2, 3, 4):
        proc = world.run("run", "--key", "h", "--delay", "50ms", "--", "sh", "-c",
                         f"echo out-{n}; echo err-{n} >&2; exit {n}")
        assert proc.returncode == n, proc.stderr


def test_history_and_logs(world):
    four_runs_of_h(world)
    other = world.run("run", "--key", "other", "--delay", "50ms", "--", "true")
    assert other.returncode == 0, other.stderr

    rows = history(world)
    assert [r["key"] for r in rows] == ["other", "h", "h", "h", "h"]  # newest first
    for row in rows:
        for field in ("run_id", "key", "argv", "exit_code", "coalesced", "started_at",
                      "finished_at"):
            assert field in row and row[field] is not None, (field, row)
    h_rows = history(world, "h")
    assert [r["exit_code"] for r in h_rows] == [4, 3, 2, 1]
    assert all(r["coalesced"] == 1 for r in h_rows)
    assert h_rows[0]["argv"] == ["sh", "-c", "echo out-4; echo err-4 >&2; exit 4"]
    assert len({r["run_id"] for r in h_rows}) == 4
    limited = history(world, "--limit", "2")
    assert [r["run_id"] for r in limited] == [rows[0]["run_id"], rows[1]["run_id"]]
    assert [r["exit_code"] for r in history(world, "h", "--limit", "1")] == [4]
    assert history(world, "no-such-key") == []

    latest = world.run("logs", "h")
    assert latest.returncode == 0, latest.stderr
    assert latest.stdout == "out-4\n"
    assert latest.stderr == "err-4\n"
    by_id = world.run("logs", str(h_rows[3]["run_id"]))
    assert (by_id.returncode, by_id.stdout, by_id.stderr) == (0, "out-1\n", "err-1\n")
    unknown = world.run("logs", "no-such-key")
    assert unknown.returncode == 117, unknown.stderr


def test_a_run_that_wrote_nothing_has_an_empty_log_without_a_file_made_for_it(world):
    """No file is made for a run that writes nothing (a burst of such runs would pay for a
    file each): `debounce logs` and a late `wait` find an empty log all the same, also from
    the next daemon, and neither says anything was lost."""
    proc = world.run("run", "--key", "quiet", "--delay", "10ms", "--", "true")
    assert proc.returncode == 0, proc.stderr
    [row] = history(world, "quiet")
    [log_dir] = (world.state / "logs").iterdir()  # (one directory per socket)
    assert not (log_dir / f"{row['run_id']}.log").exists()
    late = world.run("wait", "--run", str(row["run_id"]))
    assert (late.returncode, late.stdout, late.stderr) == (0, "", "")
    assert world.run("stop").returncode == 0
    for _ in range(2):  # a new daemon; then the file made for the first reader
        shown = world.run("logs", str(row["run_id"]))
        assert (shown.returncode, shown.stdout, shown.stderr) == (0, "", "")
        assert (log_dir / f"{row['run_id']}.log").stat().st_size == 0


def test_a_log_left_beside_a_deleted_journal_is_not_taken_for_a_new_runs_output(world):
    """Run ids start again with a new journal: the old run 1's log must not pass for the
    empty log of the new run 1 (which has no file of its own, made only when asked)."""
    old = world.run("run", "--key", "q", "--delay", "10ms", "--", "echo", "old output")
    assert old.returncode == 0, old.stderr
    assert world.run("stop").returncode == 0
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            (world.state / f"journal.db{suffix}").unlink()
    new = world.run("run", "--key", "q", "--delay", "10ms", "--", "true")
    assert new.returncode == 0, new.stderr
    assert [row["run_id"] for row in history(world, "q")] == [1]
    shown = world.run("logs", "1")
    assert (shown.returncode, shown.stdout, shown.stderr) == (0, "", "")


def test_log_retention_keeps_only_the_newest_logs_of_a_key(world):
    start_daemon_by_hand(world, "--keep-logs", "2")
    four_runs_of_h(world)
    h_rows = history(world, "h")
    assert [r["exit_code"] for r in h_rows] == [4, 3, 2, 1]
    newest_two = [r["run_id"] for r in h_rows[:2]]
    oldest_two = [r["run_id"] for r in h_rows[2:]]

    def old_logs_gone() -> bool:
        return all(world.run("logs", str(run_id)).returncode == 117 for run_id in oldest_two)

    wait_until(old_logs_gone, timeout=5)
    for run_id, n in zip(newest_two, (4, 3), strict=True):
        kept = world.run("logs", str(run_id))
        assert (kept.returncode, kept.stdout) == (0, f"out-{n}\n"), kept.stderr
    assert len(history(world, "h")) == 4, "history rows stay; only the logs go"


# ----------------------------------------------------------------------------- permissions


def test_state_and_socket_permissions_even_with_a_permissive_umask(world):
    def umask0() -> None:
        os.umask(0)

    proc = world.run("run", "--key", "perm", "--delay", "50ms", "--", "sh", "-c",
                     "echo hello; echo oops >&2", preexec_fn=umask0)
    assert proc.returncode == 0, proc.stderr
    assert world.run("logs", "perm").stdout == "hello\n"

    def mode(path) -> int:
        return stat.S_IMODE(os.stat(path).st_mode)

    assert mode(world.state) == 0o700
    assert (world.state / "journal.db").exists()
    files = []
    for dirpath, _dirnames, filenames in os.walk(world.state):
        assert mode(dirpath) == 0o700, dirpath
        files += [os.path.join(dirpath, name) for name in filenames]
    names = {os.path.basename(f) for f in files}
    assert "journal.db" in names
    assert any(name.endswith(".log") and not name.startswith("daemon-") for name in names), names
    for path in files:
        assert mode(path) == 0o600, f"{path} is {mode(path):04o}"

    assert stat.S_ISSOCK(os.stat(world.socket).st_mode)
    assert mode(world.socket) == 0o600
    assert mode(world.sock_dir) == 0o700
    assert os.stat(world.sock_dir).st_uid == os.getuid()


# ----------------------------------------------------------------------------- two sockets


def test_daemons_on_two_sockets_sharing_a_state_dir_keep_their_pending_work_apart(world):
    log = world.work / "who.log"
    sock_b = str(world.root / "s2" / "daemon.sock")
    env_a = world.env
    env_b = dict(world.env, DEBOUNCE_SOCKET=sock_b)
    try:
        _two_sockets(world, log, sock_b, env_a, env_b)
    finally:
        world.run("stop", env=env_b, timeout=60)


def _two_sockets(world, log: Path, sock_b: str, env_a: dict, env_b: dict) -> None:
    status(world, env_a)
    status(world, env_b)
    no_wait(world, "shared", "1s", "sh", "-c", f"echo A >> {log}", env=env_a)
    assert pending_keys(world, env_b) == set(), "B must not see A's pending invocation"

    kill9(world.socket)  # A dies with its invocation pending
    kill9(sock_b)
    status(world, env_b)  # B restarts from the same state dir
    assert pending_keys(world, env_b) == set()
    proc = world.run("run", "--key", "shared", "--delay", "100ms", "--", "sh", "-c",
                     f"echo B >> {log}", env=env_b)
    assert proc.returncode == 0, proc.stderr
    time.sleep(1.5)  # well past A's due time
    assert lines(log) == ["B"], "B ran A's pending invocation"

    status(world, env_a)  # A restarts: its overdue invocation runs at once
    wait_until(lambda: len(lines(log)) >= 2, timeout=10)
    assert lines(log) == ["B", "A"]
    assert [r["key"] for r in history(world, env=env_b)] == ["shared"]
    time.sleep(0.3)
    assert lines(log) == ["B", "A"]


def test_a_daemon_starting_on_another_socket_does_not_lose_this_ones_invocations(world):
    """One daemon's start-up clean-up of the shared state dir leaves the other's rows alone."""
    sock_a = str(world.root / "s2" / "daemon.sock")
    env_a = dict(world.env, DEBOUNCE_SOCKET=sock_a)
    env_b = world.env
    try:
        proc = world.run("run", "--delay", "200ms", "--", "true", env=env_b)
        assert proc.returncode == 0, proc.stderr  # B has stored (and cached) its environment
        status(world, env_a)  # A starts and cleans up what no pending invocation uses
        no_wait(world, "keepme", "1h", "true", env=env_b)
        kill9(world.socket)
        assert "keepme" in pending_keys(world, env_b), "B lost an acknowledged invocation"
    finally:
        world.run("stop", env=env_a, timeout=60)
