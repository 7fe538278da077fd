"""Issue 23, item 6: `debounce stop` (and SIGTERM) start nothing after they were asked to
stop. What had not started when the stop arrived stays pending in the journal, and the next
daemon runs it, once."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
from test_chaos import connect
from test_load import accepted, submit_argv

from debounce_cli import protocol

from conftest import lines, status, wait_until


@pytest.mark.timeout(120)
def test_stop_right_after_many_keys_fall_due_starts_nothing_after_it(world):
    keys = 300
    starts = world.work / "starts"
    script = f'echo "$1" >> {starts}; sleep 30'
    status(world)
    # Submitted at once over raw connections (300 CLI start-ups would take longer than the
    # delay): the keys fall due together, and the daemon spawns them a few per turn.
    with ThreadPoolExecutor(max_workers=8) as pool:
        replies = list(pool.map(
            lambda i: submit_argv(world, f"k{i}", ["sh", "-c", script, "sh", f"k{i}"], 1.0),
            range(keys)))
    assert all(accepted(r) for r in replies), [r for r in replies if not accepted(r)][:3]
    # Stop as the first of them start, on a connection opened beforehand (a client's
    # start-up would let the daemon spawn on meanwhile).
    sock, reader, _pid = connect(world)
    try:
        wait_until(lambda: lines(starts), timeout=30, interval=0.005)
        sock.sendall(protocol.encode(protocol.StopRequest()))
        reader.read()  # the daemon answers and closes once it has stopped
    finally:
        reader.close()
        sock.close()
    wait_until(lambda: world.daemon_pid() is None, timeout=60)
    # Every process of that daemon is gone with it: what it started has written its line
    # (or was stopped before it could). Before the fix it went on spawning what was due
    # until it exited: all 300. (Timestamps cannot tell: on a loaded machine a command's
    # first line can come long after its spawn.)
    before = {line for line in lines(starts)}
    assert before and len(before) < keys / 2, f"{len(before)} of {keys} keys started"
    # Everything that had not started is still pending for the next daemon: each key runs
    # once in all. The ones stopped while running are not run again: they had started
    # (some were stopped before their first line).
    status(world)

    def stopped() -> set[str]:
        proc = world.run("history", "--json", "--limit", "100000")
        assert proc.returncode == 0, proc.stderr
        rows = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
        return {row["key"] for row in rows if row["outcome"] == "stopped"}

    everyone = {f"k{i}" for i in range(keys)}
    wait_until(lambda: set(lines(starts)) | stopped() == everyone, timeout=60, interval=0.2)
    counted = lines(starts)
    assert sorted(counted) == sorted(set(counted)), "a key ran twice"
    again = (set(counted) - before) & stopped()
    assert not again, f"stopped by the stop, yet run again: {sorted(again)}"
