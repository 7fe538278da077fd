"""The rule corners of issue 22 on the real daemon (the pure rules are in test_rules.py):
times are those the commands themselves write, with tolerant bounds."""

from __future__ import annotations

import itertools
import time

from conftest import lines, status, wait_until


def _stamp(world, name: str) -> list[str]:
    """A command that appends its start time and NAME to starts.txt."""
    return ["sh", "-c", f'echo "$(date +%s.%N) {name}" >> {world.work / "starts.txt"}']


def _starts(world) -> list[tuple[float, str]]:
    return [(float(t), n) for t, n in (line.split() for line in lines(world.work / "starts.txt"))]


def _at(t0: float, offset: float) -> None:
    """Pace the calls: wait until ``offset`` seconds after ``t0``."""
    left = t0 + offset - time.monotonic()
    if left > 0:
        time.sleep(left)


def test_throttle_never_starts_twice_within_its_period(world):
    """--throttle 2s, calls at 0, 0.25 and 2.25 s: starts at about 0, 2 and 4 (the third
    call started 0.25 s after the second before)."""
    status(world)
    t0 = time.monotonic()
    for offset, name in ((0.0, "a"), (0.25, "b"), (2.25, "c")):
        _at(t0, offset)
        proc = world.run("run", "--no-wait", "--throttle", "2s", "--key", "t", "--",
                         *_stamp(world, name))
        assert proc.returncode == 0, proc.stderr
    wait_until(lambda: len(_starts(world)) == 3, timeout=20)
    times = [t for t, _ in _starts(world)]
    assert [n for _, n in _starts(world)] == ["a", "b", "c"]
    assert all(b - a >= 1.9 for a, b in itertools.pairwise(times)), times


def test_max_wait_counts_from_a_flushed_run(world):
    """--delay 2s --max-wait 2s; calls at 0 and 1, flush at 1.25, a call at 2.5: it runs by
    max-wait after the flushed run's start (about 3.25), not a delay after it (4.5)."""
    status(world)
    t0 = time.monotonic()
    opts = ["--delay", "2s", "--max-wait", "2s", "--key", "m", "--"]
    for offset, name in ((0.0, "a"), (1.0, "b")):
        _at(t0, offset)
        assert world.run("run", "--no-wait", *opts, *_stamp(world, name)).returncode == 0
    _at(t0, 1.25)
    assert world.run("flush", "m").returncode == 0
    wait_until(lambda: _starts(world), timeout=10)
    _at(t0, 2.5)
    assert world.run("run", "--no-wait", *opts, *_stamp(world, "c")).returncode == 0
    wait_until(lambda: len(_starts(world)) == 2, timeout=20)
    (first, a), (second, c) = _starts(world)
    assert (a, c) == ("b", "c")
    assert second - first < 2.6, second - first  # 2.0 by the bound; 3.25 before


def test_a_collect_batch_keeps_a_caller_that_did_not_say_collect(world):
    """Calls x (--collect), y (without) and z (--collect) on one key: one run of all three
    arguments (y's was lost before)."""
    script = world.work / "lint"
    script.write_text('#!/bin/sh\necho "$*" >> runs.txt\n')
    script.chmod(0o755)
    for name, collect in (("x", True), ("y", False), ("z", True)):
        flags = ["--collect"] if collect else []
        proc = world.run("run", "--no-wait", *flags, "--delay", "1s", "--key", "lint", "--",
                         "./lint", name)
        assert proc.returncode == 0, proc.stderr
    wait_until(lambda: lines(world.work / "runs.txt"), timeout=20)
    assert lines(world.work / "runs.txt") == ["x y z"]
