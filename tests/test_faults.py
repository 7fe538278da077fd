"""Faults that once broke the exactly-once promise: hostile bytes, a full disk, kill -9.

Each test drives the real daemon and client as subprocesses (or the raw protocol over the
socket) and checks what a user would: the daemon still starts and serves, every acknowledged
invocation runs exactly once, nothing refused runs.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import time
from pathlib import Path

from test_durability import fill, history, kill9, lock_pid, no_wait, tiny_state_dir

from debounce_cli import protocol

from conftest import lines, status, wait_until


class Session:
    """A raw protocol conversation with the world's daemon."""

    def __init__(self, world) -> None:
        status(world)  # start a daemon if none runs
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(20)
        self.sock.connect(world.socket)
        self.file = self.sock.makefile("rb")
        self.sock.sendall(protocol.encode(protocol.Hello(client="test")))
        assert isinstance(self.recv(), protocol.HelloReply)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv(self) -> protocol.Message | None:
        line = self.file.readline()
        return protocol.decode(line, protocol.REPLIES, protocol.MAX_REPLY) if line else None

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def run_line(world, key: str, argv: list[str], delay: float = 0.0, wait: bool = False) -> bytes:
    msg = protocol.RunRequest(argv=argv, cwd=str(world.work), env=world.env, key=key,
                              options={"delay": delay}, wait=wait)
    return protocol.encode(msg)


# ----------------------------------------------------------------------------- hostile bytes


def test_a_non_utf8_key_running_at_kill_9_does_not_stop_the_next_daemon(world):
    """Issue 9, item 1: the next daemon failed to start (all clients exit 112)."""
    key = os.fsdecode(b"k\xe9")
    marker = world.work / "started"
    proc = world.run("run", "--no-wait", "--delay", "0", "--key", key, "--", "sh", "-c",
                     f"touch {marker}; exec sleep 60")
    assert proc.returncode == 0, proc.stderr
    wait_until(marker.exists, timeout=10)
    kill9(world.socket)
    after = world.run("status", "--json")
    assert after.returncode == 0, after.stderr
    assert json.loads(after.stdout)["keys"] == []
    rows = history(world)
    # JSON shows the key readable (U+FFFD) and its exact bytes in key_b64 (issue 19, item 4).
    assert [(base64.b64decode(r["key_b64"]), r["outcome"]) for r in rows] == [
        (b"k\xe9", "lost")]


def test_a_lone_surrogate_is_refused_at_the_edge_and_wedges_nothing(world):
    """Issue 9, item 3: one "\\ud800" made every later commit fail."""
    session = Session(world)
    try:
        bad = run_line(world, "ok", ["true"]).replace(b'"key":"ok"', b'"key":"\\ud800"')
        session.send(bad)
        reply = session.recv()
        assert isinstance(reply, protocol.Error) and reply.code == "bad_request"
        assert "lone surrogate" in reply.message and "\n" not in reply.message
    finally:
        session.close()
    for n in range(2):  # delayed submissions and runs are still recorded
        ok = world.run("run", "--key", f"after-{n}", "--delay", "50ms", "--", "true")
        assert ok.returncode == 0, ok.stderr
    assert {r["key"] for r in history(world)} == {"after-0", "after-1"}


def test_a_key_of_non_utf8_bytes_survives_a_restart_byte_for_byte(world):
    key = os.fsdecode(b"caf\xe9-\xff")
    out = world.work / "out"
    no_wait(world, key, "30s", "sh", "-c", f'printf "%s" "$DEBOUNCE_KEY" > {out}')
    kill9(world.socket)
    assert [base64.b64decode(row["key_b64"]) for row in status(world)["keys"]] == [
        b"caf\xe9-\xff"]
    flushed = world.run("flush", key)
    assert flushed.returncode == 0, flushed.stderr
    wait_until(out.exists, timeout=10)
    wait_until(lambda: out.read_bytes() == b"caf\xe9-\xff", timeout=5)


def test_a_huge_integer_after_a_run_request_leaves_no_key_running(world):
    """Issue 9, item 3: a 5,000-digit number pipelined after a run left it "running"."""
    session = Session(world)
    try:
        huge = b'{"type":"history","limit":' + b"9" * 5000 + b"}\n"
        session.send(run_line(world, "pipelined", ["true"]) + huge)
        assert isinstance(session.recv(), protocol.Accepted)
        error = session.recv()
        assert isinstance(error, protocol.Error) and "digits" in error.message
    finally:
        session.close()
    wait_until(lambda: not status(world)["keys"], timeout=10)
    assert [(r["key"], r["exit_code"]) for r in history(world)] == [("pipelined", 0)]


