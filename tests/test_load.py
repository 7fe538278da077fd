"""Load: many waiters on one key, thousands of pending keys, a steady stream of connections.
No error, no lost run, no duplicated run.

The 50 waiters are real ``debounce run`` processes. The thousands of submissions go over raw
protocol connections (one request per connection, as the protocol has it) from a thread pool,
because 5,000 CLI processes would measure Python's start-up, not the daemon.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import lines, status, wait_until

#: Minutes of real processes at scale: the full run (README's test command) only.
pytestmark = pytest.mark.slow

HELLO = b'{"type":"hello","version":1,"client":"load-test"}\n'
#: Appends the run's key to the file given as $0.
APPEND_KEY = 'echo "$DEBOUNCE_KEY" >> "$0"'


def submit_raw(world, key: str, log: Path, delay: float, patience: float = 30) -> list[dict]:
    """One connection: hello, a --no-wait run of APPEND_KEY, end of our side, then read the
    answers until the daemon closes."""
    return submit_argv(world, key, ["sh", "-c", APPEND_KEY, str(log)], delay, patience)


def submit_argv(world, key: str, argv: list[str], delay: float,
                patience: float = 30) -> list[dict]:
    """:func:`submit_raw` of any command."""
    request = {
        "type": "run", "argv": argv, "cwd": str(world.work),
        "env": {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}, "key": key,
        "options": {"delay": delay}, "wait": False,
    }
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(world.socket)  # blocking, like the CLI: a full backlog makes us wait
        s.settimeout(patience)
        s.sendall(HELLO + json.dumps(request).encode() + b"\n")
        s.shutdown(socket.SHUT_WR)  # that was all: the daemon answers, then closes
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    finally:
        s.close()
    return [json.loads(x) for x in data.split(b"\n") if x.strip()]


def accepted(replies: list[dict]) -> bool:
    return [r["type"] for r in replies] == ["hello", "accepted"]


# ----------------------------------------------------------------------------- one key, 50 waiters


def test_fifty_clients_waiting_on_one_key_share_one_run(world):
    log = world.work / "runs.log"
    status(world)
    procs = [
        world.popen("run", "--key", "one", "--delay", "6s", "--json", "--",
                    "sh", "-c", f"echo x >> {log}; exit 5")
        for _ in range(50)
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 5, err
        results.append(json.loads(out))
    assert len({r["run_id"] for r in results}) == 1, Counter(r["run_id"] for r in results)
    assert all(r["exit_code"] == 5 and r["coalesced"] == 50 for r in results), results[0]
    assert lines(log) == ["x"]
    hist = world.run("history", "--json")
    rows = [json.loads(x) for x in hist.stdout.splitlines()]
    assert [(r["key"], r["coalesced"]) for r in rows] == [("one", 50)]


# ----------------------------------------------------------------------------- 5,000 keys


@pytest.mark.timeout(240)
def test_five_thousand_pending_keys_each_run_exactly_once(world):
    log = world.work / "keys.log"
    status(world)
    keys = [f"key-{i:04d}" for i in range(5000)]
    # Patient submitters: how long the daemon takes to answer is the next test's business.
    with ThreadPoolExecutor(max_workers=16) as pool:
        replies = list(pool.map(lambda k: submit_raw(world, k, log, 1.0, patience=150), keys))
    refused = [(k, r) for k, r in zip(keys, replies, strict=True) if not accepted(r)]
    assert not refused, f"{len(refused)} submissions not accepted, e.g. {refused[:3]}"

    wait_until(lambda: len(lines(log)) >= len(keys), timeout=150, interval=0.2)
    wait_until(lambda: not status(world)["keys"], timeout=60, interval=0.2)
    counts = Counter(lines(log))
    assert set(counts) == set(keys)
    assert [k for k, n in counts.items() if n != 1] == []


@pytest.mark.timeout(120)
def test_clients_are_answered_while_thousands_of_runs_start(world):
    log = world.work / "burst.log"
    status(world)
    keys = [f"burst-{i:04d}" for i in range(3000)]
    began = time.monotonic()
    with ThreadPoolExecutor(max_workers=16) as pool:
        replies = list(pool.map(lambda k: submit_raw(world, k, log, 3.0, patience=150), keys))
    assert all(accepted(r) for r in replies)
    assert time.monotonic() - began < 2.5, "too slow to submit before the burst falls due"
    wait_until(lambda: lines(log), timeout=15)  # the burst has begun

    # What a user does meanwhile: look at the status, submit something. Both must work.
    probes = []
    while len(lines(log)) < len(keys) and len(probes) < 10:
        t = time.monotonic()
        proc = world.run("status", "--json", timeout=60)
        probes.append(("status", proc.returncode, round(time.monotonic() - t, 1),
                       proc.stderr.strip()))
        t = time.monotonic()
        proc = world.run("run", "--no-wait", "--key", "probe", "--delay", "10s", "--", "true",
                         timeout=60)
        probes.append(("run --no-wait", proc.returncode, round(time.monotonic() - t, 1),
                       proc.stderr.strip()))
    wait_until(lambda: len(lines(log)) >= len(keys), timeout=90, interval=0.2)
    assert all(code == 0 for _, code, _, _ in probes), probes
    assert max(took for _, _, took, _ in probes) < 5, probes


# ----------------------------------------------------------------------------- connection rate


@pytest.mark.timeout(120)
def test_two_hundred_connections_per_second_for_ten_seconds(world):
    log = world.work / "rate.log"
    rate, seconds, nkeys = 200, 10, 20
    total = rate * seconds
    status(world)
    results: list[list[dict] | BaseException | None] = [None] * total
    lock = threading.Lock()

    def one(i: int) -> None:
        try:
            out: list[dict] | BaseException = submit_raw(world, f"rate-{i % nkeys:02d}", log, 0.05)
        except BaseException as exc:  # noqa: BLE001 - reported below
            out = exc
        with lock:
            results[i] = out

    began = time.monotonic()
    with ThreadPoolExecutor(max_workers=48) as pool:
        for i in range(total):
            delay = began + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)  # pacing the submissions, not waiting for a result
            pool.submit(one, i)
    elapsed = time.monotonic() - began

    failures = [r for r in results if not isinstance(r, list) or not accepted(r)]
    assert not failures, f"{len(failures)} of {total} failed, e.g. {failures[:3]}"
    assert elapsed < seconds * 1.5, f"the daemon kept up with only {total / elapsed:.0f}/s"

    wait_until(lambda: not status(world)["keys"], timeout=60, interval=0.2)
    hist = world.run("history", "--json", "--limit", "1000000", timeout=60)
    assert hist.returncode == 0, hist.stderr
    rows = [json.loads(x) for x in hist.stdout.splitlines() if x.strip()]
    assert all(r["exit_code"] == 0 for r in rows), [r for r in rows if r["exit_code"] != 0][:3]
    assert len({r["run_id"] for r in rows}) == len(rows)
    ran = Counter(lines(log))
    in_history = Counter(r["key"] for r in rows)
    assert ran == in_history, "runs that happened and runs in history differ"
    assert sum(r["coalesced"] for r in rows) == total, "accepted invocations lost or doubled"
    assert set(ran) == {f"rate-{k:02d}" for k in range(nkeys)}
