"""What ``history``, ``status`` and ``--json`` say about a run matches what happened to it
(issue 23, "also"): a run that ``debounce kill --signal`` ended is ``killed``, as README
says; a run decided but whose process is not started yet is ``starting``, not ``running``."""

from __future__ import annotations

import json
import os
import signal

import pytest
from test_daemon_core import Daemon, FakeClient, make_daemon

from debounce_cli import protocol, render, states
from debounce_cli.protocol import Finished

from conftest import World, wait_until


@pytest.fixture
def d() -> Daemon:
    return make_daemon()


def _started(d: Daemon, key: str = "k") -> tuple[FakeClient, int]:
    client, _ = d.run(["server"], key=key, delay=0.0)
    d.loop.run_soon()
    run = d.runs.started[-1]
    assert run.key == key
    return client, run.id


@pytest.mark.parametrize("name", ["INT", "TERM", "KILL", "HUP"])
def test_a_run_that_dies_of_the_signal_kill_sent_is_killed(d: Daemon, name: str) -> None:
    client, run_id = _started(d)
    reply = d.ask(protocol.KillRequest(target="k", by="key", signal=name))
    assert isinstance(reply, protocol.Done) and reply.ok
    d.loop.run_soon()
    assert d.runs.signals == [(run_id, name)]
    code = 128 + signal.Signals["SIG" + name]
    d.core.run_exited(run_id, code)
    d.loop.run_soon()
    end = client.last()
    assert isinstance(end, Finished) and (end.exit_code, end.outcome) == (code, states.KILLED)
    [row] = d.ask(protocol.HistoryRequest(key="k")).runs
    assert row.outcome == states.KILLED


@pytest.mark.parametrize("code", [0, 3, 128 + signal.SIGKILL])
def test_a_run_that_outlives_the_signal_kill_sent_has_exited(d: Daemon, code: int) -> None:
    """`kill --signal USR1` to a run that handles it: when it later exits by itself (or is
    killed by some other signal, from elsewhere), it was not `debounce kill` that ended it."""
    client, run_id = _started(d)
    d.ask(protocol.KillRequest(target=str(run_id), by="run", signal="USR1"))
    d.loop.run_soon()
    d.core.run_exited(run_id, code)
    d.loop.run_soon()
    assert client.last().outcome == states.EXITED


def test_the_signal_of_one_run_says_nothing_of_the_next(d: Daemon) -> None:
    first, run_id = _started(d)
    d.ask(protocol.KillRequest(target="k", by="key", signal="TERM"))
    d.core.run_exited(run_id, 143)
    d.loop.run_soon()
    second, next_id = _started(d)
    d.core.run_exited(next_id, 143)  # its own doing: nobody sent it anything
    d.loop.run_soon()
    assert (first.last().outcome, second.last().outcome) == (states.KILLED, states.EXITED)


def test_a_run_whose_process_is_not_started_yet_is_starting(d: Daemon) -> None:
    """A decided run waits for its process (the spawner, the runs at once, a commit): status
    says `starting`, in --json (``running.state``) and on a pipe; then `running`."""
    d.runs.spawn = False
    _started(d)
    [row] = d.status()
    assert row.running is not None and row.running.state == states.STARTING
    assert render.status_text(protocol.StatusReply(keys=[row])).split("\t")[0] == "starting"
    shown = json.loads(render.status_json(protocol.StatusReply(keys=[row])))
    assert shown["keys"][0]["running"]["state"] == "starting"
    d.runs.started[0].invocation.payload.pid = 4242  # its process exists (runs.py sets it)
    [row] = d.status()
    assert row.running is not None and row.running.state == states.RUNNING
    assert render.status_text(protocol.StatusReply(keys=[row])).split("\t")[0] == "running"


def _debounce(world: World, *args: str) -> str:
    proc = world.run(*args)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_history_says_killed_after_kill_signal(world: World) -> None:
    """End to end: `debounce kill --signal INT` ends `sleep`; history and wait say killed."""
    _debounce(world, "run", "--no-wait", "--key", "k", "--delay", "0", "--", "sleep", "60")
    wait_until(lambda: "running\tk\t" in _debounce(world, "status"))
    _debounce(world, "kill", "--signal", "INT", "--key", "k")
    waited = world.run("wait", "--json", "--key", "k")
    assert waited.returncode == 130, waited.stderr
    assert json.loads(waited.stdout)["outcome"] == "killed"
    [row] = [json.loads(line) for line in _debounce(world, "history", "--json").splitlines()]
    assert (row["exit_code"], row["outcome"]) == (130, "killed")


def test_runs_waiting_for_their_process_show_as_starting(world: World) -> None:
    """With 64 descriptors the daemon executes 8 runs at once; the rest wait to be spawned
    and show as `starting` until a place frees, then `running`."""
    marks = world.work / "marks"
    marks.mkdir()
    daemon = world.popen("daemon", "--idle-exit", "0", preexec_fn=lambda: _low_fd_limit(64))
    wait_until(lambda: os.path.exists(world.socket))
    for n in range(10):
        _debounce(world, "run", "--no-wait", "--key", f"k{n}", "--delay", "0", "--", "sh", "-c",
                  f"touch {marks}/{n}; exec sleep 60")
    wait_until(lambda: len(os.listdir(marks)) == 8)
    wait_until(lambda: sorted(_states(world)) == ["running"] * 8 + ["starting"] * 2)
    _debounce(world, "kill", "--key", _running_keys(world)[0])
    wait_until(lambda: len(os.listdir(marks)) == 9)
    wait_until(lambda: sorted(_states(world)) == ["running"] * 8 + ["starting"])
    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(timeout=60) == 0


def _low_fd_limit(limit: int) -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))


def _states(world: World) -> list[str]:
    return [line.split("\t")[0] for line in _debounce(world, "status").splitlines()]


def _running_keys(world: World) -> list[str]:
    return [line.split("\t")[1] for line in _debounce(world, "status").splitlines()
            if line.startswith("running")]
