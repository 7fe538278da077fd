"""Fleet figures: three daemons standing for three hosts on one redis-server.

  submissions   --fleet submissions per second over 8 persistent connections spread over the
                three daemons (each one transaction in the store)
  due-to-start  how late fleet runs start after their due time (the store's clock), p50/p99
  to-waiter     from a run's start on one host to its Started message reaching a waiter on
                another host, p50/p99 (one machine, so one wall clock)
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from debounce_cli import protocol


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise FileNotFoundError("redis-server")
        self.root = Path(tempfile.mkdtemp(prefix="dbbr-", dir="/tmp"))
        self.port = _free_port()
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.root)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError("redis-server did not start")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)
        shutil.rmtree(self.root, ignore_errors=True)


def _request(key: str, wait: bool, delay: float, argv: list[str]) -> bytes:
    return protocol.encode(protocol.RunRequest(
        argv=argv, cwd="/", env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")}, key=key,
        options={"delay": delay, "fleet": True}, wait=wait))


Percentile = Callable[[list[float], float], float]


def bench_fleet(rows: list[tuple[str, str, str]], seconds: float, probes: int,
                daemon_class: type, percentile: Percentile) -> None:
    try:
        redis = RedisServer()
    except FileNotFoundError:
        rows.append(("fleet", "skipped", "redis-server is not installed"))
        return
    daemons = []
    try:
        for host in ("a", "b", "c"):
            daemons.append(daemon_class("--store", redis.url, env={"DEBOUNCE_HOST_ID": host}))
        _submissions(rows, daemons, seconds)
        _latency(rows, daemons, probes, percentile)
    finally:
        for daemon in daemons:
            daemon.close()
        redis.close()


def _submissions(rows: list[tuple[str, str, str]], daemons: list, seconds: float) -> None:
    counts = [0] * 8
    stop = time.monotonic() + seconds

    def sender(index: int) -> None:
        session = daemons[index % 3].session()
        lines = [_request(f"f{index}-{k}", False, 3600.0, ["true"]) for k in range(200)]
        i = 0
        while time.monotonic() < stop:
            session.sock.sendall(lines[i % 200])
            if not session.file.readline().startswith(b'{"type":"accepted"'):
                raise RuntimeError("fleet submission refused")
            i += 1
        counts[index] = i
        session.close()

    threads = [threading.Thread(target=sender, args=(i,)) for i in range(8)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rate = sum(counts) / (time.monotonic() - start)
    rows.append(("fleet: submissions, 3 daemons, 8 connections", f"{rate:,.0f} submissions/s",
                 "one store transaction each"))


def _latency(rows: list[tuple[str, str, str]], daemons: list, probes: int,
             percentile: Percentile) -> None:
    """Host b waits on a key whose latest invocation comes from host a (so the run starts on
    a): how late it starts, and how long its start takes to reach b's waiter."""
    late: list[float] = []
    reach: list[float] = []
    for i in range(probes):
        key = f"probe-{i}"
        waiter = daemons[1].session()
        waiter.sock.sendall(_request(key, True, 0.2, ["true"]))
        first = waiter.recv()
        assert isinstance(first, protocol.Accepted), first
        submitter = daemons[0].session()
        reply = submitter.ask(_decode(_request(key, False, 0.2, ["true"])))
        assert isinstance(reply, protocol.Accepted), reply
        submitter.close()
        while True:
            msg = waiter.recv()
            if isinstance(msg, protocol.Started):
                reach.append((time.time() - msg.started_at) * 1000)
            if isinstance(msg, protocol.Finished):
                break
        waiter.close()
    history = daemons[2].session()
    reply = history.ask(protocol.HistoryRequest(limit=probes, fleet=True))
    history.close()
    assert isinstance(reply, protocol.HistoryReply)
    for run in reply.runs:
        if run.key.startswith("probe-") and run.due_at:
            late.append((run.started_at - run.due_at) * 1000)
    p = percentile
    rows.append((f"fleet: due to start, {len(late)} runs",
                 f"p50 {p(late, 50):.2f} ms, p99 {p(late, 99):.2f} ms", "the store's clock"))
    rows.append((f"fleet: start to a waiter on another host, {len(reach)} runs",
                 f"p50 {p(reach, 50):.2f} ms, p99 {p(reach, 99):.2f} ms",
                 "through the key's stream"))


def _decode(line: bytes) -> protocol.Message:
    return protocol.decode(line, protocol.REQUESTS)
