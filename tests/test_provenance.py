"""Which run covered me (issue 20): every accepted invocation has an id (``run --json``
prints it); ``wait --invocation N`` follows the run that stands for it and exits with its
status (114 cancelled, 113 lost); ``history --json`` lists each run's ``covered`` ids and
``history --invocation N`` shows the run that covered N. Across a daemon restart too."""

from __future__ import annotations

import json
import os
import signal

import pytest
from test_durability import kill9, lock_pid

from debounce_cli.journal import Journal
from debounce_cli.scheduler import COVERED_MAX, Options, Scheduler

from conftest import status, wait_until


def _submit(world, key: str, *cmd: str, delay: str = "30s") -> int:
    proc = world.run("run", "--no-wait", "--json", "--key", key, "--delay", delay, "--", *cmd)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)["id"]


def _history(world, *args: str) -> list[dict]:
    proc = world.run("history", "--json", *args)
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines()]


@pytest.mark.smoke
def test_wait_for_a_coalesced_invocation_follows_the_run_that_covered_it(world):
    first = _submit(world, "k", "sh", "-c", "echo first; exit 3", delay="3s")
    second = _submit(world, "k", "sh", "-c", "echo second; exit 4", delay="3s")
    other = _submit(world, "other", "true")
    # Attached while pending (a client starts well within the quiet period), it is told
    # what a caller of the winning invocation is: the output, then the status.
    waiter = world.popen("wait", "--invocation", str(first))
    out, err = waiter.communicate(timeout=30)
    # The run of the later invocation stood for the first: its output, its status.
    assert (waiter.returncode, out) == (4, "second\n"), err

    [row] = _history(world, "k")
    assert row["covered"] == [first, second] and row["invocation"] == second
    shown = world.run("history", "--invocation", str(first))
    assert shown.returncode == 0 and shown.stdout.split("\t")[0] == str(row["run_id"])
    # Still pending: history says so in one line, and names the command that waits.
    pending = world.run("history", "--invocation", str(other))
    assert pending.returncode == 117
    assert f"debounce wait --invocation {other}" in pending.stderr
    assert len(pending.stderr.strip().splitlines()) == 1


def test_a_cancelled_invocation_exits_114_also_after_a_restart(world):
    inv = _submit(world, "c", "true")
    joined = _submit(world, "c", "true")
    assert world.run("cancel", "c").returncode == 0
    for wanted in (inv, joined):
        proc = world.run("wait", "--invocation", str(wanted))
        assert proc.returncode == 114, proc.stderr
    assert world.run("stop").returncode == 0
    proc = world.run("wait", "--invocation", str(inv))  # a new daemon: from the journal
    assert proc.returncode == 114, proc.stderr
    assert "cancelled" in proc.stderr


def test_coalesced_ids_survive_a_restart_while_pending(world):
    """The pending invocation's list of what it stands for is in the journal: after
    ``stop`` and a new daemon, waiting for the first invocation still finds its run."""
    first = _submit(world, "p", "sh", "-c", "exit 5", delay="2s")
    second = _submit(world, "p", "sh", "-c", "exit 6", delay="2s")
    assert world.run("stop").returncode == 0
    proc = world.run("wait", "--invocation", str(first), timeout=60)
    assert proc.returncode == 6, proc.stderr
    [row] = _history(world, "p")
    assert row["covered"] == [first, second]


def test_the_run_of_an_invocation_lost_at_kill_9_exits_113(world):
    marker = world.work / "started"
    inv = _submit(world, "lost", "sh", "-c", f"touch {marker}; sleep 60", delay="0")
    wait_until(marker.exists, timeout=15)
    pid = lock_pid(world.socket)
    kill9(world.socket)
    assert pid is not None
    proc = world.run("wait", "--invocation", str(inv))
    assert proc.returncode == 113, proc.stderr
    assert [row["covered"] for row in _history(world, "lost")] == [[inv]]


def test_an_unknown_invocation_is_one_clear_line(world):
    status(world)
    proc = world.run("wait", "--invocation", "999")
    assert proc.returncode == 117
    assert proc.stderr.count("\n") == 1 and "no invocation 999" in proc.stderr
    both = world.run("wait", "--invocation", "3", "--key", "k")
    assert both.returncode == 2


# ------------------------------------------------------------------ the journal, directly
class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class _Job:
    def __init__(self, argv: list[str]) -> None:
        self.argv, self.cwd, self.env = argv, "/", {"A": "1"}
        self.pid, self.log_path = None, None


def _journal(tmp_path) -> tuple[Journal, Scheduler, _Clock]:
    journal = Journal(str(tmp_path), str(tmp_path / "sock"))
    journal.open()
    clock = _Clock()
    sched = Scheduler(clock=clock, observer=journal.observe)
    return journal, sched, clock


def test_a_growing_collect_batch_writes_only_its_new_items_each_commit(tmp_path):
    """Issue 23 item 8: a commit rewrote the whole batch, so N invocations cost N squared."""
    journal, sched, _clock = _journal(tmp_path)
    inserted: list[str] = []
    assert journal.db is not None
    journal.db.set_trace_callback(
        lambda sql: inserted.append(sql) if sql.startswith("INSERT OR REPLACE INTO batches")
        else None)
    opts = Options(delay=10.0, collect=True)
    for i in range(200):
        sched.submit("k", opts, _Job(["lint", str(i)]))
        journal.commit(sched, 0.0)
    assert len(inserted) == 200  # one row per invocation, not 1 + 2 + ... + 200

    restored = Journal(str(tmp_path), str(tmp_path / "sock"))
    restored.open()
    [pending] = restored.load().pending
    assert pending.batch == [["lint", str(i)] for i in range(200)]
    assert pending.covered is not None and list(pending.covered) == list(range(1, 201))


def test_the_journal_keeps_the_newest_ids_and_the_count_of_a_huge_burst(tmp_path):
    journal, sched, _clock = _journal(tmp_path)
    total = 2 * COVERED_MAX + 7
    for i in range(total):
        sched.submit("k", Options(delay=10.0), _Job(["x", str(i)]))
    journal.commit(sched, 0.0)
    restored = Journal(str(tmp_path), str(tmp_path / "sock"))
    restored.open()
    [pending] = restored.load().pending
    assert pending.covered is not None
    assert pending.covered.total() == total and pending.covered.shown() == total
    assert pending.covered.kept()[-1] == total  # the newest id can still be looked up


def test_sigterm_keeps_the_covered_ids_of_what_is_pending(world):
    """The same through a real daemon stopped by SIGTERM (its pending stays pending)."""
    first = _submit(world, "t", "true")
    second = _submit(world, "t", "true")
    pid = lock_pid(world.socket)
    assert pid is not None
    os.kill(pid, signal.SIGTERM)
    wait_until(lambda: lock_pid(world.socket) is None, timeout=15)
    waiter = world.popen("wait", "--invocation", str(first))
    wait_until(lambda: any(row["key"] == "t" for row in status(world)["keys"]), timeout=10)
    assert world.run("flush", "t").returncode == 0
    waiter.communicate(timeout=30)
    assert waiter.returncode == 0
    assert [row["covered"] for row in _history(world, "t")] == [[first, second]]
