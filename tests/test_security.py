"""Security: only the owning user can make the daemon run anything.

The real daemon and CLI run as subprocesses in an isolated world (conftest.py). The tests run
as root, so "another user" is ``nobody`` (uid 65534): a child process drops to it before it
touches the socket.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import status_pid, wait_until

NOBODY = 65534

# The other user's client: drop privileges, connect, ask for a run, report what came back.
INTRUDER = r"""
import json, os, socket, sys

sock_path, request = sys.argv[1], sys.argv[2]
os.setgroups([])
os.setgid(65534)
os.setuid(65534)
report = {"uid": os.getuid(), "euid": os.geteuid(), "connected": False, "reply": ""}
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(10)
try:
    s.connect(sock_path)
except OSError as exc:
    report["connect_error"] = f"{type(exc).__name__}: {exc}"
else:
    report["connected"] = True
    hello = json.dumps({"type": "hello", "version": 1, "client": "intruder"})
    try:
        s.sendall((hello + "\n" + request + "\n").encode())
        s.shutdown(socket.SHUT_WR)
    except OSError as exc:
        report["send_error"] = str(exc)
    data = b""
    while True:
        try:
            chunk = s.recv(65536)
        except socket.timeout:
            report["timeout"] = True
            break
        except OSError as exc:
            report["recv_error"] = str(exc)
            break
        if not chunk:
            break
        data += chunk
    report["reply"] = data.decode(errors="replace")
print(json.dumps(report))
"""


# ----------------------------------------------------------------------------- peer uid


def test_a_connection_from_another_uid_is_refused_and_nothing_runs(world):
    marker = world.work / "intruder-was-here"
    pid = status_pid(world)
    request = json.dumps({
        "type": "run", "argv": ["touch", str(marker)], "cwd": "/",
        "env": {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}, "key": "intrusion",
        "options": {"delay": 0.2}, "wait": False,
    })
    # Open every door the file system has, so only the daemon itself can say no.
    os.chmod(world.root, 0o711)
    os.chmod(world.sock_dir, 0o777)
    os.chmod(world.socket, 0o777)
    try:
        child = subprocess.run(
            [sys.executable, "-c", INTRUDER, world.socket, request],
            capture_output=True, text=True, timeout=30, cwd="/",
        )
    finally:
        os.chmod(world.socket, 0o600)
        os.chmod(world.sock_dir, 0o700)
        os.chmod(world.root, 0o700)
    assert child.returncode == 0, child.stderr
    report = json.loads(child.stdout)
    assert report["uid"] == NOBODY and report["euid"] == NOBODY, report
    assert report["connected"], f"the file system stopped the intruder, not the daemon: {report}"
    assert not report.get("timeout"), report
    replies = [json.loads(x) for x in report["reply"].splitlines() if x.strip()]
    # Refused outright: no hello reply, no acceptance; an error naming permission, or a close.
    assert all(r["type"] == "error" for r in replies), replies
    if replies:
        assert "permission" in replies[0]["message"].lower(), replies

    # The owner still gets served, and the intruder's run (due earlier) never happened.
    own = world.run("run", "--key", "owner", "--delay", "500ms", "--", "sh", "-c", "exit 5")
    assert own.returncode == 5, own.stderr
    assert not marker.exists(), "the daemon ran a command for another uid"
    history = world.run("history", "--json")
    assert "intrusion" not in history.stdout
    assert status_pid(world) == pid


# ----------------------------------------------------------------------------- socket directory


def _unsafe(world, how: str) -> None:
    world.sock_dir.mkdir(mode=0o700, exist_ok=True)
    if how == "group-writable":
        os.chmod(world.sock_dir, 0o770)
    elif how == "world-readable":
        os.chmod(world.sock_dir, 0o755)
    elif how == "owned by nobody":
        os.chown(world.sock_dir, NOBODY, NOBODY)
    else:
        raise AssertionError(how)


UNSAFE = ["group-writable", "world-readable", "owned by nobody"]


@pytest.mark.parametrize("how", UNSAFE)
def test_the_client_refuses_an_unsafe_socket_directory(world, how):
    marker = world.work / "ran"
    _unsafe(world, how)
    try:
        for args in (["run", "--key", "k", "--delay", "0", "--", "touch", str(marker)],
                     ["status"]):
            proc = world.run(*args)
            assert proc.returncode == 2, (args, proc.returncode, proc.stderr)
            err = proc.stderr.strip().splitlines()
            assert len(err) == 1, proc.stderr
            assert str(world.sock_dir) in err[0], err[0]
            assert not proc.stdout
        assert world.daemon_pid() is None, "a daemon was started in an unsafe directory"
        assert not os.path.exists(world.socket)
        assert not marker.exists()
    finally:
        os.chown(world.sock_dir, 0, 0)
        os.chmod(world.sock_dir, 0o700)


@pytest.mark.parametrize("how", UNSAFE)
def test_the_daemon_refuses_an_unsafe_socket_directory(world, how):
    _unsafe(world, how)
    try:
        proc = world.run("daemon", timeout=30)
        assert proc.returncode == 2, (proc.returncode, proc.stderr)
        err = proc.stderr.strip().splitlines()
        assert len(err) == 1, proc.stderr
        assert str(world.sock_dir) in err[0], err[0]
        assert not os.path.exists(world.socket)
    finally:
        os.chown(world.sock_dir, 0, 0)
        os.chmod(world.sock_dir, 0o700)


def test_a_socket_directory_opened_up_under_a_running_daemon_is_refused(world):
    marker = world.work / "ran"
    status_pid(world)
    os.chmod(world.sock_dir, 0o755)
    try:
        proc = world.run("run", "--key", "k", "--delay", "0", "--", "touch", str(marker))
        assert proc.returncode == 2, (proc.returncode, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    finally:
        os.chmod(world.sock_dir, 0o700)
    # Mended: the same client command works again.
    proc = world.run("run", "--key", "k", "--delay", "0", "--", "touch", str(marker))
    assert proc.returncode == 0, proc.stderr
    wait_until(marker.exists, timeout=5)


# ----------------------------------------------------------------------------- who answers

# A daemon that is not ours: it listens on a socket (as another uid when asked, dropping
# privileges after bind and before listen, since the kernel records the listener's credentials
# at listen()), reads whatever clients send, never answers, and reports what it received once
# its stdin closes.
FAKE_DAEMON = r"""
import json, os, select, socket, sys

