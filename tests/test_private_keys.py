"""``--no-defer`` keys live in a namespace of their own (issue 23, item 10).

A ``--no-defer`` invocation is filed under a key of its own, made from the user's key and its
invocation id. That key must never be one a user can submit: ``debounce run --no-defer --key
build -- A`` then ``debounce run --key 'build#1' -- B`` coalesced B into A, and A never ran.
"""

from __future__ import annotations

import json

import pytest
from test_scheduler import Sim

from debounce_cli import protocol
from debounce_cli.daemon.jobs import check_job
from debounce_cli.scheduler import Options

from conftest import World, lines, wait_until

NO_DEFER = Options(defer=False)


def test_a_user_key_spelled_like_a_no_defer_key_does_not_coalesce_with_it() -> None:
    """The issue's reproduction on the scheduler: both commands run, each on its own."""
    sim = Sim()
    first = sim.submit("build", at=0.0, payload="A", options=NO_DEFER)
    assert first.id == 1
    second = sim.submit("build#1", at=0.25, payload="B")
    assert second.replaced is None and first.replaced_by is None
    sim.advance(5.0)
    assert sorted(payload for _, payload in sim.starts()) == ["A", "B"]


def test_no_user_key_can_be_a_no_defer_key() -> None:
    """What a --no-defer invocation is filed under is refused as a submitted key, with one
    line that says what to change: no user key can ever land on it."""
    sim = Sim()
    inv = sim.submit("build", at=0.0, options=NO_DEFER)
    assert inv.key != "build" and inv.key.startswith("build")
    with pytest.raises(ValueError) as refused:
        check_job(["true"], "/", inv.key)
    message = str(refused.value)
    assert "\n" not in message and "U+FFFF" in message and "--key" in message
    check_job(["true"], "/", "build#1")  # what the key looked like before: a user's own


def test_fleet_no_defer_keys_are_out_of_the_users_reach() -> None:
    """The fleet's --no-defer key (host and invocation id) cannot be submitted either, and a
    user key spelled like it coalesces with nothing (on fake time, two hosts)."""
    from fleet_sim import Sim as FleetSim

    sim = FleetSim(lease=10.0)
    try:
        a, b = sim.host("a"), sim.host("b")
        first = a.submit("build", 1.0, delay=1.0, defer=False)
        sim.run_until(lambda: first.answer is not None)
        assert isinstance(first.answer, protocol.Accepted)
        private = first.answer.key
        with pytest.raises(ValueError):
            check_job(["true"], "/", private)
        spelled = f"build#a-{first.answer.id}"  # the key it had before
        second = b.submit(spelled, 1.0, delay=1.0)
        sim.run_until(lambda: first.result is not None and second.result is not None)
        assert first.outcome == second.outcome == ("finished", 0, "exited")
        assert len(sim.starts(private)) == 1 and len(sim.starts(spelled)) == 1
    finally:
        sim.close()


@pytest.mark.smoke
def test_no_defer_run_is_not_taken_over_by_a_key_spelled_like_it(world: World) -> None:
    """End to end: A (--no-defer, key build) and B (key 'build#1') both run; the key A was
    filed under is what --json said, and `wait --key` on it finds A's run."""
    out = world.work / "out"
    script = f"echo $1 >> {out}"
    a = world.run("run", "--no-wait", "--json", "--no-defer", "--key", "build", "--delay",
                  "300ms", "--", "sh", "-c", script, "sh", "A")
    assert a.returncode == 0, a.stderr
    accepted = json.loads(a.stdout)
    b = world.run("run", "--key", f"build#{accepted['id']}", "--delay", "100ms", "--",
                  "sh", "-c", script, "sh", "B")
    assert b.returncode == 0, b.stderr
    waited = world.run("wait", "--json", "--key", accepted["key"])
    assert waited.returncode == 0, waited.stderr
    assert json.loads(waited.stdout)["argv"][-1] == "A"
    wait_until(lambda: sorted(lines(out)) == ["A", "B"])


@pytest.mark.smoke
def test_a_key_holding_the_private_mark_is_refused_in_one_line(world: World) -> None:
    refused = world.run("run", "--key", "x\uffff#1", "--", "true")
    assert refused.returncode == 2
    assert refused.stderr.count("\n") == 1 and "U+FFFF" in refused.stderr, refused.stderr


def test_a_stdin_line_cannot_take_a_no_defer_key() -> None:
    """``daemon --stdin`` lines are checked like socket submissions: one line of refusal."""
    from debounce_cli.daemon.stdin import parse_stdin_line

    line = json.dumps({"argv": ["true"], "key": "build\uffff#1"}).encode()
    with pytest.raises(ValueError) as refused:
        parse_stdin_line(line, {})
    assert "U+FFFF" in str(refused.value) and "\n" not in str(refused.value)
    assert parse_stdin_line(json.dumps({"argv": ["true"], "key": "build#1"}).encode(), {})
