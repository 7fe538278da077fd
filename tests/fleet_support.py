"""A real Redis and several hosts' daemons on one machine, for the fleet's tests.

Each host is a :class:`conftest.World` of its own (socket, state directory, host id) whose
daemon is started explicitly with a short lease; every one of them names the same store.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from conftest import World, wait_until

REDIS = shutil.which("redis-server")
#: A short lease keeps the takeover tests quick (the default is 10 s); not so short that a
#: daemon on a loaded machine misses its heartbeats and counts as gone.
LEASE_S = 2.0
LEASE = f"{LEASE_S:g}s"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Redis:
    """One redis-server on a loopback port, with its data in a directory of its own."""

    def __init__(self, root: Path, aof: bool = False, args: tuple[str, ...] = ()) -> None:
        if REDIS is None:
            pytest.skip("redis-server is not installed (.ci/run installs Debian's "
                        "redis-server); the fleet's tests need a real one")
        self.root = root
        self.port = free_port()
        self.aof = aof
        self.args = args  # more of redis-server's options (--requirepass PASSWORD, say)
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = [REDIS, "--port", str(self.port), "--bind", "127.0.0.1", "--dir",
                str(self.root), "--save", "", "--logfile", str(self.root / "redis.log")]
        if self.aof:
            args += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            args += ["--appendonly", "no"]
        args += self.args
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(self.answers, timeout=10)

    def answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith((b"+PONG", b"-NOAUTH"))  # (up, password or not)
        except OSError:
            return False

    def stop(self, kill: bool = False) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            self.proc.wait(timeout=10)
        self.proc = None


class RedisCluster:
    """Three redis-server nodes made one Redis Cluster (no replicas), on loopback ports."""

    def __init__(self, root: Path) -> None:
        cli = shutil.which("redis-cli")
        if REDIS is None or cli is None:
            pytest.skip("redis-server and redis-cli are not installed (.ci/run installs "
                        "Debian's redis-server, which brings both)")
        self.root = root
        self.ports = cluster_ports(3)
        self.procs = []
        for port in self.ports:
            node = root / str(port)
            node.mkdir()
            self.procs.append(subprocess.Popen(
                [REDIS, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(node),
                 "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                 "--save", "", "--appendonly", "no", "--logfile", str(node / "log")],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        try:
            for port in self.ports:
                wait_until(lambda port=port: _pong(port), timeout=10)
            subprocess.run([cli, "--cluster", "create",
                            *(f"127.0.0.1:{port}" for port in self.ports),
                            "--cluster-replicas", "0", "--cluster-yes"],
                           check=True, capture_output=True, timeout=60)
            for port in self.ports:
                wait_until(lambda port=port: b"cluster_state:ok" in subprocess.run(
                    [cli, "-p", str(port), "cluster", "info"], capture_output=True).stdout,
                    timeout=30)
        except BaseException:
            self.stop()  # no node outlives a cluster that could not be made
            raise

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=10)


def cluster_ports(count: int) -> list[int]:
    """Free ports whose cluster bus ports (port + 10000) are free too, so below 55536."""
    import random

    found: list[int] = []
    while len(found) < count:
        port = random.randrange(20000, 30000)
        if port in found:
            continue
        try:
            for p in (port, port + 10000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        found.append(port)
    return found


def _pong(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class Host(World):
    """One host of the fleet: a world whose daemon has a host id and the fleet's store."""

    def __init__(self, root: Path, host_id: str, store: str, *extra: str) -> None:
        super().__init__(root)
        self.host_id = host_id
        self.env["DEBOUNCE_HOST_ID"] = host_id
        self.env["DEBOUNCE_STORE"] = store
        self.extra = extra
        self.daemon: subprocess.Popen[str] | None = None

    def start(self) -> None:
        with open(self.root / "daemon.log", "a") as log:
            self.daemon = self.popen("daemon", "--lease", LEASE, "--idle-exit", "0",
                                     *self.extra, stdout=subprocess.DEVNULL, stderr=log)
        wait_until(lambda: os.path.exists(self.socket), timeout=15)

    def log(self) -> str:
        try:
            return (self.root / "daemon.log").read_text()
        except FileNotFoundError:
            return ""

    def kill9(self) -> None:
        assert self.daemon is not None
        self.daemon.kill()
        self.daemon.wait()

    def store_calls(self, op: str) -> int:
        """How many calls of ``op`` this host's daemon has made to the store (its metrics)."""
        proc = self.run("metrics")
        assert proc.returncode == 0, proc.stderr
        prefix = f'debounce_fleet_store_round_trip_seconds_count{{op="{op}"}} '
        for line in proc.stdout.splitlines():
            if line.startswith(prefix):
                return int(line[len(prefix):])
        return 0

    def fleet_status(self) -> list[dict]:
        proc = self.run("status", "--fleet", "--json")
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)["keys"]

    def fleet_history(self, *args: str) -> list[dict]:
        proc = self.run("history", "--fleet", "--json", *args)
        assert proc.returncode == 0, proc.stderr
        return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]


class Fleet:
    def __init__(self, redis: Redis | RedisCluster, count: int = 3,
                 extra: dict[str, tuple[str, ...]] | None = None) -> None:
        self.redis = redis
        self.hosts: list[Host] = []
        for i in range(count):
            host_id = "abcdefgh"[i]
            root = Path(tempfile.mkdtemp(prefix=f"dbf{host_id}-", dir="/tmp"))
            host = Host(root, host_id, redis.url, *((extra or {}).get(host_id, ())))
            self.hosts.append(host)
        for host in self.hosts:
            host.start()

    def coalesced(self, key: str) -> int:
        for row in self.hosts[0].fleet_status():
            if row["key"] == key and row.get("pending"):
                return int(row["pending"]["coalesced"])
        return 0

    def cleanup(self) -> None:
        for host in self.hosts:
            if host.daemon is not None and host.daemon.poll() is None:
                try:
                    os.kill(host.daemon.pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
            host.cleanup()
            shutil.rmtree(host.root, ignore_errors=True)


def finish(proc: subprocess.Popen[str], timeout: float = 30) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def runs_in(path: Path) -> list[str]:
    try:
        return [line for line in path.read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        return []


def settle(seconds: float) -> None:
    """Let time pass where a test checks that something does *not* happen."""
    time.sleep(seconds)