def test_stdin_keeps_non_utf8_bytes_and_refuses_a_lone_surrogate_by_line(world):
    lines_in = b'touch caf\xe9\n{"argv": ["touch", "x\\ud800"]}\ntouch done\n'
    proc = subprocess.run(
        world.argv("daemon", "--stdin", "--delay", "0", "--no-journal"), input=lines_in,
        capture_output=True, cwd=world.work, env=world.env, timeout=30,
    )
    assert proc.returncode == 1  # line 2 failed
    err = proc.stderr.decode()
    assert "stdin line 2:" in err and "lone surrogate" in err
    names = set(os.listdir(os.fsencode(world.work)))
    assert b"caf\xe9" in names and b"done" in names


# ----------------------------------------------------------------------------- a full disk


def test_runs_due_while_the_disk_is_full_wait_and_run_once(world):
    """Issue 9, item 2: they ran unrecorded, and the next daemon ran them again."""
    log = world.work / "runs.log"
    with tiny_state_dir(world) as env:
        mnt = Path(env["DEBOUNCE_STATE_DIR"])
        # Due 3 s on: three clients and the filling take well under that even on a busy
        # machine (with 300 ms the first one was due, and ran, before the disk was full).
        submitted = time.monotonic()
        for n in range(3):
            no_wait(world, f"k{n}", "3s", "sh", "-c", f"echo k{n} >> {log}", env=env)
        fill(mnt / "filler")
        assert time.monotonic() - submitted < 3.0, "the disk was filled after they were due"
        wait_until(lambda: time.monotonic() > submitted + 4.0, timeout=8)  # past due
        assert lines(log) == [], "a run started that its journal could not record"
        kill9(world.socket)
        (mnt / "filler").unlink()
        status(world, env)  # the next daemon
        wait_until(lambda: sorted(lines(log)) == ["k0", "k1", "k2"], timeout=15)
        assert not status(world, env)["keys"]
        assert sorted(lines(log)) == ["k0", "k1", "k2"]  # once each, never again
        assert lock_pid(world.socket)


def test_a_clean_stop_on_a_full_disk_runs_nothing_twice(world):
    log = world.work / "runs.log"
    with tiny_state_dir(world) as env:
        mnt = Path(env["DEBOUNCE_STATE_DIR"])
        submitted = time.monotonic()  # (due 3 s on: the disk is full well before, as above)
        for n in range(2):
            no_wait(world, f"s{n}", "3s", "sh", "-c", f"echo s{n} >> {log}", env=env)
        fill(mnt / "filler")
        assert time.monotonic() - submitted < 3.0, "the disk was filled after they were due"
        wait_until(lambda: time.monotonic() > submitted + 4.0, timeout=8)
        stopped = world.run("stop", env=env)
        assert stopped.returncode == 0, stopped.stderr
        (mnt / "filler").unlink()
        status(world, env)  # the next daemon
        wait_until(lambda: sorted(lines(log)) == ["s0", "s1"], timeout=15)
        wait_until(lambda: not status(world, env)["keys"], timeout=10)
        assert sorted(lines(log)) == ["s0", "s1"]


def test_a_zero_delay_submission_on_a_full_disk_is_refused_and_never_runs(world):
    marker = world.work / "ran"
    with tiny_state_dir(world) as env:
        mnt = Path(env["DEBOUNCE_STATE_DIR"])
        status(world, env)
        fill(mnt / "filler")
        refused = world.run("run", "--no-wait", "--delay", "0", "--key", "z", "--",
                            "touch", str(marker), env=env)
        assert refused.returncode == 116, (refused.returncode, refused.stderr)
        (mnt / "filler").unlink()
        again = world.run("run", "--delay", "0", "--key", "after", "--", "true", env=env)
        assert again.returncode == 0, again.stderr
        assert not marker.exists()


# ----------------------------------------------------------------------------- descriptors, memory


