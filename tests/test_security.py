"""Security: only the owning user can make the daemon run anything.

The real daemon and CLI run as subprocesses in an isolated world (conftest.py). The tests run
as root, so "another user" is ``nobody`` (uid 65534): a child process drops to it before it
touches the socket.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

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
