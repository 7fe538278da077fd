"""Metrics: `debounce metrics` and `debounce daemon --metrics-listen` speak the Prometheus text
format, read here by prometheus_client's own parser, and count what a user can see happen."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import urllib.error
import urllib.request
from types import SimpleNamespace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from debounce_cli.daemon.metrics import OTHER, Metrics, TimedStore

from conftest import wait_until


def parse(text: str) -> dict[tuple[str, tuple], float]:
    """Every sample, by (name, sorted labels)."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def scrape(world) -> dict[tuple[str, tuple], float]:
    proc = world.run("metrics")
    assert proc.returncode == 0, proc.stderr
    return parse(proc.stdout)


def value(samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_count_submissions_coalescing_runs_and_outcomes(world):
    for _ in range(3):
        proc = world.run("run", "--no-wait", "--key", "docs", "--delay", "2s", "--",
                         "true")
        assert proc.returncode == 0, proc.stderr
    assert world.run("wait", "--key", "docs").returncode == 0
    assert world.run("run", "--delay", "0", "--key", "bad", "--", "false").returncode == 1
    m = scrape(world)
    assert value(m, "debounce_invocations_submitted_total") == 4
    assert value(m, "debounce_invocations_coalesced_total") == 2
    assert value(m, "debounce_runs_started_total") == 2
    assert value(m, "debounce_runs_finished_total", outcome="exited") == 2
    assert value(m, "debounce_runs_failed_total") == 1
    assert value(m, "debounce_key_invocations_submitted_total", key="docs") == 3
    assert value(m, "debounce_key_runs_started_total", key="docs") == 1
    assert value(m, "debounce_run_duration_seconds_count") == 2
    assert value(m, "debounce_run_duration_seconds_bucket", le="+Inf") == 2
    assert value(m, "debounce_run_start_lateness_seconds_count") == 2
    assert value(m, "debounce_journal_commit_seconds_count") >= 1
    assert value(m, "debounce_pending") == 0 and value(m, "debounce_running") == 0


def test_pending_and_running_gauges(world):
    assert world.run("run", "--no-wait", "--key", "later", "--delay", "30s", "--",
                     "true").returncode == 0
    assert world.run("run", "--no-wait", "--key", "now", "--delay", "0", "--",
                     "sleep", "30").returncode == 0
    m = wait_until(lambda: (s := scrape(world)) and value(s, "debounce_running") == 1 and s)
    assert value(m, "debounce_pending") == 1
    world.run("cancel", "later")
    world.run("kill", "now")
    wait_until(lambda: value(scrape(world), "debounce_running") == 0)
    m = scrape(world)
    assert value(m, "debounce_pending") == 0
    assert value(m, "debounce_runs_finished_total", outcome="killed") == 1


def _metrics_daemon(world, *args: str) -> tuple[subprocess.Popen, str]:
    proc = world.popen("daemon", "--metrics-listen", *args)
    line = proc.stderr.readline()
    match = re.search(r"metrics at (http://\S+/metrics)", line)
    assert match, line
    return proc, match.group(1)


def test_the_http_endpoint_serves_the_same_on_loopback(world):
    proc, url = _metrics_daemon(world, "0")  # a port alone: loopback, never a wildcard
    assert url.startswith("http://127.0.0.1:")
    assert world.run("run", "--delay", "0", "--key", "k", "--", "true").returncode == 0
    with urllib.request.urlopen(url, timeout=10) as answer:
        assert answer.status == 200
        assert answer.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        m = parse(answer.read().decode())
    assert value(m, "debounce_runs_started_total") == 1
    assert value(m, "debounce_key_runs_finished_total", key="k") == 1
    assert set(m) == set(scrape(world))  # the same families and series as `debounce metrics`
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(url.replace("/metrics", "/"), timeout=10)
    assert err.value.code == 404
    err.value.close()
    world.run("stop")
    assert proc.wait(timeout=30) == 0


def test_an_address_that_cannot_be_had_is_refused(world):
    assert world.run("daemon", "--metrics-listen", "nope").returncode == 2
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        port = busy.getsockname()[1]
        proc = world.run("daemon", "--metrics-listen", f"127.0.0.1:{port}")
        assert proc.returncode == 1
        assert f"cannot serve the metrics on 127.0.0.1:{port}" in proc.stderr
    finally:
        busy.close()
    assert not os.path.exists(world.socket)


def test_metrics_listen_from_the_user_config_file(world):
    config = world.root / "config"
    (config / "debounce").mkdir(parents=True)
    (config / "debounce" / "config.toml").write_text('metrics_listen = "127.0.0.1:0"\n')
    world.env["XDG_CONFIG_HOME"] = str(config)
    proc = world.popen("daemon")
    assert "metrics at http://127.0.0.1:" in proc.stderr.readline()
    world.run("stop")
    proc.wait(timeout=30)


def test_per_key_series_are_bounded_and_labels_escaped():
    metrics = Metrics(key_limit=3)
    for key in ['a "quoted"\\key\nwith a newline', "b", "c", "d", "e"]:
        metrics.invocation(key, coalesced=False)
    m = parse(metrics.render(pending=0, running=0))
    keys = {dict(labels)["key"]: v for (name, labels), v in m.items()
            if name == "debounce_key_invocations_submitted_total"}
    assert keys == {'a "quoted"\\key\nwith a newline': 1, "b": 1, "c": 1, OTHER: 2}


def test_store_round_trips_and_takeovers_of_a_fleet_daemon():
    """The store the fleet is given is timed; a claim that starts another host's invocation
    here is a takeover (the fleet's own code is unchanged)."""
    from debounce_cli.daemon.fleet.state import Nothing, Start

    class FakeStore:
        def __init__(self, st):
            self.st = st

        async def update(self, key, step, history=0):
            return step(self.st, 0.0)

        async def now(self):
            return 1.0

    metrics = Metrics()
    running = SimpleNamespace(run=7)
    theirs = SimpleNamespace(pending=SimpleNamespace(host="b"), running=None)
    ours = SimpleNamespace(pending=SimpleNamespace(host="a"), running=None)

    async def scenario():
        store = TimedStore(FakeStore(theirs), metrics, "a")
        await store.update("k", lambda st, now: (Start(running), []))
        await store.update("k", lambda st, now: (Nothing(), []))
        await TimedStore(FakeStore(ours), metrics, "a").update(
            "k", lambda st, now: (Start(running), []))
        assert await store.now() == 1.0

    asyncio.run(scenario())
    m = parse(metrics.render(pending=0, running=0, fleet=True))
    assert value(m, "debounce_fleet_takeovers_total") == 1
    assert value(m, "debounce_fleet_store_round_trip_seconds_count", op="update") == 3
    assert value(m, "debounce_fleet_store_round_trip_seconds_count", op="now") == 1
