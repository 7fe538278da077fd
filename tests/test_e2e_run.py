"""End-to-end tests of ``debounce run`` and the control commands, against a real daemon.

Every test drives the real CLI as subprocesses in an isolated world (see conftest.py) and
observes what ran through files the commands write into ``world.work``. Waiting is always on a
condition with a deadline (``wait_until``); sleeps only space submissions out in time.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from conftest import lines, status, wait_until

# ----------------------------------------------------------------------------- helpers


def pending_coalesced(world, key: str) -> int:
    """How many invocations the pending one of ``key`` stands for (0: nothing pending)."""
    for row in status(world)["keys"]:
        if row["key"] == key and row.get("pending"):
            return row["pending"]["coalesced"]
    return 0


def start_daemon(world) -> int:
    """Make sure the world's daemon is up (so timings below exclude its start-up)."""
    return status(world)["pid"]


def submit_in_order(world, key: str, calls: list[tuple[list[str], dict]]) -> list:
    """Start one background ``debounce run`` per call, each accepted before the next starts
    (their delay must outlast a client's start and a ``status``: 2 s holds on a busy machine).

    ``calls`` holds (args, popen keyword arguments); all must use ``--key key``. Ordering is
    established by waiting until ``status`` shows the pending invocation standing for one more
    caller, so "the last caller" is well defined.
    """
    procs = []
    for i, (args, kw) in enumerate(calls, start=1):
        procs.append(world.popen("run", *args, **kw))
        wait_until(lambda i=i: pending_coalesced(world, key) >= i, timeout=10)
    return procs