def _limited_daemon(world, nofile: int) -> subprocess.Popen:
    """``debounce daemon`` with at most ``nofile`` open files (soft and hard)."""
    import resource

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    out = open(world.root / "daemon.out", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(world.argv("daemon", "--idle-exit", "0"), env=world.env,
                            cwd=world.work, stdin=subprocess.DEVNULL, stdout=out,
                            stderr=subprocess.STDOUT, preexec_fn=limit)
    out.close()
    world.procs.append(proc)
    wait_until(lambda: os.path.exists(world.socket) and lock_pid(world.socket) == proc.pid,
               timeout=15)
    return proc


def _connect_to_limited(world, proc: subprocess.Popen, n: int) -> socket.socket:
    """Connection ``n`` to a :func:`_limited_daemon`; when it fails, the test says whether
    the daemon still runs, its memory and what it said."""
    try:
        return _connect(world.socket)
    except OSError as exc:
        log = (world.root / "daemon.out").read_text(errors="replace")
        state = f"exited {proc.poll()}" if proc.poll() is not None else "runs"
        raise AssertionError(f"connection {n}: {exc}; the daemon {state}, "
                             f"{_rss_kib(proc.pid)} KiB; it said: {log[-2000:]!r}") from None


def _connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError:
        sock.close()  # (left open, it fails the next test on its way out)
        raise
    return sock


def test_more_connections_than_descriptors_are_refused_in_one_line_each(world):
    """Issue 9, item 7: under ulimit -n 1024 accept hit EMFILE, ~10,000 tracebacks."""
    _limited_daemon(world, 1024)
    socks = []
    try:
        for _ in range(1100):
            socks.append(_connect(world.socket))
        refused = 0
        for sock in socks[-200:]:
            sock.settimeout(10)
            data = sock.recv(4096)
            if b"too many connections" in data:
                refused += 1
        assert refused == 200, refused
    finally:
        for sock in socks:
            sock.close()
    started = time.monotonic()
    wait_until(lambda: world.run("status").returncode == 0, timeout=10)  # serves on
    assert time.monotonic() - started < 5
    log = (world.root / "daemon.out").read_text()
    assert "Traceback" not in log and len(log.splitlines()) <= 5, log[-2000:]


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def test_unfinished_requests_are_bounded_in_all(world):
    """Issue 9, item 7: 128 connections each sending 4 MiB without a newline took 555 MB."""
    proc = _limited_daemon(world, 4096)
    before = _rss_kib(proc.pid)
    chunk = b"x" * (4 * 1024 * 1024 - 16)
    socks, refused = [], 0
    try:
        for _ in range(32):  # 128 MiB offered, twice the 64 MiB the daemon holds in all
            sock = _connect_to_limited(world, proc, len(socks) + 1)
            socks.append(sock)
            sock.settimeout(10)
            try:
                sock.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                pass
        for sock in socks:
            try:
                sock.shutdown(socket.SHUT_WR)
                if b"too much unfinished input" in sock.recv(4096):
                    refused += 1
            except (OSError, TimeoutError):
                pass
        grown = (_rss_kib(proc.pid) - before) / 1024
    finally:
        for sock in socks:
            sock.close()
    assert refused >= 8, refused
    assert grown < 200, f"the daemon grew by {grown:.0f} MiB"
    assert status(world)["keys"] == []


# ----------------------------------------------------------------------------- slow readers


def test_a_client_that_falls_behind_catches_up_from_the_log(world):
    """Issue 9, item 6: a client that kept reading lost output once 16 MiB behind."""
    import hashlib

    seq = ["seq", "1", "24000000"]  # about 200 MiB
    expected = hashlib.sha256(subprocess.run(seq, capture_output=True, check=True).stdout)
    status(world)
    # The reader sleeps first, as a pager or a busy pipe does: the run is long done by then.
    script = f"{' '.join(world.argv('run', '--delay', '0', '--key', 'big', '--'))} " \
             f"{' '.join(seq)} | (sleep 2; sha256sum)"
    piped = subprocess.run(["sh", "-c", script], capture_output=True, text=True, env=world.env,
                           cwd=world.work, timeout=120)
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout.split()[0] == expected.hexdigest(), piped.stderr[-500:]
    assert "missed" not in piped.stderr
    logs = subprocess.run(world.argv("logs", "big"), capture_output=True, env=world.env,
                          cwd=world.work, timeout=120)
    assert hashlib.sha256(logs.stdout).hexdigest() == expected.hexdigest()


def test_a_state_directory_reached_through_a_symlink_still_works(world):
    """Dotfiles set-ups link ~/.local/state elsewhere: only the socket's directory must not be
    a link (it decides who receives the submissions)."""
    real = world.root / "real-state"
    real.mkdir(mode=0o700)
    link = world.root / "linked-state"
    link.symlink_to(real)
    env = dict(world.env, DEBOUNCE_STATE_DIR=str(link))
    ran = world.run("run", "--delay", "0", "--key", "via-link", "--", "true", env=env)
    assert ran.returncode == 0, ran.stderr
    assert (real / "journal.db").exists()


def test_a_daemon_that_exits_leaves_nothing_beside_the_socket(world):
    """Issue 11, item 8: *.lock and *.start stayed after the daemon exited."""
    ran = world.run("run", "--delay", "0", "--", "true")  # auto-starts a daemon
    assert ran.returncode == 0, ran.stderr
    assert sorted(os.listdir(world.sock_dir)) == ["daemon.sock", "daemon.sock.lock",
                                                  "daemon.sock.start"]
    stopped = world.run("stop")
    assert stopped.returncode == 0, stopped.stderr
    assert os.listdir(world.sock_dir) == []
    again = world.run("run", "--delay", "0", "--", "true")  # and the next one starts as usual
    assert again.returncode == 0, again.stderr
