"""A fleet submission whose answer was lost (issue 18, item 6), on fake time: the store took
it but the reply never came. Its client is never told "refused" for it: the daemon retries
with the submission's token (the store recognises work it has done), and past the client's
budget says "outcome unknown" (118) with the command that finds it out. It runs once."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import pytest
from fleet_sim import Sim

from debounce_cli import protocol, states
from debounce_cli.daemon.fleet import state as fs
from debounce_cli.daemon.fleet.claims import ANSWER_WITHIN
from debounce_cli.scheduler import Options

from conftest import lines, wait_until
from fleet_proxy import Proxy
from fleet_support import Host, Redis


def test_a_lost_answer_is_retried_and_the_command_runs_once(sim: Sim) -> None:
    a = sim.host("a")
    sim.run_for(1.0)
    a.store.lose_replies = True  # the step reaches the store; its answer does not come back
    caller = a.submit("k", 1.0, delay=1.0)
    sim.run_for(5.0)
    assert caller.answer is None  # neither "refused" nor accepted yet: it is being retried
    a.store.lose_replies = False
    sim.run_until(lambda: caller.result is not None)
    assert isinstance(caller.answer, protocol.Accepted) and caller.answer.coalesced == 1
    assert caller.outcome == ("finished", 0, "exited")
    sim.run_for(30.0)
    assert len(sim.starts("k")) == 1


def test_past_the_budget_the_client_is_told_118_and_it_still_runs_once(sim: Sim) -> None:
    a = sim.host("a")
    sim.run_for(1.0)
    a.store.lose_replies = True
    caller = a.submit("k", 1.0, delay=1.0)
    sent = sim.loop.now
    sim.run_until(lambda: caller.answer is not None)
    answer = caller.answer
    assert isinstance(answer, protocol.Error) and answer.code == states.UNKNOWN, answer
    assert sim.loop.now - sent < 30.0  # before the client's own 30 s run out
    assert sim.loop.now - sent >= ANSWER_WITHIN
    inv = a.fleet.claims.submitted and max(a.fleet.claims.submitted)
    assert f"debounce wait --invocation {inv}" in answer.message
    assert sim.starts("k") == []
    a.store.lose_replies = False  # the store took it: it runs, once, without its client
    sim.run_until(lambda: sim.starts("k"))
    sim.run_for(30.0)
    assert len(sim.starts("k")) == 1 and sim.overlaps() == []


def test_a_store_that_refuses_the_connection_is_still_116_and_nothing_runs(
        sim: Sim) -> None:
    a = sim.host("a")
    sim.run_for(1.0)
    a.store.down = True  # nothing reaches it: nothing was applied
    caller = a.submit("k", 1.0, delay=1.0)
    sim.run_until(lambda: caller.answer is not None)
    assert isinstance(caller.answer, protocol.Error)
    assert caller.answer.code == states.REFUSED
    a.store.down = False
    sim.run_for(30.0)
    assert sim.starts("k") == []


def _submit(st: fs.KeyState, inv: int, now: float, token: str) -> fs.Landed:
    landed, _ = fs.submit(st, inv=inv, host="a", job={"argv": ["x"], "cwd": "/", "env": {}},
                          options=Options(delay=1.0), now=now, token=token)
    return landed


def test_a_retried_token_is_recognised_however_far_the_key_has_moved() -> None:
    """Before, only the pending invocation's own token was: a retry after its run started
    (or after a later invocation replaced it) filed the invocation again and ran it twice."""
    st = fs.KeyState("k")
    assert isinstance(_submit(st, 1, 0.0, "i:1"), fs.InSlot)
    started, _ = fs.claim(st, host="a", now=1.0, run_id=7, may_take_over=False)
    assert isinstance(started, fs.Start)
    again = _submit(st, 1, 1.5, "i:1")  # the retry of the first, its answer lost
    assert again == fs.InRun(7, 1) and st.pending is None

    assert isinstance(_submit(st, 2, 2.0, "i:2"), fs.InSlot)
    assert isinstance(_submit(st, 3, 2.1, "i:3"), fs.InSlot)  # replaces 2
    landed = _submit(st, 2, 2.2, "i:2")
    assert isinstance(landed, fs.InSlot) and st.pending is not None and st.pending.inv == 3
    assert st.pending.coalesced == 2

    fs.cancel(st)
    assert _submit(st, 3, 2.3, "i:3") == fs.Gone() and st.pending is None


# ------------------------------------------------------------------ against a real Redis
@pytest.mark.slow
def test_a_real_store_whose_answers_are_lost_gets_118_and_the_command_runs_once():
    """Issue 18 item 6 as reported: the proxy forwards the submission to Redis, then goes
    dark for the answers. Before, the client exited 116 ("refused") and the command ran
    anyway once the network healed."""
    root = Path(tempfile.mkdtemp(prefix="dbl-", dir="/tmp"))
    redis = Redis(root)
    proxy = Proxy(redis.port)
    (root / "a").mkdir()
    host = Host(root / "a", "a", proxy.url)
    try:
        host.start()
        warm = host.run("run", "--fleet", "--key", "warm", "--delay", "0", "--", "true")
        assert warm.returncode == 0, warm.stderr
        proxy.mode = "drop_replies"
        runs = host.work / "runs.txt"
        began = time.monotonic()
        proc = host.run("run", "--fleet", "--no-wait", "--key", "k", "--delay", "1s", "--",
                        "sh", "-c", f"echo ran >> {runs}", timeout=60)
        took = time.monotonic() - began
        assert proc.returncode == 118, (proc.returncode, proc.stderr)
        assert "debounce wait --invocation" in proc.stderr and took < 30.0
        inv = proc.stderr.split("debounce wait --invocation ")[1].split()[0]
        proxy.mode = "pass"
        wait_until(lambda: lines(runs), timeout=30)
        waited = host.run("wait", "--invocation", inv, timeout=60)
        assert waited.returncode == 0, waited.stderr
        time.sleep(2.0)  # a second run would have started by now (the delay is 1 s)
        assert lines(runs) == ["ran"]
        [row] = [json.loads(x) for x in host.run("history", "--fleet", "--json").stdout
                 .splitlines() if json.loads(x)["key"] == "k"]
        assert row["covered"] == [f"a:{inv}"]
    finally:
        proxy.mode = "pass"
        host.cleanup()
        proxy.close()
        redis.stop()
        shutil.rmtree(root, ignore_errors=True)