def finish(proc: subprocess.Popen, timeout: float = 15) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def daemon_processes(socket_path: str) -> list[int]:
    """Pids of live ``debounce daemon`` processes whose command line names ``socket_path``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            with open(f"/proc/{entry}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue
        if state == b"Z":
            continue
        if b"debounce_cli" in argv and b"daemon" in argv and socket_path.encode() in argv:
            found.append(int(entry))
    return found


# ----------------------------------------------------------------------------- coalescing


@pytest.mark.smoke
def test_callers_coalesce_into_one_run_of_the_last_argv(world):
    log = world.work / "runs.log"
    script = f'echo "$1" >> {log}; exit 7'
    calls = [
        (["--delay", "2s", "--key", "k", "--json", "--", "sh", "-c", script, "sh", f"call{i}"], {})
        for i in (1, 2, 3)
    ]
    start_daemon(world)
    procs = submit_in_order(world, "k", calls)
    results = [finish(p) for p in procs]

    assert [code for code, _, _ in results] == [7, 7, 7], [err for _, _, err in results]
    assert lines(log) == ["call3"]  # one run, with the last caller's argv
    objs = [json.loads(out) for _, out, _ in results]
    assert len({o["run_id"] for o in objs}) == 1
    for o in objs:
        assert o["exit_code"] == 7
        assert o["coalesced"] == 3
        assert o["key"] == "k"
        assert o["argv"] == ["sh", "-c", script, "sh", "call3"]
        assert o["started_at"] and o["finished_at"]


@pytest.mark.smoke
def test_output_reaches_every_coalesced_waiter(world):
    script = 'echo "OUT-$1"; echo "ERR-$1" >&2'
    calls = [
        (["--delay", "2s", "--key", "out", "--", "sh", "-c", script, "sh", f"n{i}"], {})
        for i in (1, 2, 3)
    ]
    start_daemon(world)
    procs = submit_in_order(world, "out", calls)
    for proc in procs:
        code, out, err = finish(proc)
        assert code == 0, err
        assert "OUT-n3" in out
        assert "ERR-n3" in err
        assert "ERR-n3" not in out and "OUT-n3" not in err


# ----------------------------------------------------------------------------- exit statuses


@pytest.mark.smoke
def test_command_not_found_exits_127(world):
    proc = world.run("run", "--delay", "100ms", "--", "no-such-command-xyz", "arg")
    assert proc.returncode == 127
    assert "command not found" in proc.stderr
    assert "no-such-command-xyz" in proc.stderr


def test_a_missing_script_by_path_says_no_such_file_as_a_shell_does(world):
    """Issue 19, item 10: ./script.sh that is not there is "No such file or directory", as
    bash says it; a bare name not in PATH stays "command not found"."""
    proc = world.run("run", "--delay", "0", "--", "./no-such-script.sh")
    assert proc.returncode == 127
    assert proc.stderr == "debounce: ./no-such-script.sh: No such file or directory\n"


def test_non_executable_file_exits_126(world):
    script = world.work / "not-exec.sh"
    script.write_text("#!/bin/sh\necho should-not-run\n")
    script.chmod(0o644)
    proc = world.run("run", "--delay", "100ms", "--", str(script))
    assert proc.returncode == 126, proc.stderr
    assert "should-not-run" not in proc.stdout


def test_command_killed_by_signal_exits_128_plus_n(world):
    proc = world.run("run", "--delay", "100ms", "--", "sh", "-c", "kill -TERM $$")
    assert proc.returncode == 143, proc.stderr


# ----------------------------------------------------------------------------- --no-wait


@pytest.mark.smoke
def test_no_wait_returns_at_once_and_the_command_runs_later(world):
    marker = world.work / "ran"
    start_daemon(world)
    began = time.monotonic()
    proc = world.run("run", "--no-wait", "--delay", "1500ms", "--", "touch", str(marker))
    elapsed = time.monotonic() - began
    assert proc.returncode == 0, proc.stderr
    assert elapsed < 1.0, f"--no-wait took {elapsed:.2f}s, the delay is 1.5s"
    assert not marker.exists(), "ran before the delay had passed"
    wait_until(marker.exists, timeout=10)


# ----------------------------------------------------------------------------- environment


def test_cwd_and_environment_of_the_latest_caller_win(world):
    out = world.work / "env.out"
    first, second = world.work / "first", world.work / "second"
    first.mkdir()
    second.mkdir()
    script = (
        f'printf "%s\\n" "$(pwd -P)" "$MYVAR" "$DEBOUNCE_KEY" "$DEBOUNCE_RUN_ID" '
        f'"$DEBOUNCE_COALESCED" > {out}'
    )
    args = ["--delay", "2s", "--key", "envkey", "--json", "--", "sh", "-c", script]
    env1 = dict(world.env, MYVAR="one")
    env2 = dict(world.env, MYVAR="two")
    start_daemon(world)
    procs = submit_in_order(
        world, "envkey", [(args, {"cwd": first, "env": env1}), (args, {"cwd": second, "env": env2})]
    )
    results = [finish(p) for p in procs]
    assert [code for code, _, _ in results] == [0, 0], [err for _, _, err in results]
    run_id = json.loads(results[0][1])["run_id"]
    pwd, var, key, rid, coalesced = out.read_text().splitlines()
    assert pwd == os.path.realpath(second)
    assert var == "two"
    assert key == "envkey"
    assert rid == str(run_id)
    assert coalesced == "2"


# ----------------------------------------------------------------------------- keys


def test_default_key_coalesces_identical_invocations_only(world):
    log = world.work / "runs.log"
    script = f'echo "$1" >> {log}'
    same = ["--delay", "1s", "--json", "--", "sh", "-c", script, "sh", "a"]
    other = ["--delay", "1s", "--json", "--", "sh", "-c", script, "sh", "b"]
    start_daemon(world)
    procs = [world.popen("run", *same), world.popen("run", *same), world.popen("run", *other)]
    results = [finish(p) for p in procs]
    assert [code for code, _, _ in results] == [0, 0, 0], [err for _, _, err in results]
    objs = [json.loads(out) for _, out, _ in results]
    assert objs[0]["run_id"] == objs[1]["run_id"] != objs[2]["run_id"]
    assert objs[0]["coalesced"] == 2
    assert objs[2]["coalesced"] == 1
    assert sorted(lines(log)) == ["a", "b"]


def test_seed_key_template_coalesces_by_first_two_arguments(world):
    log = world.work / "notify.log"
    notify = world.work / "notify"
    notify.write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    notify.chmod(0o755)
    template = "#{1}:#{2}"
    base = ["--delay", "2s", "--key", template, "--json", "--", str(notify)]
    start_daemon(world)
    a, b = submit_in_order(world, "#1:#2",
                           [([*base, "1", "2", "a"], {}), ([*base, "1", "2", "b"], {})])
    c = world.popen("run", *base, "1", "3", "a")
    results = [finish(p) for p in (a, b, c)]
    assert [code for code, _, _ in results] == [0, 0, 0], [err for _, _, err in results]
    objs = [json.loads(out) for _, out, _ in results]
    assert objs[0]["key"] == objs[1]["key"] == "#1:#2"
    assert objs[2]["key"] == "#1:#3"
    assert objs[0]["run_id"] == objs[1]["run_id"] != objs[2]["run_id"]
    assert sorted(lines(log)) == ["1 2 b", "1 3 a"]


# ----------------------------------------------------------------------------- bad input

LONG_SOCKET = "/tmp/" + "x" * 120 + "/daemon.sock"

BAD_INPUT = {
    "bad-duration": (["run", "--delay", "1x", "--", "true"], "1x"),
    "attribute-field": (["run", "--key", "{0.__class__}", "--", "true"], "{0.__class__}"),
    "env-attribute-field": (["run", "--key", "{env.__dict__}", "--", "true"], "{env.__dict__}"),
    "missing-argument": (["run", "--key", "{9}", "--", "echo", "a", "b"], "{9}"),
    "unknown-field": (["run", "--key", "{nope}", "--", "true"], "{nope}"),
    "missing-command": (["run"], "COMMAND"),
    "no-trailing-alone": (["run", "--no-trailing", "--", "true"], "--leading"),
    "jobs-zero": (["daemon", "--jobs", "0"], "--jobs"),
    "socket-too-long": (["run", "--socket", LONG_SOCKET, "--", "true"], "107"),
}


def assert_one_line_usage_error(proc: subprocess.CompletedProcess, mentions: str) -> None:
    err_lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(err_lines) == 1, proc.stderr
    assert mentions in err_lines[0]
    assert proc.returncode == 2, proc.stderr


@pytest.mark.parametrize("args, mentions", BAD_INPUT.values(), ids=BAD_INPUT.keys())
def test_bad_input_is_one_clear_line_and_exit_2(world, args, mentions):
    proc = world.run(*args, timeout=15)
    assert_one_line_usage_error(proc, mentions)
    assert not (world.work / "ran").exists()
    assert world.daemon_pid() is None  # refused before anything was started


def test_socket_directory_of_another_user_is_refused(world):
    foreign = world.root / "foreign"
    foreign.mkdir(mode=0o700)
    os.chown(foreign, 65534, 65534)
    proc = world.run("run", "--socket", str(foreign / "daemon.sock"), "--", "true", timeout=15)
    assert_one_line_usage_error(proc, str(foreign))
    assert "65534" in proc.stderr
    assert not (foreign / "daemon.sock").exists()


# ----------------------------------------------------------------------------- the daemon


@pytest.mark.smoke
def test_racing_clients_start_exactly_one_daemon(world):
    log = world.work / "race.log"
    procs = [
        world.popen("run", "--delay", "300ms", "--key", f"race{i}", "--",
                    "sh", "-c", f'echo {i} >> {log}')
        for i in range(6)
    ]
    results = [finish(p, timeout=20) for p in procs]
    assert [code for code, _, _ in results] == [0] * 6, [err for _, _, err in results]
    assert sorted(lines(log)) == [str(i) for i in range(6)]
    pid = world.daemon_pid()
    assert pid is not None
    assert status(world)["pid"] == pid
    assert status(world)["pid"] == pid
    assert daemon_processes(world.socket) == [pid]
    # No second daemon was started and turned away by the lock either.
    for name in os.listdir(world.state):
        if name.startswith("daemon-") and name.endswith(".log"):
            assert "already serves" not in (world.state / name).read_text()


def test_stale_socket_file_is_replaced(world):
    os.makedirs(os.path.dirname(world.socket), mode=0o700)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(world.socket)
    stale.close()  # the file stays behind, nobody listens
    assert os.path.lexists(world.socket)
    marker = world.work / "ran"
    proc = world.run("run", "--delay", "100ms", "--", "touch", str(marker), timeout=20)
    assert proc.returncode == 0, proc.stderr
    assert marker.exists()
    assert status(world)["pid"] == world.daemon_pid()


def test_a_file_that_is_not_a_socket_is_left_alone(world):
    """A mistyped --socket pointing at a real file must not delete it."""
    os.makedirs(os.path.dirname(world.socket), mode=0o700)
    Path(world.socket).write_text("my notes")
    proc = world.run("run", "--delay", "100ms", "--", "true", timeout=20)
    assert proc.returncode == 112
    assert "is not a socket" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert Path(world.socket).read_text() == "my notes"


def test_ctrl_c_on_one_waiter_does_not_cancel_the_run_of_another(world):
    log = world.work / "runs.log"
    script = f'echo "$1" >> {log}; exit 5'
    base = ["--delay", "1500ms", "--key", "sig", "--", "sh", "-c", script, "sh"]
    start_daemon(world)
    # A shell that starts pytest in the background leaves SIGINT ignored; a user's terminal
    # does not, so the interrupted client gets the default disposition back.
    default_sigint = {"preexec_fn": lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)}
    other, interrupted = submit_in_order(world, "sig", [([*base, "first"], {}),
                                                         ([*base, "second"], default_sigint)])
    interrupted.send_signal(signal.SIGINT)
    code, _, err = finish(interrupted, timeout=5)
    assert code != 0 and code != 5, err
    assert lines(log) == [], "the interrupted client should stop waiting before the run"
    assert "Traceback" not in err
    code, _, err = finish(other)
    assert code == 5, err
    # The interrupted caller's invocation was the latest: it is the one that ran.
    assert lines(log) == ["second"]


# ----------------------------------------------------------------------------- control commands


@pytest.mark.smoke
def test_cancel_makes_waiters_exit_cancelled_and_nothing_runs(world):
    marker = world.work / "ran"
    args = ["--delay", "30s", "--key", "ck", "--", "touch", str(marker)]
    start_daemon(world)
    procs = submit_in_order(world, "ck", [(args, {}), (args, {})])
    proc = world.run("cancel", "ck")
    assert proc.returncode == 0, proc.stderr
    for p in procs:
        code, _, err = finish(p, timeout=5)
        assert code == 114, err
        assert "cancel" in err
    assert not any(row["key"] == "ck" for row in status(world)["keys"])
    assert not marker.exists()


@pytest.mark.smoke
def test_flush_runs_a_pending_invocation_now(world):
    marker = world.work / "ran"
    start_daemon(world)
    began = time.monotonic()
    (waiter,) = submit_in_order(
        world, "fk", [(["--delay", "30s", "--key", "fk", "--", "sh", "-c",
                        f"touch {marker}; exit 4"], {})]
    )
    assert not marker.exists()
    proc = world.run("flush", "fk")
    assert proc.returncode == 0, proc.stderr
    code, _, err = finish(waiter, timeout=5)
    assert code == 4, err
    assert marker.exists()
    assert time.monotonic() - began < 10


# ----------------------------------------------------------------------------- scheduling options


def test_max_wait_caps_the_deferral_of_a_continuous_burst(world):
    log = world.work / "times.log"
    args = ["--no-wait", "--delay", "400ms", "--max-wait", "1s", "--key", "mw", "--",
            "sh", "-c", f"date +%s.%N >> {log}"]
    start_daemon(world)
    procs = []
    first = time.time()
    while time.time() - first < 2.5:
        procs.append(world.popen("run", *args))
        time.sleep(0.15)
    last = time.time()
    for p in procs:
        code, _, err = finish(p)
        assert code == 0, err
    wait_until(lambda: lines(log), timeout=5)
    first_run = float(lines(log)[0])
    # Without --max-wait nothing would run before the submissions stop (2.5s + 400ms).
    assert first_run - first <= 1.0 + 0.7, (
        f"first run {first_run - first:.2f}s after the burst began")
    assert first_run < last
    wait_until(lambda: len(lines(log)) >= 2, timeout=5)


def test_on_busy_restart_stops_the_running_command_and_replaces_it(world):
    log = world.work / "runs.log"
    pidfile = world.work / "long.pid"
    first_args = ["--on-busy", "restart", "--delay", "100ms", "--key", "rs", "--json", "--",
                  "sh", "-c", f"echo long >> {log}; echo $$ > {pidfile}; exec sleep 30"]
    second_args = ["--on-busy", "restart", "--delay", "100ms", "--key", "rs", "--json", "--",
                   "sh", "-c", f"echo short >> {log}; exit 3"]
    start_daemon(world)
    began = time.monotonic()
    first = world.popen("run", *first_args)
    wait_until(lambda: lines(pidfile), timeout=10)
    long_pid = int(lines(pidfile)[0])
    second = world.popen("run", *second_args)
    (code1, out1, err1), (code2, out2, err2) = finish(first, 10), finish(second, 10)
    assert time.monotonic() - began < 8, "the long run was not stopped"
    assert (code1, code2) == (3, 3), (err1, err2)
    assert lines(log) == ["long", "short"]
    obj1, obj2 = json.loads(out1), json.loads(out2)
    assert obj1["run_id"] == obj2["run_id"]
    assert obj1["argv"][-1].endswith("exit 3")
    assert not alive(long_pid), "the replaced run's process is still running"


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def test_timeout_stops_a_long_run_with_143(world):
    start_daemon(world)
    began = time.monotonic()
    proc = world.run("run", "--timeout", "300ms", "--delay", "100ms", "--", "sleep", "30",
                     timeout=20)
    elapsed = time.monotonic() - began
    assert proc.returncode == 143, proc.stderr
    assert elapsed < 3, f"took {elapsed:.2f}s"
