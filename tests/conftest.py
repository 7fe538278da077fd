"""Shared fixtures: an isolated debounce world per test, and condition waiting.

Each test gets its own socket and state directory under a short /tmp path (Unix socket paths
are limited to 107 bytes), and every daemon it started is stopped afterwards.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


def wait_until(predicate: Callable[[], object], timeout: float = 10.0, interval: float = 0.01):
    """Poll ``predicate`` until it returns something truthy; fail the test at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {predicate}")
        time.sleep(interval)


def lines(path: Path) -> list[str]:
    """The non-empty lines of ``path``; [] while it does not exist."""
    try:
        return [line for line in path.read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        return []


def status(world: World, env: dict[str, str] | None = None) -> dict:
    """``debounce status --json`` of the world's daemon (started if need be), parsed."""
    import json

    proc = world.run("status", "--json", timeout=30, **({"env": env} if env else {}))
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def status_pid(world: World) -> int:
    """The pid of the daemon that answers: the same number means it never crashed."""
    return status(world)["pid"]


class World:
    """One isolated debounce installation: socket, state dir, environment, CLI helpers."""

    def __init__(self, root: Path):
        self.root = root
        self.sock_dir = root / "s"
        self.socket = str(self.sock_dir / "daemon.sock")
        self.state = root / "state"
        self.work = root / "work"
        self.work.mkdir()
        self.env = dict(os.environ)
        for name in ("DEBOUNCE_DELAY", "XDG_RUNTIME_DIR", "XDG_STATE_HOME", "NO_COLOR"):
            self.env.pop(name, None)
        self.env["DEBOUNCE_SOCKET"] = self.socket
        self.env["DEBOUNCE_STATE_DIR"] = str(self.state)
        # A developer's own ~/.config/debounce/config.toml must not change the tests.
        self.env["XDG_CONFIG_HOME"] = str(root / "config")
        self.procs: list[subprocess.Popen] = []

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "debounce_cli", *args]

    def run(self, *args: str, timeout: float = 30, **kw) -> subprocess.CompletedProcess:
        """Run the CLI to completion and capture its output as text."""
        kw.setdefault("cwd", self.work)
        kw.setdefault("env", self.env)
        kw.setdefault("stdin", subprocess.DEVNULL)
        return subprocess.run(
            self.argv(*args), capture_output=True, text=True, timeout=timeout, **kw
        )

    def popen(self, *args: str, **kw) -> subprocess.Popen:
        """Start the CLI in the background (stdout and stderr piped, as text)."""
        kw.setdefault("cwd", self.work)
        kw.setdefault("env", self.env)
        kw.setdefault("stdin", subprocess.DEVNULL)
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
        proc = subprocess.Popen(self.argv(*args), text=True, **kw)
        self.procs.append(proc)
        return proc

    def daemon_pid(self) -> int | None:
        """The pid of the live daemon holding this world's socket lock, if any."""
        import fcntl

        try:
            fd = os.open(self.socket + ".lock", os.O_RDONLY)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return None  # nobody holds it: no daemon
        except BlockingIOError:
            text = os.read(fd, 64).decode().strip()
            return int(text) if text else None
        finally:
            os.close(fd)

    def cleanup(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            for stream in (proc.stdout, proc.stderr, proc.stdin):
                if stream is not None:
                    stream.close()
        # SIGTERM stops a daemon as `debounce stop` does, without a client's start-up; then
        # wait for the process to be gone (not only its lock), or kill it.
        pid = self.daemon_pid()
        if pid:
            try:
                os.kill(pid, signal.SIGTERM)
                wait_until(lambda: gone(pid), timeout=60, interval=0.005)
            except ProcessLookupError:
                pass
            except AssertionError:
                os.kill(pid, signal.SIGKILL)


def gone(pid: int) -> bool:
    """Whether process ``pid`` has exited (a zombie nobody reaped yet counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] in (b"Z", b"X")
    except OSError:
        return True


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The quick tier (``-m "not slow"``) is the pure core on fake time plus a few
    end-to-end smoke tests: every other test that starts real daemons (the ``world``
    fixture) counts as slow, and runs in the full command."""
    for item in items:
        fixtures = getattr(item, "fixturenames", ())
        if "world" in fixtures and item.get_closest_marker("smoke") is None:
            item.add_marker(pytest.mark.slow)


@contextmanager
def new_world() -> Iterator[World]:
    """A World in a fresh directory, its daemon and processes stopped and the directory
    removed afterwards."""
    root = Path(tempfile.mkdtemp(prefix="dbt-", dir="/tmp"))
    w = World(root)
    try:
        yield w
    finally:
        w.cleanup()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def world():
    with new_world() as w:
        yield w


@pytest.fixture
def sim():
    """Fleet hosts on fake time (``fleet_sim``), a lease of 10 s."""
    from fleet_sim import Sim

    s = Sim(lease=10.0)
    try:
        yield s
    finally:
        s.close()
