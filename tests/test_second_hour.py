"""What a user checks in the second hour: stop really stops, write errors are reported, keys
that look like run ids, the honest help texts, and Ctrl-C under watch."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from conftest import wait_until


def _running(pid: int) -> bool:
    """Running, as opposed to gone or a zombie waiting for its parent to reap it."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


# ------------------------------------------------------------------------------ 1. stop
@pytest.mark.slow
def test_stop_returns_only_once_the_daemon_process_has_exited(world):
    """`debounce stop` waits for the process, not for its lock: a daemon with much to free
    (20,000 pending invocations) is still exiting well after it let go of the lock."""
    count = 20000
    daemon = world.popen("daemon", "--stdin", "--delay", "1h", "--no-journal",
                         stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    assert daemon.stdin is not None
    daemon.stdin.write("".join(f"echo {i}\n" for i in range(count)))
    daemon.stdin.flush()
    wait_until(lambda: world.daemon_pid() == daemon.pid)

    def pending() -> int:
        r = world.run("status", "--json")
        return r.returncode == 0 and len(json.loads(r.stdout)["keys"]) >= count

    wait_until(pending, timeout=30, interval=0.1)
    r = world.run("stop")
    assert r.returncode == 0, r.stderr
    assert not _running(daemon.pid), "debounce stop returned while the daemon still ran"
    assert not os.path.exists(world.socket)


# ------------------------------------------------------------------------------ 2. write errors
def _cli(world, *args: str, stdout: str) -> subprocess.CompletedProcess:
    """The CLI with its stdout on /dev/full ("full") or closed, as with '>&-' ("closed")."""
    redirect = ">/dev/full" if stdout == "full" else ">&-"
    script = f'exec "$@" {redirect}'
    return subprocess.run(["sh", "-c", script, "sh", *world.argv(*args)], cwd=world.work,
                          env=world.env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=30)


ENOSPC = "No space left on device"
EBADF = "Bad file descriptor"


def test_a_full_stdout_is_one_line_and_exit_1_for_every_command(world):
    """> /dev/full: 'debounce: write error: ...' and exit 1, never a traceback or a lost
    output passed off as success; a waiting run also says what the run's own status was."""
    r = world.run("run", "--delay", "0", "--key", "w", "--", "sh", "-c", "echo out; exit 3")
    assert r.returncode == 3 and r.stdout == "out\n"
    for args in (("completion", "bash"), ("history",), ("--help",),
                 ("run", "--help"), ("logs", "--run", "1"), ("logs", "w"),
                 ("history", "--json")):
        r = _cli(world, *args, stdout="full")
        assert (r.returncode, r.stderr) == (1, f"debounce: write error: {ENOSPC}\n"), args
    world.run("run", "--no-wait", "--key", "p", "--delay", "1h", "--", "true")
    for args in (("status",), ("status", "--json")):
        r = _cli(world, *args, stdout="full")
        assert (r.returncode, r.stderr) == (1, f"debounce: write error: {ENOSPC}\n"), args
    r = _cli(world, "run", "--delay", "0", "--key", "w", "--", "sh", "-c", "echo out; exit 3",
             stdout="full")
    assert r.returncode == 1
    assert r.stderr == f"debounce: write error: {ENOSPC}; run 2 exited 3\n"
    r = _cli(world, "run", "--delay", "0", "--json", "--", "true", stdout="full")
    assert r.returncode == 1 and r.stderr.startswith(f"debounce: write error: {ENOSPC}; run ")


def test_a_closed_stdout_is_a_write_error_unless_nothing_is_written(world):
    """'>&-': the same one line (Bad file descriptor) and exit 1 when there is output to
    write; a command that writes nothing to stdout still succeeds."""
    r = world.run("run", "--delay", "0", "--key", "c", "--", "echo", "out")
    assert r.returncode == 0
    for args in (("completion", "bash"), ("logs", "--run", "1"), ("history",), ("--help",),
                 ("--version",), ("history", "--json")):
        r = _cli(world, *args, stdout="closed")
        assert (r.returncode, r.stderr) == (1, f"debounce: write error: {EBADF}\n"), args
    r = _cli(world, "run", "--delay", "0", "--", "echo", "again", stdout="closed")
    assert (r.returncode, r.stderr) == (1, f"debounce: write error: {EBADF}; run 2 exited 0\n")
    r = _cli(world, "run", "--delay", "0", "--", "sh", "-c", "echo to stderr >&2", stdout="closed")
    assert (r.returncode, r.stderr) == (0, "to stderr\n")


def test_a_reader_that_goes_away_is_no_error(world):
    """`| head -1` stays quiet: a run exits with its own status, history with 0."""
    pipeline = '"$@" | head -1'
    r = subprocess.run(["bash", "-c", f"set -o pipefail; {pipeline}", "sh",
                        *world.argv("run", "--delay", "0", "--", "seq", "200000")],
                       cwd=world.work, env=world.env, capture_output=True, text=True,
                       timeout=60)
    assert (r.returncode, r.stdout, r.stderr) == (0, "1\n", "")


# ------------------------------------------------------------------------------ 3. digit keys
def _watch(world, *args: str):
    """``debounce watch ARGS`` in the background (stdout to a file), once it is watching."""
    out = world.root / f"watch-{len(world.procs)}.out"
    err = world.root / f"watch-{len(world.procs)}.err"
    with out.open("w") as o, err.open("w") as e:
        proc = world.popen("watch", *args, stdout=o, stderr=e)
    wait_until(lambda: "watching" in err.read_text() or proc.poll() is not None, timeout=15)
    assert proc.poll() is None, err.read_text()
    return proc, out, err


def _keys(world) -> dict:
    r = world.run("status", "--json")
    assert r.returncode == 0, r.stderr
    return {k["key"]: k for k in json.loads(r.stdout)["keys"]}


def test_watch_with_a_key_of_digits_prints_its_runs(world):
    """`watch --key 3` once a run 3 exists: the watcher follows key 3, not run 3 (which the
    daemon would refuse as ambiguous), so the runs' output is printed."""
    import signal

    for _ in range(3):
        assert world.run("run", "--delay", "0", "--", "true").returncode == 0
    src = world.work / "src"
    src.mkdir()
    proc, out, err = _watch(world, "--key", "3", "--delay", "100ms", "src", "--",
                            "sh", "-c", 'echo "built by run $DEBOUNCE_RUN_ID"')
    (src / "a").write_text("a")
    wait_until(lambda: "built by run 4" in out.read_text(), timeout=15)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=15) == 130, err.read_text()


