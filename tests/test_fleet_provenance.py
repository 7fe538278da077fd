"""Which run covered me, for fleet keys (issue 20), against a real Redis: each host's
invocation ids, ``wait --invocation N`` on the host that accepted N, ``covered`` as
"HOST:ID" in ``history --json`` rows, and ``history --invocation N``."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest

from conftest import wait_until
from fleet_support import Fleet, Redis, finish

pytestmark = pytest.mark.slow


@pytest.fixture
def fleet():
    root = Path(tempfile.mkdtemp(prefix="dbp-", dir="/tmp"))
    redis = Redis(root)
    f = Fleet(redis, count=2)
    try:
        yield f
    finally:
        f.cleanup()
        redis.stop()
        shutil.rmtree(root, ignore_errors=True)


def _submit(host, key: str, *cmd: str, delay: str = "30s") -> int:
    proc = host.run("run", "--fleet", "--no-wait", "--json", "--key", key, "--delay", delay,
                    "--", *cmd)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)["id"]


def test_each_host_finds_the_fleet_run_that_covered_its_invocation(fleet):
    a, b = fleet.hosts
    first = _submit(a, "k", "sh", "-c", "exit 3", delay="3s")
    wait_until(lambda: fleet.coalesced("k") == 1, timeout=15)
    second = _submit(b, "k", "sh", "-c", "echo from-b; exit 4", delay="3s")
    # Both callers follow the one run from their own hosts: its output, its status.
    waiters = [a.popen("wait", "--invocation", str(first)),
               b.popen("wait", "--invocation", str(second))]
    for waiter in waiters:
        code, out, err = finish(waiter)
        assert (code, out) == (4, "from-b\n"), err

    [row] = [r for r in a.fleet_history() if r["key"] == "k"]
    assert row["covered"] == [f"a:{first}", f"b:{second}"]
    shown = a.run("history", "--invocation", str(first))
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.split("\t")[0] == str(row["run_id"])

    # A new daemon on host a no longer remembers the key: it looks through the fleet.
    a.kill9()
    a.start()
    again = a.run("wait", "--invocation", str(first))
    assert again.returncode == 4, again.stderr


def test_a_cancelled_fleet_invocation_exits_114(fleet):
    a, b = fleet.hosts
    inv = _submit(a, "c", "true")
    wait_until(lambda: fleet.coalesced("c") == 1, timeout=15)
    assert b.run("cancel", "c").returncode == 0
    proc = a.run("wait", "--invocation", str(inv))
    assert proc.returncode == 114, proc.stderr
    pending = _submit(a, "p", "true")
    shown = a.run("history", "--invocation", str(pending))
    assert shown.returncode == 117
    assert f"debounce wait --invocation {pending}" in shown.stderr
