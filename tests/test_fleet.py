"""Fleet mode end to end: a real redis-server and three daemons standing for three hosts
(their own sockets, state directories and host ids), driven through the real CLI.

Commands write a line per run into a file all "hosts" share, so a test counts runs fleet-wide.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from conftest import wait_until
from fleet_support import LEASE, LEASE_S, Fleet, Host, Redis, finish, runs_in, settle

#: A real redis-server and real daemons: the full run only (the fleet's logic is on fake time
#: in test_fleet_sim.py, which the quick tier runs).
pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]


@pytest.fixture
def redis():
    root = Path(tempfile.mkdtemp(prefix="dbr-", dir="/tmp"))
    server = Redis(root, aof=True)
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def fleet(redis):
    f = Fleet(redis)
    try:
        yield f
    finally:
        f.cleanup()


def record(path: Path, exit_code: int = 0, extra: str = "") -> list[str]:
    """A command that notes its run (host, run id, argument) in ``path`` and exits."""
    return ["sh", "-c", f'{extra}echo "$DEBOUNCE_HOST $DEBOUNCE_RUN_ID $1" >> {path}; '
            f'echo "out $DEBOUNCE_HOST $1"; exit {exit_code}', "sh"]


def submit_in_order(fleet: Fleet, key: str, calls: list[tuple[int, list[str]]]) -> list:
    """One waiting ``debounce run --fleet`` per (host index, args), each in the store before
    the next starts, so "the latest invocation" is well defined."""
    procs = []
    for i, (host, args) in enumerate(calls, start=1):
        procs.append(fleet.hosts[host].popen("run", "--fleet", "--key", key, *args))
        wait_until(lambda i=i: fleet.coalesced(key) >= i, timeout=15)
    return procs


def test_one_run_fleet_wide_on_the_latest_host_and_every_waiter_gets_it(fleet):
    out = fleet.hosts[0].work / "runs.txt"
    calls = [(h, ["--delay", "1s", "--", *record(out, 7), f"from-{h}"]) for h in (0, 1, 2, 1)]
    procs = submit_in_order(fleet, "deploy", calls)
    results = [finish(p) for p in procs]
    # The latest invocation (host b's second) won: its argv, on its host, once fleet-wide.
    assert runs_in(out) == [runs_in(out)[0]] and runs_in(out)[0].startswith("b ")
    assert runs_in(out)[0].endswith(" from-1")
    for code, stdout, stderr in results:
        assert code == 7, stderr
        assert stdout == "out b from-1\n"
    history = fleet.hosts[2].fleet_history()
    assert len(history) == 1
    assert history[0]["host"] == "b" and history[0]["coalesced"] == 4
    assert history[0]["exit_code"] == 7 and history[0]["key"] == "deploy"


def test_status_shows_the_fleet_key_with_its_host_on_every_host(fleet):
    proc = fleet.hosts[2].popen("run", "--fleet", "--no-wait", "--key", "k", "--delay", "30s",
                                "--", "true")
    assert finish(proc)[0] == 0
    for host in fleet.hosts:
        rows = host.fleet_status()
        assert [(r["key"], r["host"], r["pending"]["coalesced"]) for r in rows] == [("k", "c", 1)]
    # Plain status shows it on the host that holds the invocation (with its host), and on
    # no other (issue 19, item 6).
    mine = json.loads(fleet.hosts[2].run("status", "--json").stdout)["keys"]
    assert [(r["key"], r.get("host")) for r in mine] == [("k", "c")]
    assert json.loads(fleet.hosts[0].run("status", "--json").stdout)["keys"] == []
    cancel = fleet.hosts[0].run("cancel", "k")
    assert cancel.returncode == 0, cancel.stderr
    assert fleet.hosts[1].fleet_status() == []


def test_fleet_waiters_on_other_hosts_hear_a_cancel(fleet):
    procs = submit_in_order(fleet, "c", [(0, ["--delay", "30s", "--", "true"]),
                                         (1, ["--delay", "30s", "--", "true"])])
    assert fleet.hosts[2].run("cancel", "c").returncode == 0
    for proc in procs:
        code, _, err = finish(proc)
        assert code == 114, err


def test_flush_and_wait_from_another_host(fleet):
    out = fleet.hosts[0].work / "runs.txt"
    proc = fleet.hosts[0].popen("run", "--fleet", "--key", "f", "--delay", "60s", "--",
                                *record(out), "x")
    wait_until(lambda: fleet.coalesced("f") == 1, timeout=15)
    waiter = fleet.hosts[2].popen("wait", "f")
    time.sleep(0.3)  # the waiter files itself (it is not what the assertions wait on)
    assert fleet.hosts[1].run("flush", "f").returncode == 0
    assert finish(proc)[0] == 0
    code, _, err = finish(waiter)
    assert code == 0, err
    assert runs_in(out) and runs_in(out)[0].startswith("a ")


def test_fleet_without_a_store_is_a_usage_error_naming_the_variable(world):
    proc = world.run("run", "--fleet", "--", "true")
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "DEBOUNCE_STORE" in proc.stderr


def test_unreachable_store_refuses_fleet_keys_and_keeps_local_ones(world):
    from fleet_support import free_port

    world.env["DEBOUNCE_STORE"] = f"redis://127.0.0.1:{free_port()}/0"
    proc = world.run("run", "--fleet", "--delay", "0", "--", "true")
    assert proc.returncode == 116
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "redis://127.0.0.1:" in proc.stderr and "cannot be reached" in proc.stderr
    local = world.run("run", "--delay", "0", "--", "echo", "local")
    assert (local.returncode, local.stdout) == (0, "local\n")


def test_a_host_killed_before_its_run_is_taken_over_once(fleet):
    out = fleet.hosts[0].work / "runs.txt"
    procs = submit_in_order(fleet, "t", [(1, ["--delay", "1s", "--", *record(out, 3), "b"]),
                                         (0, ["--delay", "1s", "--", *record(out, 3), "a"])])
    fleet.hosts[0].kill9()  # the host of the latest invocation dies before it is due
    code, stdout, err = finish(procs[0])
    assert code == 3, err
    assert stdout.startswith("out ") and stdout.endswith(" a\n")  # the latest argv won
    settle(LEASE_S + 0.5)  # a lease and more: nobody else runs it again
    lines = runs_in(out)
    assert len(lines) == 1 and lines[0].split()[0] in ("b", "c")
    assert fleet.hosts[1].fleet_history()[0]["host"] == lines[0].split()[0]


def test_a_host_killed_during_its_run_reports_it_lost_and_it_never_runs_twice(fleet):
    out = fleet.hosts[0].work / "runs.txt"
    command = ["sh", "-c", f'echo "$DEBOUNCE_HOST" >> {out}; sleep 30']
    procs = submit_in_order(fleet, "l", [(1, ["--delay", "1.5s", "--", *command]),
                                         (0, ["--delay", "1.5s", "--", *command])])
    wait_until(lambda: runs_in(out), timeout=15)
    fleet.hosts[0].kill9()
    code, _, err = finish(procs[0])
    assert code == 113, err
    assert "lost" in err
    settle(LEASE_S + 0.5)
    assert runs_in(out) == ["a"]
    history = fleet.hosts[2].fleet_history()
    assert [(r["outcome"], r["host"]) for r in history] == [("lost", "a")]


def test_a_frozen_host_does_not_run_what_another_took_over(fleet):
    out = fleet.hosts[0].work / "runs.txt"
    procs = submit_in_order(fleet, "z", [(1, ["--delay", "1.5s", "--", *record(out), "b"]),
                                         (0, ["--delay", "1.5s", "--", *record(out), "a"])])
    assert fleet.hosts[0].daemon is not None
    os.kill(fleet.hosts[0].daemon.pid, signal.SIGSTOP)
    try:
        code, _, err = finish(procs[0])
        assert code == 0, err
    finally:
        os.kill(fleet.hosts[0].daemon.pid, signal.SIGCONT)
    settle(LEASE_S)  # host a is back, its timer long past due: it must not run "z" as well
    lines = runs_in(out)
    assert len(lines) == 1 and lines[0].split()[0] != "a" and lines[0].endswith(" a")


def test_skewed_host_clocks_do_not_move_due_times(redis):
    fleet = Fleet(redis, extra={"a": ("--clock-skew", "3600"), "b": ("--clock-skew", "-3600")})
    try:
        out = fleet.hosts[0].work / "runs.txt"
        command = ["sh", "-c", f'date +%s.%N >> {out}']
        for skewed in (0, 1):  # an hour ahead, an hour behind
            before = time.time()
            proc = fleet.hosts[skewed].popen("run", "--fleet", "--delay", "1s", "--key",
                                             f"s{skewed}", "--", *command)
            assert finish(proc)[0] == 0
            started = float(runs_in(out)[-1])
            assert 0.9 <= started - before < 4.0, started - before
        for row in fleet.hosts[2].fleet_history():
            assert abs(row_time(row["started_at"]) - time.time()) < 60  # the store's clock
    finally:
        fleet.cleanup()


def row_time(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def test_fifty_waiters_spread_over_the_hosts_all_get_the_run(fleet):
    out = fleet.hosts[0].work / "runs.txt"
    procs = []
    for i in range(50):
        host = fleet.hosts[i % 3]
        procs.append(host.popen("run", "--fleet", "--key", "fifty", "--delay", "2s", "--",
                                *record(out, 5), f"n{i}"))
    results = [finish(p, timeout=60) for p in procs]
    assert len(runs_in(out)) == 1
    winner = runs_in(out)[0].split()[-1]
    for code, stdout, err in results:
        assert code == 5, err
        assert stdout.endswith(f" {winner}\n")
    assert fleet.hosts[1].fleet_history()[0]["coalesced"] == 50


def test_redis_restart_in_the_middle_of_a_burst(fleet, redis):
    out = fleet.hosts[0].work / "runs.txt"
    first = submit_in_order(fleet, "r", [(0, ["--delay", "2s", "--", *record(out), "a"]),
                                         (1, ["--delay", "2s", "--", *record(out), "b"])])
    redis.stop()
    refused = fleet.hosts[2].run("run", "--fleet", "--key", "r", "--delay", "2s", "--", "true")
    assert refused.returncode == 116, refused.stderr
    redis.start()
    later = fleet.hosts[2].popen("run", "--fleet", "--key", "r", "--delay", "2s", "--",
                                 *record(out), "c")
    results = [finish(p, timeout=60) for p in (*first, later)]
    for code, stdout, err in results:
        assert code == 0, err
        assert stdout == "out c c\n"
    settle(1.5)
    assert runs_in(out) == [runs_in(out)[0]] and runs_in(out)[0].startswith("c ")


def test_on_busy_restart_across_hosts(fleet):
    out = fleet.hosts[0].work / "runs.txt"
    long = ["sh", "-c", f'echo "$DEBOUNCE_HOST start" >> {out}; sleep 30']
    first = fleet.hosts[0].popen("run", "--fleet", "--key", "rs", "--delay", "0",
                                 "--on-busy", "restart", "--", *long)
    wait_until(lambda: runs_in(out), timeout=15)
    second = fleet.hosts[1].popen("run", "--fleet", "--key", "rs", "--delay", "0",
                                  "--on-busy", "restart", "--", *record(out, 4), "second")
    for proc in (first, second):
        code, stdout, err = finish(proc)
        assert code == 4, err
        assert stdout.endswith("out b second\n")
    outcomes = [r["outcome"] for r in fleet.hosts[2].fleet_history()]
    assert outcomes == ["exited", "restarted"]


def test_fleet_kill_from_another_host(fleet):
    proc = fleet.hosts[0].popen("run", "--fleet", "--key", "k9", "--delay", "0", "--",
                                "sleep", "30")
    wait_until(lambda: any(r.get("running") for r in fleet.hosts[1].fleet_status()),
               timeout=15)
    killed = fleet.hosts[2].run("kill", "k9")
    assert killed.returncode == 0, killed.stderr
    code, _, err = finish(proc)
    assert code == 143, err
    assert fleet.hosts[1].fleet_history()[0]["outcome"] == "killed"


def test_a_store_restarted_empty_loses_no_accepted_invocation(tmp_path):
    root = Path(tempfile.mkdtemp(prefix="dbr-", dir="/tmp"))
    redis = Redis(root, aof=False)  # no persistence at all: a restart empties it
    fleet = Fleet(redis)
    try:
        out = fleet.hosts[0].work / "runs.txt"
        procs = submit_in_order(fleet, "e", [(0, ["--delay", "3s", "--", *record(out), "a"]),
                                             (1, ["--delay", "3s", "--", *record(out), "b"])])
        asked = fleet.hosts[2].store_calls("now")
        waiter = fleet.hosts[2].popen("wait", "e")
        # Filed in the same step as its host's read of the store's clock (only `wait` and
        # `status --fleet` read it). A waiter arriving while the store is down is refused
        # (116): a fixed 0.3 s was not always enough on a loaded machine.
        wait_until(lambda: fleet.hosts[2].store_calls("now") > asked, timeout=15)
        redis.stop()
        redis.start()
        results = [finish(p, timeout=60) for p in (*procs, waiter)]
        for code, stdout, err in results:
            assert code == 0, err
            assert stdout.startswith("out ")
        assert len({stdout for _, stdout, _ in results}) == 1
        settle(1.0)
        assert len(runs_in(out)) == 1
        assert "lost data" in fleet.hosts[0].log() + fleet.hosts[1].log()
    finally:
        fleet.cleanup()
        redis.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_joining_a_running_fleet_run_replays_its_output_so_far(fleet):
    marker = fleet.hosts[0].work / "first-printed"
    command = ["sh", "-c", f"echo first; touch {marker}; sleep 1; echo second; exit 6"]
    first = fleet.hosts[0].popen("run", "--fleet", "--key", "j", "--delay", "0",
                                 "--on-busy", "ignore", "--", *command)
    wait_until(marker.exists, timeout=15)
    time.sleep(0.2)  # "first" is in the store by now (it was printed before the marker)
    joiner = fleet.hosts[1].popen("run", "--fleet", "--key", "j", "--delay", "0",
                                  "--on-busy", "ignore", "--", "true")
    for proc in (first, joiner):
        code, stdout, err = finish(proc)
        assert (code, stdout) == (6, "first\nsecond\n"), err
    logs = fleet.hosts[2].run("logs", "j")
    assert (logs.returncode, logs.stdout) == (0, "first\nsecond\n"), logs.stderr


def test_a_stdin_line_with_fleet_true_joins_the_fleet_key(fleet):
    out = fleet.hosts[0].work / "runs.txt"
    feeder = fleet.hosts[2].popen("daemon", "--stdin", "--lease", LEASE, "--idle-exit", "0",
                                  stdin=subprocess.PIPE)
    line = json.dumps({"argv": [*record(out, 0), "stdin"], "key": "sd", "fleet": True,
                       "delay": 1.0})
    assert feeder.stdin is not None
    feeder.stdin.write(line + "\n")
    feeder.stdin.flush()
    wait_until(lambda: fleet.coalesced("sd") == 1, timeout=15)
    waiter = fleet.hosts[0].popen("run", "--fleet", "--key", "sd", "--delay", "1s", "--",
                                  *record(out, 0), "socket")
    feeder.stdin.close()
    feeder.stdin = None  # end of input: the daemon exits once its lines have run
    code, stdout, err = finish(waiter)
    assert (code, stdout) == (0, "out a socket\n"), err
    code, stdout, err = finish(feeder)
    assert code == 0, err
    assert stdout == "out a socket\n"  # the stdin daemon's line was coalesced into it
    assert len(runs_in(out)) == 1


def test_a_run_in_flight_reports_once_the_store_is_back(redis):
    """A store outage shorter than half a lease (here 6 s): the run goes on, and its end
    reaches every waiter once the store is back."""
    fleet = Fleet(redis, extra={h: ("--lease", "6s") for h in "abc"})
    try:
        marker = fleet.hosts[0].work / "started"
        go = fleet.hosts[0].work / "go"
        ended = fleet.hosts[0].work / "ended"
        command = ["sh", "-c", f"touch {marker}; echo begun; "
                               f"while [ ! -e {go} ]; do sleep 0.05; done; echo done; "
                               f"touch {ended}; exit 5"]
        runner = fleet.hosts[0].popen("run", "--fleet", "--key", "inflight", "--delay", "0",
                                      "--", *command)
        wait_until(marker.exists, timeout=15)
        followed = fleet.hosts[1].work / "waiter.out"
        with open(followed, "w") as out:
            waiter = fleet.hosts[1].popen("wait", "inflight", stdout=out)
        # It follows the run once it has the output so far (waiting a fixed 0.3 s instead
        # failed on a loaded machine: the waiter came after the store had gone, 116).
        wait_until(lambda: "begun" in followed.read_text(), timeout=15)
        redis.stop()
        go.touch()  # the run ends while the store is down (well within the lease's guard)
        wait_until(ended.exists, timeout=15)
        assert runner.poll() is None and waiter.poll() is None
        redis.start()
        code, stdout, err = finish(runner)
        assert (code, stdout) == (5, "begun\ndone\n"), err + "".join(
            h.log() for h in fleet.hosts)
        code, _, err = finish(waiter)
        assert (code, followed.read_text()) == (5, "begun\ndone\n"), err + "".join(
            h.log() for h in fleet.hosts)
        history = fleet.hosts[2].fleet_history()
        assert [(r["exit_code"], r["outcome"]) for r in history] == [(5, "exited")]
    finally:
        fleet.cleanup()


def test_a_store_outage_past_half_a_lease_stops_the_run_its_host_cannot_vouch_for(fleet, redis):
    """Issue 18, item 4 (safety over liveness): the store is gone for longer than half a lease
    while a run executes; its host stops it before anyone else could take the key over, and
    once the store is back its caller learns it was lost (113); the command never finished."""
    done = fleet.hosts[0].work / "done"
    runner = fleet.hosts[0].popen("run", "--fleet", "--key", "cut", "--delay", "0", "--",
                                  "sh", "-c", f"sleep 6; touch {done}")
    wait_until(lambda: "cut" in fleet.hosts[0].run("status", "--fleet").stdout, timeout=15)
    redis.stop()
    wait_until(lambda: "could not renew its lease" in fleet.hosts[0].log(), timeout=15)
    redis.start()
    code, _, err = finish(runner)
    assert code == 113, err
    assert not done.exists()
    history = fleet.hosts[1].fleet_history("cut")
    assert [r["outcome"] for r in history] == ["lost"]


def test_watch_fleet_submits_to_the_fleet_and_ctrl_c_cancels_what_it_left(fleet):
    watched = fleet.hosts[0].work / "src"
    watched.mkdir()
    watcher = fleet.hosts[0].popen("watch", "--fleet", "--delay", "30s", "--key", "w",
                                   str(watched), "--", "true")
    wait_until(lambda: "watching" in (watcher.stderr.readline() if watcher.stderr else ""),
               timeout=15)
    (watched / "a.txt").write_text("x")
    wait_until(lambda: fleet.coalesced("w") >= 1, timeout=15)
    assert [r["host"] for r in fleet.hosts[1].fleet_status()] == ["a"]
    watcher.send_signal(signal.SIGINT)
    code, _, err = finish(watcher)
    assert code == 130, err
    assert "cancelled what was pending for w" in err
    assert fleet.hosts[2].fleet_status() == []


def test_a_stdin_daemon_whose_input_ends_at_once_still_runs_its_fleet_line(fleet):
    out = fleet.hosts[0].work / "runs.txt"
    line = json.dumps({"argv": [*record(out, 0), "stdin"], "key": "eof", "fleet": True,
                       "delay": 0.3})
    proc = fleet.hosts[1].popen("daemon", "--stdin", "--lease", LEASE, "--idle-exit", "0",
                                stdin=subprocess.PIPE)
    out_text, err_text = proc.communicate(line + "\n", timeout=30)
    assert proc.returncode == 0, err_text
    assert out_text == "out b stdin\n"
    assert runs_in(out) == [runs_in(out)[0]] and runs_in(out)[0].startswith("b ")


def test_an_idle_key_leaves_nothing_behind_for_ever(fleet, redis):
    import redis as redis_py

    proc = fleet.hosts[0].popen("run", "--fleet", "--key", "ttl", "--delay", "0", "--", "true")
    assert finish(proc)[0] == 0
    client = redis_py.Redis(port=redis.port)
    try:
        names = [n.decode() for n in client.keys("debounce:{*}:*")
                 if not n.startswith(b"debounce:{fleet}:")]  # the fleet's own keys stay
        assert sorted(n.rsplit(":", 1)[1] for n in names) == ["events", "state"]
        for name in names:
            assert 0 < client.ttl(name) <= 7 * 24 * 3600, name  # kept a week, then gone
    finally:
        client.close()


def test_fleet_runs_take_the_hosts_job_slots_and_a_queued_one_keeps_its_place(redis):
    fleet = Fleet(redis, extra={"a": ("--jobs", "1")})
    try:
        a = fleet.hosts[0]
        out = a.work / "runs.txt"
        marker = a.work / "blocking"
        blocker = a.popen("run", "--delay", "0", "--", "sh", "-c", f"touch {marker}; sleep 2")
        wait_until(marker.exists, timeout=15)
        started = time.monotonic()
        first = a.popen("run", "--fleet", "--key", "q", "--delay", "0", "--",
                        *record(out), "first")
        wait_until(lambda: [r["pending"]["state"] for r in a.fleet_status()
                            if r.get("pending")] == ["queued"], timeout=15)
        assert not runs_in(out)  # the one job slot is the local run's
        # A later invocation replaces the queued one and keeps its place: it does not wait
        # through its 10 s delay, it runs as soon as the slot is free.
        second = a.popen("run", "--fleet", "--key", "q", "--delay", "10s", "--",
                         *record(out), "second")
        for proc in (first, second):
            code, stdout, err = finish(proc)
            assert (code, stdout) == (0, "out a second\n"), err
        assert time.monotonic() - started < 8.0
        assert finish(blocker)[0] == 0
        assert len(runs_in(out)) == 1
    finally:
        fleet.cleanup()


def test_collect_across_hosts_runs_once_with_every_hosts_argument(fleet):
    out = fleet.hosts[0].work / "collected"
    script = f'printf "%s\\n" "$@" > {out}; wc -l < "$DEBOUNCE_BATCH" >> {out}'
    calls = [(h, ["--delay", "1s", "--collect", "--", "sh", "-c", script, "sh", name])
             for h, name in ((0, "a.js"), (1, "b.js"), (2, "a.js"), (1, "c.js"))]
    procs = submit_in_order(fleet, "fmt", calls)
    for proc in procs:
        code, _, err = finish(proc)
        assert code == 0, err
    assert runs_in(out) == ["a.js", "b.js", "c.js", "4"]
    (run,) = fleet.hosts[0].fleet_history()
    assert run["host"] == "b" and run["coalesced"] == 4


def test_run_ids_of_fleet_runs_work_from_any_host(fleet):
    marker = fleet.hosts[0].work / "started"
    proc = fleet.hosts[0].popen("run", "--fleet", "--key", "byid", "--delay", "0", "--", "sh",
                                "-c", f"echo hello; touch {marker}; sleep 30")
    wait_until(marker.exists, timeout=15)
    (row,) = [r for r in fleet.hosts[1].fleet_status() if r["key"] == "byid"]
    run_id = str(row["running"]["run_id"])
    waiter = fleet.hosts[2].popen("wait", "--run", run_id)
    time.sleep(0.3)  # the waiter files itself (nothing below waits on it)
    killed = fleet.hosts[1].run("kill", "--run", run_id)
    assert killed.returncode == 0, killed.stderr
    assert finish(proc)[0] == 143
    code, stdout, err = finish(waiter)
    assert (code, stdout) == (143, "hello\n"), err
    logs = fleet.hosts[2].run("logs", "--run", run_id)
    assert (logs.returncode, logs.stdout) == (0, "hello\n"), logs.stderr
    finished = fleet.hosts[1].run("wait", "--run", run_id)
    assert finished.returncode == 143, finished.stderr
    missing = fleet.hosts[1].run("wait", "--run", "999999")
    assert missing.returncode == 117, missing.stderr


def test_killing_and_restarting_a_host_mid_burst_runs_every_key_exactly_once(fleet):
    import random

    rng = random.Random(7)
    out = fleet.hosts[0].work / "runs.txt"
    keys = [f"chaos{i}" for i in range(20)]
    waiters = []
    for key in keys:
        for host in rng.sample(range(3), 3):
            command = ["--delay", "1.5s", "--", "sh", "-c", f'echo "{key}" >> {out}']
            if host == 0:  # host a's clients lose their daemon: they do not wait
                proc = fleet.hosts[0].popen("run", "--fleet", "--no-wait", "--key", key,
                                            *command)
                assert finish(proc)[0] == 0
            else:
                waiters.append(fleet.hosts[host].popen("run", "--fleet", "--key", key,
                                                       *command))
    fleet.hosts[0].kill9()  # before anything is due; some keys' latest invocation is a's
    fleet.hosts[0].start()  # the same host comes back (its runs from before are not here)
    for proc in waiters:
        code, _, err = finish(proc, timeout=60)
        assert code == 0, err
    settle(LEASE_S + 0.5)
    ran = runs_in(out)
    assert sorted(ran) == sorted(keys), [k for k in keys if ran.count(k) != 1]


def test_a_redis_cluster_serves_the_fleet():
    from fleet_support import RedisCluster

    root = Path(tempfile.mkdtemp(prefix="dbc-", dir="/tmp"))
    cluster = RedisCluster(root)
    fleet = Fleet(cluster)
    try:
        out = fleet.hosts[0].work / "runs.txt"
        keys = [f"cluster-{i}" for i in range(6)]  # spread over the cluster's slots
        procs = []
        for key in keys:
            procs += submit_in_order(fleet, key, [
                (h, ["--delay", "1.5s", "--", *record(out), key]) for h in (0, 1, 2)])
        for proc in procs:
            code, stdout, err = finish(proc)
            assert code == 0, err
            assert stdout.startswith("out c ")
        assert sorted(line.split()[-1] for line in runs_in(out)) == sorted(keys)
        for host in fleet.hosts:  # a daemon on a cluster starts without a traceback
            assert "Traceback" not in host.log(), host.log()
        history = fleet.hosts[1].fleet_history("--limit", "100")
        assert sorted(row["key"] for row in history) == sorted(keys)
        assert {row["host"] for row in history} == {"c"}
        # A host killed before its run is due: another takes the run over, once.
        (waiter,) = submit_in_order(fleet, "cluster-t", [
            (1, ["--delay", "1s", "--", *record(out), "t"])])
        proc = fleet.hosts[0].popen("run", "--fleet", "--no-wait", "--key", "cluster-t",
                                    "--delay", "1s", "--", *record(out), "t")
        assert finish(proc)[0] == 0
        fleet.hosts[0].kill9()
        code, stdout, err = finish(waiter)
        assert code == 0, err
        settle(LEASE_S + 0.5)
        taken = [line for line in runs_in(out) if line.endswith(" t")]
        assert len(taken) == 1 and taken[0].split()[0] in ("b", "c")
    finally:
        fleet.cleanup()
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_an_auto_started_daemon_takes_the_store_from_the_client_and_unix_urls_work(world):
    root = Path(tempfile.mkdtemp(prefix="dbu-", dir="/tmp"))
    sock = root / "redis.sock"
    from fleet_support import REDIS

    if REDIS is None:
        pytest.skip("redis-server is not installed (.ci/run installs Debian's redis-server)")
    server = subprocess.Popen([REDIS, "--port", "0", "--unixsocket", str(sock),
                               "--unixsocketperm", "700", "--save", "", "--dir", str(root)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(sock.exists, timeout=10)
        world.env["DEBOUNCE_STORE"] = f"unix://{sock}"
        world.env["DEBOUNCE_HOST_ID"] = "solo"
        proc = world.run("run", "--fleet", "--delay", "0", "--key", "u", "--", "sh", "-c",
                         'echo "on $DEBOUNCE_HOST"')
        assert (proc.returncode, proc.stdout) == (0, "on solo\n"), proc.stderr
        rows = world.run("history", "--fleet", "--json")
        assert json.loads(rows.stdout)["host"] == "solo"
    finally:
        server.terminate()
        server.wait(timeout=10)
        shutil.rmtree(root, ignore_errors=True)


def test_a_host_that_just_joined_has_its_first_run_kept_not_recorded_lost(redis):
    """Issue 18, item 1: hosts a and b have judged the fleet for over a lease; host c joins
    and runs a command longer than the peers' scan period. The peers' view of the heartbeats
    predates c, so they took c for silent and recorded its run lost while it ran (the
    client exited 113). A run is lost only when its host has been silent for a lease since
    the run started, as the store's clock says in the transaction that records it."""
    fleet = Fleet(redis, count=2)
    try:
        settle(LEASE_S * 1.5)  # a and b judge other hosts from now on
        root = Path(tempfile.mkdtemp(prefix="dbfc-", dir="/tmp"))
        late = Host(root, "c", redis.url)
        fleet.hosts.append(late)
        late.start()
        proc = late.popen("run", "--fleet", "--key", "kc", "--delay", "200ms", "--",
                          "sh", "-c", f"sleep {LEASE_S * 1.25}; echo done")
        code, out, err = finish(proc)
        assert (code, out) == (0, "done\n"), err
        rows = late.fleet_history("kc")
        assert [(r["host"], r["outcome"], r["exit_code"]) for r in rows] == [("c", "exited", 0)]
        for host in fleet.hosts:
            assert "lost" not in host.log(), host.log()
    finally:
        fleet.cleanup()


