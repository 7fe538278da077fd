"""`debounce logs --follow` (issue 19, item 12), as `pueue follow` and `docker logs -f`: the
output of a run as it is written, from its start, then the run's status as the exit status;
of run N, or of KEY's run executing now, else its next one; a run that has ended gives its
log and its status. Ctrl-C stops following only."""

from __future__ import annotations

import signal

from conftest import status, wait_until


def _running(world, key: str) -> bool:
    return any(row["key"] == key and row.get("running") for row in status(world)["keys"])


def test_follow_a_running_run_from_its_start_to_its_status(world):
    gate = world.work / "gate"
    script = f'echo one; while [ ! -e {gate} ]; do sleep 0.05; done; echo two; exit 3'
    proc = world.run("run", "--no-wait", "--delay", "0", "--key", "k", "--",
                     "sh", "-c", script)
    assert proc.returncode == 0, proc.stderr
    wait_until(lambda: _running(world, "k"), timeout=10)
    follower = world.popen("logs", "--follow", "k")
    assert follower.stdout is not None
    assert follower.stdout.readline() == "one\n"  # live: the run has not gone on yet
    gate.touch()
    out, err = follower.communicate(timeout=30)
    assert follower.returncode == 3, err
    assert out == "two\n"


def test_follow_a_key_that_is_pending_streams_its_next_run(world):
    proc = world.run("run", "--no-wait", "--delay", "1s", "--key", "p", "--",
                     "sh", "-c", "echo later; exit 4")
    assert proc.returncode == 0, proc.stderr
    follower = world.popen("logs", "-f", "--key", "p")
    out, err = follower.communicate(timeout=30)
    assert (follower.returncode, out) == (4, "later\n"), err


def test_follow_a_run_that_has_ended_prints_its_log_and_exits_with_its_status(world):
    done = world.run("run", "--delay", "0", "--key", "d", "--", "sh", "-c",
                     "echo out; echo err >&2; exit 5")
    assert done.returncode == 5
    follower = world.run("logs", "--follow", "d")
    assert (follower.returncode, follower.stdout, follower.stderr) == (5, "out\n", "err\n")
    again = world.run("logs", "--follow", "--run", "1")
    assert (again.returncode, again.stdout) == (5, "out\n")


def test_ctrl_c_stops_following_and_the_run_goes_on(world):
    marker = world.work / "ran"
    gate = world.work / "gate"
    script = f'echo start; while [ ! -e {gate} ]; do sleep 0.05; done; touch {marker}'
    world.run("run", "--no-wait", "--delay", "0", "--key", "c", "--", "sh", "-c", script)
    wait_until(lambda: _running(world, "c"), timeout=10)
    follower = world.popen("logs", "-f", "c")
    wait_until(lambda: follower.stdout is not None and follower.stdout.readline(), timeout=10)
    follower.send_signal(signal.SIGINT)
    follower.communicate(timeout=10)
    assert follower.returncode == 130
    gate.touch()
    wait_until(marker.exists, timeout=10)  # the run went on to its end