path, uid = sys.argv[1], int(sys.argv[2])
listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
listener.bind(path)
if uid >= 0:
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
listener.listen(16)
print(json.dumps({"uid": os.getuid()}), flush=True)
report = {"connections": 0, "bytes": 0}

def serve(conn):
    report["connections"] += 1
    conn.settimeout(1)
    try:
        while chunk := conn.recv(65536):
            report["bytes"] += len(chunk)
    except OSError:
        pass  # silence: a client waiting for an answer that will not come
    conn.close()

while True:
    ready = select.select([listener, sys.stdin], [], [])[0]
    if listener in ready:
        serve(listener.accept()[0])
    if sys.stdin in ready:  # the test is done: take what is still queued, then report
        listener.setblocking(False)
        while True:
            try:
                conn = listener.accept()[0]
            except BlockingIOError:
                break
            conn.setblocking(True)
            serve(conn)
        break
print(json.dumps(report), flush=True)
"""


class FakeDaemon:
    """FAKE_DAEMON in a subprocess, listening on ``path`` once constructed."""

    def __init__(self, path: str, uid: int = -1):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", FAKE_DAEMON, path, str(uid)], cwd="/", text=True,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        assert self.proc.stdout is not None
        ready = self.proc.stdout.readline()  # it says its uid once listening
        if not ready:
            self.close()
            pytest.fail(f"the fake daemon did not start: {self.proc.stderr}")
        self.uid = json.loads(ready)["uid"]

    def report(self) -> dict[str, int]:
        """What clients sent it: connections accepted and bytes received."""
        out, err = self.proc.communicate(timeout=30)
        assert self.proc.returncode == 0, err
        return json.loads(out.splitlines()[-1])

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate()


CLIENT_COMMANDS = [
    ["run", "--key", "k", "--delay", "0", "--", "env"],
    ["status"],
]


def _refused(world, fragments: list[str], status: int = 2) -> None:
    """Every client command exits ``status`` with one line holding each of ``fragments``."""
    for args in CLIENT_COMMANDS:
        proc = world.run(*args, env=dict(world.env, SECRET_TOKEN="hunter2"), timeout=30)
        assert proc.returncode == status, (args, proc.returncode, proc.stderr)
        err = proc.stderr.strip().splitlines()
        assert len(err) == 1, proc.stderr
        for fragment in fragments:
            assert fragment in err[0], (fragment, err[0])
        assert not proc.stdout


def test_the_client_never_follows_a_symlink_swapped_in_for_the_socket_directory(world):
    """Another user swaps a link to their directory in: nothing of ours may reach it."""
    elsewhere = world.root / "elsewhere"
    elsewhere.mkdir(mode=0o700)  # looks private: only the link itself is wrong
    os.symlink(elsewhere, world.sock_dir)
    fake = FakeDaemon(str(elsewhere / "daemon.sock"))
    try:
        _refused(world, [str(world.sock_dir), "symbolic link", "DEBOUNCE_SOCKET"])
        report = fake.report()
    finally:
        fake.close()
        os.unlink(world.sock_dir)
    assert report == {"connections": 0, "bytes": 0}, report
    assert sorted(os.listdir(elsewhere)) == ["daemon.sock"], "a client wrote through the link"


def test_the_daemon_refuses_a_symlinked_socket_directory(world):
    elsewhere = world.root / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    os.symlink(elsewhere, world.sock_dir)
    try:
        proc = world.run("daemon", timeout=15)
    finally:
        os.unlink(world.sock_dir)
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1, proc.stderr
    assert str(world.sock_dir) in err[0] and "symbolic link" in err[0], err[0]
    assert os.listdir(elsewhere) == []


@pytest.mark.parametrize("how", ["symlink", "owned by nobody", "regular file"])
def test_the_client_refuses_an_unsafe_socket_path(world, how):
    world.sock_dir.mkdir(mode=0o700)
    elsewhere = world.root / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    fake = None
    status = 2  # unsafe: the user's to mend
    if how == "symlink":
        fake = FakeDaemon(str(elsewhere / "daemon.sock"))
        os.symlink(elsewhere / "daemon.sock", world.socket)
        fragments = [world.socket, "symbolic link"]
    elif how == "owned by nobody":
        fake = FakeDaemon(world.socket)
        os.chown(world.socket, NOBODY, NOBODY)
        fragments = [world.socket, f"uid {NOBODY}"]
    else:
        Path(world.socket).write_text("not a socket\n")
        fragments = [world.socket, "not a socket"]
        status = 112  # no daemon can answer there (as tests/test_e2e_run.py has it)
    try:
        _refused(world, fragments, status)
        report = fake.report() if fake else None
    finally:
        if fake:
            fake.close()
        os.unlink(world.socket)
    if report is not None:
        assert report == {"connections": 0, "bytes": 0}, report
    assert world.daemon_pid() is None, "a daemon was started beside an unsafe socket path"
    # Refused by the client itself: not even an attempt to start a daemon there.
    assert not list(world.state.glob("daemon-*.log")), "the client tried to start a daemon"


def test_a_daemon_of_another_uid_gets_nothing_not_even_a_hello(world):
    """The decisive check: whatever the paths say, the daemon must be running as us."""
    if os.getuid() != 0:
        pytest.skip("needs root, to listen as another uid on a socket we own")
    world.sock_dir.mkdir(mode=0o700)
    # Bound by root in root's private directory: every path check passes. Only the
    # credentials of the listening process (uid 65534) give it away.
    fake = FakeDaemon(world.socket, uid=NOBODY)
    try:
        assert fake.uid == NOBODY
        st = os.lstat(world.socket)
        assert stat.S_ISSOCK(st.st_mode) and st.st_uid == os.getuid()
        _refused(world, [world.socket, f"uid {NOBODY}"])
        report = fake.report()
    finally:
        fake.close()
        os.unlink(world.socket)
    assert report["connections"] == len(CLIENT_COMMANDS), report  # it did connect...
    assert report["bytes"] == 0, report  # ...and sent nothing: no hello, no environment
    assert world.daemon_pid() is None


def test_a_daemon_that_accepts_no_connections_is_reported_not_waited_for(world):
    """A full listen backlog (a wedged or stopped daemon): exit 112 promptly, one line."""
    world.sock_dir.mkdir(mode=0o700)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(world.socket)
    listener.listen(0)
    queued: list[socket.socket] = []
    try:
        while True:  # fill the backlog: the kernel refuses the next one with EAGAIN
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            conn.setblocking(False)
            queued.append(conn)
            try:
                conn.connect(world.socket)
            except BlockingIOError:
                break
            assert len(queued) < 100, "the backlog never filled"
        started = time.monotonic()
        try:
            proc = world.run("status", timeout=15)
        except subprocess.TimeoutExpired:
            pytest.fail("debounce status hung on a daemon that accepts no connections")
        elapsed = time.monotonic() - started
    finally:
        for conn in queued:
            conn.close()
        listener.close()
        os.unlink(world.socket)
    assert proc.returncode == 112, (proc.returncode, proc.stderr)
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1, proc.stderr
    assert world.socket in err[0] and "does not accept connections" in err[0], err[0]
    assert elapsed < 15
    assert world.daemon_pid() is None


def test_mending_advice_never_opens_or_closes_a_shared_directory(world):
    """'chmod 700' only for a directory of debounce's own, never for one like /tmp."""
    world.sock_dir.mkdir(mode=0o700)
    try:
        os.chmod(world.sock_dir, 0o1777)  # a shared drop box, like /tmp
        proc = world.run("status")
        assert proc.returncode == 2, proc.stderr
        assert "chmod" not in proc.stderr and "DEBOUNCE_SOCKET" in proc.stderr, proc.stderr
        os.chmod(world.sock_dir, 0o770)  # ours, inside a private directory: closing it is safe
        proc = world.run("status")
        assert proc.returncode == 2, proc.stderr
        assert f"chmod 700 {world.sock_dir}" in proc.stderr, proc.stderr
    finally:
        os.chmod(world.sock_dir, 0o700)