def test_logs_follow_a_fleet_run_executing_on_another_host(fleet):
    """Issue 19, item 12: `debounce logs -f` of a fleet run from another host prints its
    output live, from its start, and exits with its status."""
    gate = fleet.hosts[0].work / "gate"
    script = f'echo one; while [ ! -e {gate} ]; do sleep 0.05; done; echo two; exit 6'
    runner = fleet.hosts[0].popen("run", "--fleet", "--key", "fk", "--delay", "0", "--",
                                  "sh", "-c", script)
    wait_until(lambda: any(row["key"] == "fk" and row.get("running")
                           for row in fleet.hosts[1].fleet_status()), timeout=15)
    follower = fleet.hosts[1].popen("logs", "-f", "fk")
    assert follower.stdout is not None
    assert follower.stdout.readline() == "one\n"
    gate.touch()
    out, err = follower.communicate(timeout=30)
    assert (follower.returncode, out) == (6, "two\n"), err
    assert finish(runner)[0] == 6


def test_plain_history_on_the_host_that_ran_a_fleet_run_lists_it(fleet):
    """Issue 19, item 6: plain `history` on the host that ran a fleet run did not list it."""
    proc = fleet.hosts[0].popen("run", "--fleet", "--key", "hk", "--delay", "0", "--", "true")
    assert finish(proc)[0] == 0
    here = fleet.hosts[0].run("history", "--json")
    assert [(json.loads(line)["key"], json.loads(line)["host"])
            for line in here.stdout.splitlines()] == [("hk", "a")]
    elsewhere = fleet.hosts[1].run("history", "--json")
    assert elsewhere.stdout.strip() == ""
