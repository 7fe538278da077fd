"""Issue 18, item 4, as reported: one host cut off from the store (a proxy that stops
forwarding) while its run executes, and another host submits the key. Before, the second
host's run started while the first still ran (two runs of one key at once) and the first
caller exited 113 although its command exited 0. Now the cut-off host stops its own run
before anyone may take the key over (half a lease without renewal), so the runs never
overlap, and its caller is told the run was lost."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import pytest

from conftest import lines, wait_until
from fleet_proxy import Proxy
from fleet_support import Host, Redis, finish

pytestmark = pytest.mark.slow


def _command(log: Path, name: str, seconds: float) -> list[str]:
    """Notes its start, and its stop if TERM comes, with the time (seconds since the epoch)."""
    return ["sh", "-c",
            f"trap 'echo stop {name} $(date +%s.%N) >> {log}; exit 143' TERM; "
            f"echo start {name} $(date +%s.%N) >> {log}; "
            f"sleep {seconds} & wait $!; echo end {name} $(date +%s.%N) >> {log}"]


@pytest.mark.timeout(240)
def test_a_host_cut_off_mid_run_stops_it_before_another_host_runs_the_key():
    root = Path(tempfile.mkdtemp(prefix="dbx-", dir="/tmp"))
    redis = Redis(root)
    proxy = Proxy(redis.port)
    (root / "a").mkdir()
    (root / "b").mkdir()
    a = Host(root / "a", "a", proxy.url)
    b = Host(root / "b", "b", redis.url)
    log = root / "runs.log"
    try:
        a.start()
        b.start()
        first = a.popen("run", "--fleet", "--key", "k", "--delay", "0", "--",
                        *_command(log, "a", 6))
        wait_until(lambda: any(line.startswith("start a") for line in lines(log)), timeout=15)
        proxy.mode = "dark"  # a can reach nothing: no renewal, no report
        cut = time.time()
        second = b.popen("run", "--fleet", "--key", "k", "--delay", "0", "--",
                         *_command(log, "b", 0.5))
        code, _, err = finish(second, timeout=60)
        assert code == 0, err
        proxy.mode = "pass"
        code, _, err = finish(first, timeout=60)
        assert code == 113 and "lost" in err, (code, err)

        events = {(kind, name): float(when) for kind, name, when in
                  (line.split() for line in lines(log))}
        assert ("end", "a") not in events  # stopped, not finished
        assert ("stop", "a") in events, f"a's run was never stopped: {lines(log)}"
        assert events[("stop", "a")] <= events[("start", "b")], lines(log)
        assert events[("start", "b")] - cut >= 1.0  # b waited for a's lease, not for a
        [row] = [r for r in b.fleet_history("k") if r["host"] == "a"]
        assert row["outcome"] == "lost"
    finally:
        proxy.mode = "pass"
        for host in (a, b):
            host.cleanup()
        proxy.close()
        redis.stop()
        shutil.rmtree(root, ignore_errors=True)
