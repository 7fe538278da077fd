"""Fleet figures: three daemons standing for three hosts on one redis-server.

  redis         `redis-benchmark -t set -c 8` against the same redis-server, in the same run:
                the yardstick of the submissions' rate
  local         the same 8-thread client submitting LOCAL keys (no --fleet) to one daemon
                without a store (and --no-journal), in the same run: what a Python daemon
                and this Python client reach on this machine at all (the ceiling of the
                fleet's rate), and the fleet's rate as a fraction of it
  submissions   --fleet submissions per second over 8 persistent connections spread over the
                three daemons, with 40 keys pending and with MANY (10,000) pending, their ratio
                to redis-benchmark, and the cost of one submission at each size (wall clock,
                and CPU time of the daemons and redis-server), with the ratio of the sizes
  due-to-start  how late fleet runs start after their due time (the store's clock), p50/p99
  to-waiter     from a run's start on one host to its Started message reaching a waiter on
                another host, p50/p99 (one machine, so one wall clock)
"""

from __future__ import annotations

import os
import re
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


def _request(key: str, wait: bool, delay: float, argv: list[str], fleet: bool = True
             ) -> bytes:
    return protocol.encode(protocol.RunRequest(
        argv=argv, cwd="/", env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")}, key=key,
        options={"delay": delay, "fleet": True} if fleet else {"delay": delay}, wait=wait))


Percentile = Callable[[list[float], float], float]


def bench_fleet(rows: list[tuple[str, str, str]], seconds: float, probes: int,
                daemon_class: type, percentile: Percentile, many: int = 10_000) -> None:
    try:
        redis = RedisServer()
    except FileNotFoundError:
        rows.append(("fleet", "skipped", "redis-server is not installed"))
        return
    daemons = []
    try:
        benchmark = _redis_benchmark(redis, seconds)
        local = daemon_class("--no-journal")
        try:  # the ceiling: the same client, local keys, one daemon, no store
            ceiling, ceiling_cpu = _rate([local], seconds, "local", 40, None, fleet=False)
        finally:
            local.close()
        for host in ("a", "b", "c"):
            daemons.append(daemon_class("--store", redis.url, env={"DEBOUNCE_HOST_ID": host}))
        _submissions(rows, daemons, seconds, benchmark, many, redis, (ceiling, ceiling_cpu))
        _latency(rows, daemons, probes, percentile)
    finally:
        for daemon in daemons:
            daemon.close()
        redis.close()


def _redis_benchmark(redis: RedisServer, seconds: float) -> float | None:
    """SETs per second by ``redis-benchmark -t set -c 8`` on the same server (``None`` when
    redis-benchmark is not installed)."""
    binary = shutil.which("redis-benchmark")
    if binary is None:
        return None
    # About ``seconds`` of work at the rate of a small machine; the rate is what counts.
    requests = max(20_000, int(60_000 * seconds))
    out = subprocess.run([binary, "-h", "127.0.0.1", "-p", str(redis.port), "-t", "set",
                          "-c", "8", "-n", str(requests), "-q"],
                         capture_output=True, text=True, timeout=300).stdout
    found = re.search(r"SET: ([\d.]+) requests per second", out.replace("\r", "\n"))
    return float(found.group(1)) if found else None


def _cpu(pid: int) -> float:
    """CPU seconds process ``pid`` has used (user and system)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rate(daemons: list, seconds: float, prefix: str, keys: int,
          redis: RedisServer | None, fleet: bool = True) -> tuple[float, float]:
    """Submissions per second over 8 connections (spread over the daemons), each cycling
    through its share of ``keys`` keys (delay an hour: they all stay pending); every key is
    submitted once before the clock starts, so ``keys`` are pending while it runs. Also the
    CPU time the daemons and redis-server spent a submission meanwhile: a cost that the
    other work on a shared machine moves much less than the rate."""
    counts = [0] * 8
    barrier = threading.Barrier(9)
    stop = [float("inf")]
    share = max(1, keys // 8)
    errors: list[str] = []

    def sender(index: int) -> None:
        lines = [_request(f"{prefix}{index}-{k}", False, 3600.0, ["true"], fleet)
                 for k in range(share)]
        i = 0
        try:
            session = daemons[index % len(daemons)].session()
            for line in lines:  # fill: every key pending once
                session.sock.sendall(line)
                if not session.file.readline().startswith(b'{"type":"accepted"'):
                    raise RuntimeError("fleet submission refused")
            session.close()  # (a connection silent while others fill would be closed)
            barrier.wait()
            session = daemons[index % len(daemons)].session()
            barrier.wait()
            while time.monotonic() < stop[0]:
                session.sock.sendall(lines[i % share])
                if not session.file.readline().startswith(b'{"type":"accepted"'):
                    raise RuntimeError("fleet submission refused")
                i += 1
            session.close()
        except (RuntimeError, OSError, threading.BrokenBarrierError) as exc:
            errors.append(str(exc))
            barrier.abort()
        counts[index] = i

    threads = [threading.Thread(target=sender, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    pids = [daemon.proc.pid for daemon in daemons] + ([redis.proc.pid] if redis else [])
    try:
        barrier.wait()  # all filled
        cpu = sum(_cpu(pid) for pid in pids)
        start = time.monotonic()
        stop[0] = start + seconds
        barrier.wait()
    except threading.BrokenBarrierError:
        pass
    for t in threads:
        t.join()
    elapsed = time.monotonic() - start
    cpu = sum(_cpu(pid) for pid in pids) - cpu
    if errors:
        raise RuntimeError(errors[0])
    done = max(1, sum(counts))
    return done / elapsed, cpu / done


def _submissions(rows: list[tuple[str, str, str]], daemons: list, seconds: float,
                 benchmark: float | None, many: int, redis: RedisServer,
                 ceiling: tuple[float, float]) -> None:
    few, few_cpu = _rate(daemons, seconds, "few", 40, redis)
    lots, lots_cpu = _rate(daemons, seconds, "many", many, redis)
    local, local_cpu = ceiling
    if benchmark is not None:
        rows.append(("fleet: redis-benchmark -t set -c 8, same redis-server",
                     f"{benchmark:,.0f} SETs/s", "the yardstick, measured in this run"))
    rows.append(("fleet: the ceiling, LOCAL --no-wait submissions, 1 daemon, 8 connections",
                 f"{local:,.0f} submissions/s",
                 (f"{local / benchmark:.3f}x redis-benchmark; " if benchmark else "")
                 + f"the same client, no store, no journal; daemon CPU {local_cpu * 1e6:.1f} us "
                 "each"))
    for pending, rate in ((40, few), (many, lots)):
        ratio = f"{rate / benchmark:.3f}x redis-benchmark" if benchmark else "no redis-benchmark"
        rows.append((f"fleet: submissions, 3 daemons, 8 connections, {pending:,} keys pending",
                     f"{rate:,.0f} submissions/s", f"{ratio}, {rate / local:.2f}x the ceiling"))
    rows.append((f"fleet: time a submission, 40 and {many:,} keys pending",
                 f"{1e6 / few:.1f} us, {1e6 / lots:.1f} us",
                 f"{few / lots:.2f}x from 40 to {many:,} (wall clock / submissions)"))
    rows.append((f"fleet: CPU a submission, 40 and {many:,} keys pending",
                 f"{few_cpu * 1e6:.1f} us, {lots_cpu * 1e6:.1f} us",
                 f"{lots_cpu / few_cpu:.2f}x from 40 to {many:,} (3 daemons and redis-server)"))


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