# ----------------------------------------------------------------------------- key templates


@pytest.mark.parametrize("template", [
    "{0.__class__}",
    "{env.__class__}",
    "{args.__len__}",
    "{cwd[0]}",
    "{0!r}",
    "{1:>20}",
    "{env[HOME].__class__}",
    "{env}",
    "{argv}",
    "{__import__}",
    "x{7}",  # an argument the command does not have
])
def test_key_templates_cannot_reach_beyond_the_spec_fields(world, template):
    marker = world.work / "ran"
    proc = world.run("run", "--key", template, "--delay", "0", "--", "touch", str(marker))
    assert proc.returncode == 2, (template, proc.returncode, proc.stdout, proc.stderr)
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1, proc.stderr
    field = template[template.index("{"):template.index("}") + 1]
    assert field in err[0], f"the message should name {field}: {err[0]}"
    assert "class" not in proc.stdout
    assert world.daemon_pid() is None, "the bad template was submitted anyway"
    assert not marker.exists()


def test_the_spec_fields_do_render(world):
    """The refusals above are not a renderer that refuses everything."""
    env = dict(world.env, PROJECT="demo")
    template = "{0}|{1}|{args}|{cwd}|{env[PROJECT]}|{{lit}}"
    proc = world.run("run", "--key", template, "--delay", "0", "--json", "--",
                     "true", "a b", "c", env=env)
    assert proc.returncode == 0, proc.stderr
    key = json.loads(proc.stdout)["key"]
    assert key == f"true|a b|'a b' c|{os.path.realpath(world.work)}|demo|{{lit}}"