def test_ctrl_c_on_watch_cancels_a_key_of_digits(world):
    """Ctrl-C cancels what the watcher left pending for key 3, though a run 3 exists."""
    import signal

    for _ in range(3):
        assert world.run("run", "--delay", "0", "--", "true").returncode == 0
    src = world.work / "src"
    src.mkdir()
    proc, _out, err = _watch(world, "--key", "3", "--delay", "1h", "src", "--", "true")
    (src / "b").write_text("b")
    wait_until(lambda: (_keys(world).get("3") or {}).get("pending"))
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=15) == 130, err.read_text()
    assert "cancelled what was pending for 3" in err.read_text()
    assert not (_keys(world).get("3") or {}).get("pending")


@pytest.mark.slow
def test_the_reattach_hint_says_key_for_a_key_of_digits(world):
    """A client that lost its daemon names `debounce wait --key 2`, not `debounce wait 2`
    (which would mean run 2, or be refused as ambiguous)."""
    import signal

    for _ in range(2):
        assert world.run("run", "--delay", "0", "--", "true").returncode == 0
    client = world.popen("run", "--key", "2", "--delay", "0", "--", "sleep", "30")
    wait_until(lambda: (_keys(world).get("2") or {}).get("running"))
    pid = world.daemon_pid()
    assert pid
    os.kill(pid, signal.SIGKILL)
    assert client.wait(timeout=15) == 113
    err = client.stderr.read()
    assert "run 'debounce wait --key 2' to reattach" in err, err


