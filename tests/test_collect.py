"""--collect as a new user tries it first: without --key, calls that differ only in their
last argument coalesce into one run of all of them (issue 19, item 3), and a winner with no
argument runs as it is (issue 22, item 3)."""

from __future__ import annotations

import json

from conftest import lines, status, wait_until


def _coalesced(world) -> int:
    """How many invocations the key's pending one stands for now (0: none pending)."""
    return max((row["pending"]["coalesced"] for row in status(world)["keys"]
                if row.get("pending")), default=0)


def _lint(world, *args: str):
    """``debounce run --collect --delay 500ms -- sh -c ... lint ARGS``, waiting."""
    script = world.work / "lint"
    script.write_text('#!/bin/sh\necho "lint $*"\necho "$*" >> runs.txt\n'
                      'cat "$DEBOUNCE_BATCH" >> batches.txt\n')
    script.chmod(0o755)
    return world.popen("run", "--collect", "--delay", "2s", "--", "./lint", *args)


def test_collect_without_a_key_batches_calls_that_differ_in_their_last_argument(world):
    procs = []
    for name in ("x.py", "y.py", "z.py"):
        procs.append(_lint(world, "--fix", name))
        count = len(procs)
        wait_until(lambda count=count: _coalesced(world) == count, timeout=10)
    outputs = [p.communicate(timeout=30) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0]
    assert lines(world.work / "runs.txt") == ["--fix x.py y.py z.py"]
    for out, _ in outputs:
        assert out == "lint --fix x.py y.py z.py\n"


def test_a_collect_winner_without_arguments_runs_as_it_is(world):
    procs = []
    for args in (("a",), ("b",), ()):
        procs.append(_lint(world, *args))
        count = len(procs)
        wait_until(lambda count=count: _coalesced(world) == count, timeout=10)
    for p in procs:
        p.communicate(timeout=30)
        assert p.returncode == 0
    # `lint` alone ran (no argument): it stands for everything.
    assert (world.work / "runs.txt").read_text() == "\n"
    batch = [json.loads(line) for line in lines(world.work / "batches.txt")]
    assert batch == [["./lint", "a"], ["./lint", "b"], ["./lint"]]