# ------------------------------------------------------------------------------ 4. bare run ids
def test_a_bare_number_that_is_no_key_is_a_run_id(world):
    """`wait 999` looks for run 999 (no key has that name), and says so."""
    assert world.run("run", "--delay", "0", "--key", "k", "--", "true").returncode == 0
    for command in ("wait", "logs", "kill"):
        r = world.run(command, "999")
        assert r.returncode == 117, (command, r.stderr)
        assert "run 999" in r.stderr and "Traceback" not in r.stderr, (command, r.stderr)
    r = world.run("wait", "999")
    assert r.stderr == "debounce: no run 999 (nor key '999') pending, running or finished\n"
    r = world.run("wait", "1", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["run_id"] == 1


@pytest.mark.slow
def test_logs_and_wait_of_a_bare_fleet_run_id_on_another_host(tmp_path):
    """`logs 6` on a host that ran nothing: fleet run 6, not a fleet key '6'."""
    from fleet_support import Fleet, Redis

    redis = Redis(tmp_path)
    fleet = Fleet(redis, count=2)
    try:
        a, b = fleet.hosts
        r = a.run("run", "--fleet", "--key", "deploy", "--delay", "0", "--json", "--",
                  "echo", "from the fleet")
        assert r.returncode == 0, r.stderr
        run_id = str(json.loads(r.stdout)["run_id"])
        logs = b.run("logs", run_id)
        assert (logs.returncode, logs.stdout) == (0, "from the fleet\n"), logs.stderr
        waited = b.run("wait", run_id, "--json")
        assert waited.returncode == 0, waited.stderr
        assert json.loads(waited.stdout)["key"] == "deploy"
    finally:
        fleet.cleanup()
        redis.stop()


# ------------------------------------------------------------------------------ 5. help texts
def test_kill_help_says_no_kill_follows_a_signal(world):
    """`kill --signal SIG` sends SIG once, and its help says so (no KILL after it)."""
    r = world.run("kill", "--help")
    text = " ".join(r.stdout.split())
    assert r.returncode == 0 and "then KILL" not in text, text
    assert "no KILL follows" in text
    man = Path(__file__).resolve().parent.parent / "man" / "debounce-kill.1"
    page = " ".join(man.read_text().replace("\\-", "-").split())
    assert "then KILL after the stop timeout" not in page and "no KILL follows" in page


# ------------------------------------------------------------------------------ 6. smaller lies
def test_a_bad_store_url_for_an_auto_started_daemon_is_a_usage_error(world):
    """DEBOUNCE_STORE=http://... : exit 2 and one line naming it, as `daemon --store` gives."""
    env = dict(world.env, DEBOUNCE_STORE="http://example.com:6379")
    for args in (("run", "--", "true"), ("status",)):
        r = world.run(*args, env=env)
        assert r.returncode == 2, (args, r.stderr)
        assert len(r.stderr.splitlines()) == 1 and "DEBOUNCE_STORE" in r.stderr, r.stderr
    assert world.daemon_pid() is None


def test_a_mistyped_socket_directory_is_refused_not_created(world):
    """Only the socket's own directory is ever made: a missing parent is a usage error."""
    typo = world.root / "nonexistent" / "dir" / "s.sock"
    env = dict(world.env, DEBOUNCE_SOCKET=str(typo))
    r = world.run("run", "--", "true", env=env)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith(f"debounce: cannot create socket directory {typo.parent}: "
                               f"{typo.parent.parent} does not exist")
    assert len(r.stderr.splitlines()) == 1
    assert not (world.root / "nonexistent").exists()
    r = world.run("run", "--", "echo", "fine")  # the world's socket directory is new too
    assert (r.returncode, r.stdout) == (0, "fine\n"), r.stderr


def _on_terminal(world, *args: str, env: dict[str, str]) -> tuple[int, str]:
    """The CLI with stdout and stderr on a pseudo-terminal: its status and what it drew."""
    import pty
    import select

    master, slave = pty.openpty()
    proc = subprocess.Popen(world.argv(*args), stdin=subprocess.DEVNULL, stdout=slave,
                            stderr=slave, env=env, cwd=world.work)
    os.close(slave)
    chunks = []
    while select.select([master], [], [], 10)[0]:
        try:
            data = os.read(master, 65536)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    return proc.wait(timeout=10), b"".join(chunks).decode(errors="replace")


def test_an_empty_no_color_keeps_the_colour(world):
    """NO_COLOR set but empty does not turn colour off (no-color.org); set to 1, it does."""
    env = dict(world.env, NO_COLOR="", TERM="xterm")
    status, drawn = _on_terminal(world, "run", "--delay", "300ms", "--", "true", env=env)
    assert status == 0 and "waiting for" in drawn and "\x1b[2m" in drawn
    status, drawn = _on_terminal(world, "run", "--delay", "300ms", "--", "true",
                                 env=dict(env, NO_COLOR="1"))
    assert status == 0 and "waiting for" in drawn and "\x1b[2m" not in drawn


def test_tables_on_a_dumb_terminal_are_ascii(world):
    """TERM=dumb: status and history tables are drawn with ASCII, not box-drawing glyphs."""
    assert world.run("run", "--delay", "0", "--key", "done", "--", "true").returncode == 0
    world.run("run", "--no-wait", "--key", "later", "--delay", "1h", "--", "true")
    env = dict(world.env, TERM="dumb")
    for command in ("status", "history"):
        status, drawn = _on_terminal(world, command, env=env)
        assert status == 0, drawn
        assert drawn.isascii(), (command, drawn)
        assert "|" in drawn and ("later" in drawn or "done" in drawn), drawn


def test_bare_debounce_prints_its_usage_on_lines_of_their_own(world):
    r = world.run()
    assert r.returncode == 2
    first, *_, last = r.stderr.splitlines()
    assert first == "Usage: debounce [OPTIONS] COMMAND [ARGS]..."
    assert last.split() == ["watch", "Run", "COMMAND", "after", "each", "burst", "of", "file",
                            "changes", "under", "PATH."]


# ------------------------------------------------------------------------------ 7. watch, Ctrl-C
BLOCKED_RUN = ('echo started > "$0/started"; while [ ! -e "$0/go" ]; do sleep 0.05; done; '
               'echo finished; exit 3')


@pytest.mark.slow
def test_first_ctrl_c_on_watch_lets_the_executing_run_finish(world):
    """Ctrl-C: watching stops, what is pending is cancelled, the executing run is left to
    end (said in one line), its output printed, and its failing status is the watcher's."""
    import signal

    src = world.work / "src"
    src.mkdir()
    flags = world.root / "flags"
    flags.mkdir()
    proc, out, err = _watch(world, "--delay", "100ms", "src", "--", "sh", "-c", BLOCKED_RUN,
                            str(flags))
    (src / "a").write_text("a")
    wait_until((flags / "started").exists, timeout=15)
    (src / "b").write_text("b")  # pending behind the executing run
    wait_until(lambda: (next(iter(_keys(world).values()), {}) or {}).get("pending"))
    proc.send_signal(signal.SIGINT)
    wait_until(lambda: "waiting for it to end" in err.read_text(), timeout=15)
    said = err.read_text()
    assert "cancelled what was pending" in said
    assert [line for line in said.splitlines() if "still running" in line] == [
        "debounce: run 1 of " + next(iter(_keys(world))) + " is still running: waiting for it "
        "to end (Ctrl-C again stops it)"]
    assert proc.poll() is None
    assert [k["running"]["run_id"] for k in _keys(world).values()] == [1]
    (flags / "go").write_text("")
    assert proc.wait(timeout=15) == 3, err.read_text()
    assert out.read_text() == "finished\n"
    r = world.run("history", "--json")
    runs = [json.loads(line) for line in r.stdout.splitlines()]
    assert [(run["outcome"], run["exit_code"]) for run in runs] == [("exited", 3)]
    assert "Traceback" not in err.read_text()


@pytest.mark.slow
def test_a_second_ctrl_c_on_watch_stops_the_run(world):
    import signal

    src = world.work / "src"
    src.mkdir()
    flags = world.root / "flags"
    flags.mkdir()
    proc, _out, err = _watch(world, "--delay", "100ms", "src", "--", "sh", "-c", BLOCKED_RUN,
                             str(flags))
    (src / "a").write_text("a")
    wait_until((flags / "started").exists, timeout=15)
    proc.send_signal(signal.SIGINT)
    wait_until(lambda: "waiting for it to end" in err.read_text(), timeout=15)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=15) == 130, err.read_text()
    assert "stopping run 1 of" in err.read_text()

    def history() -> list:
        r = world.run("history", "--json")
        return [(json.loads(line)["outcome"], json.loads(line)["exit_code"])
                for line in r.stdout.splitlines()]

    assert wait_until(history, timeout=15) == [("killed", 143)]


def test_with_stderr_closed_our_messages_never_land_on_stdout(world):
    """print() to a closed stderr would write to stdout: a script reading it must not see
    debounce's complaints."""
    for args in (("wait", "--key", "nothing"), ("run", "--bad-option", "--", "true")):
        r = subprocess.run(["sh", "-c", 'exec "$@" 2>&-', "sh", *world.argv(*args)],
                           cwd=world.work, env=world.env, capture_output=True, text=True,
                           timeout=30)
        assert r.returncode in (2, 117) and r.stdout == "", (args, r.stdout)
