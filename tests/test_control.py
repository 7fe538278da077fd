"""Control commands, the terminal display, watch, completion and socket activation, end to end."""

from __future__ import annotations

import json
import os
import pty
import select
import socket
import subprocess
import sys
import time

from conftest import lines, wait_until


def _status(world) -> dict:
    r = world.run("status", "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_status_lists_pending_and_running_keys(world):
    """status shows each key with its argv, due time, coalesced count and running run."""
    world.run("run", "--no-wait", "--key", "busy", "--delay", "10ms", "--", "sleep", "300")
    wait_until(lambda: any(k["running"] for k in _status(world)["keys"]))
    world.run("run", "--no-wait", "--key", "busy", "--delay", "20s", "--", "echo", "next")
    world.run("run", "--no-wait", "--key", "other", "--delay", "20s", "--", "echo", "a")
    world.run("run", "--no-wait", "--key", "other", "--delay", "20s", "--", "echo", "b")
    keys = {k["key"]: k for k in _status(world)["keys"]}
    assert set(keys) == {"busy", "other"}
    assert keys["busy"]["running"]["argv"] == ["sleep", "300"]
    assert keys["busy"]["pending"]["argv"] == ["echo", "next"]
    assert keys["other"]["running"] is None
    assert keys["other"]["pending"]["argv"] == ["echo", "b"]
    assert keys["other"]["pending"]["coalesced"] == 2
    assert 15 < keys["other"]["pending"]["due_in"] <= 20
    rows = [line.split("\t") for line in world.run("status").stdout.splitlines()]
    assert all(len(row) == 5 for row in rows), rows  # state, key, seconds, coalesced, command
    by_state = {(row[0], row[1]): row for row in rows}
    assert by_state["running", "busy"][3:] == ["1", "sleep 300"]
    assert float(by_state["running", "busy"][2]) >= 0
    assert by_state["pending", "other"][3:] == ["2", "echo b"]
    assert 15 < float(by_state["pending", "other"][2]) <= 20


def test_flush_and_cancel_of_unknown_keys_say_so(world):
    for command in ("flush", "cancel"):
        r = world.run(command, "nothing-here")
        assert r.returncode == 117
        assert r.stderr.strip() == "debounce: nothing is pending for key 'nothing-here'"


def test_history_and_logs_of_a_key(world):
    """history lists finished runs newest first; logs replays a run's stdout and stderr."""
    for i in (1, 2):
        r = world.run("run", "--key", "h", "--delay", "10ms", "--", "sh", "-c",
                      f"echo out{i}; echo err{i} >&2; exit {i}")
        assert r.returncode == i
    rows = [json.loads(line) for line in world.run("history", "--json").stdout.splitlines()]
    assert [row["exit_code"] for row in rows] == [2, 1]
    assert set(rows[0]) >= {"run_id", "key", "argv", "exit_code", "coalesced", "started_at",
                            "finished_at"}
    logs = world.run("logs", "h")
    assert (logs.stdout, logs.stderr) == ("out2\n", "err2\n")
    first = world.run("logs", str(rows[1]["run_id"]))
    assert (first.stdout, first.stderr) == ("out1\n", "err1\n")
    assert len(world.run("history", "--limit", "1", "--json").stdout.splitlines()) == 1


def _run_on_terminal(world, *args: str) -> tuple[int, str]:
    """Run the CLI with stderr on a pseudo-terminal; return its status and what it drew."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(world.argv(*args), stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=slave, env=world.env,
                            cwd=world.work)
    os.close(slave)
    chunks = []
    while True:
        ready, _, _ = select.select([master], [], [], 10)
        if not ready:
            break
        try:
            data = os.read(master, 4096)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    return proc.wait(timeout=10), b"".join(chunks).decode(errors="replace")


def test_terminal_shows_what_it_waits_for_and_pipes_do_not(world):
    """On a TTY stderr shows key, countdown and coalesced count, then clears the line."""
    status, drawn = _run_on_terminal(world, "run", "--key", "tty", "--delay", "400ms", "--",
                                     "sh", "-c", "sleep 0.3")
    assert status == 0
    assert "waiting for tty" in drawn and "due in" in drawn and "1 invocation" in drawn
    assert "running tty" in drawn
    assert drawn.endswith("\r\x1b[2K")  # the status line is cleared at the end
    piped = world.run("run", "--key", "tty", "--delay", "100ms", "--", "true")
    assert piped.stderr == ""


def test_a_dumb_terminal_gets_no_escape_codes(world):
    world.env["TERM"] = "dumb"
    status_code, drawn = _run_on_terminal(world, "run", "--delay", "200ms", "--", "echo", "hi")
    assert status_code == 0 and "\x1b" not in drawn


def test_no_color_drops_the_styling(world):
    world.env["NO_COLOR"] = "1"
    _status_code, drawn = _run_on_terminal(world, "run", "--delay", "200ms", "--", "true")
    assert "waiting for" in drawn and "\x1b[2m" not in drawn


def test_watch_hands_the_whole_burst_to_one_run(world):
    """A burst of saves gives one run that sees every changed path; ignores are ignored."""
    src = world.work / "src"
    src.mkdir()
    (src / ".git").mkdir()
    out = world.root / "runs.txt"
    script = f'printf "%s\\n--\\n" "$DEBOUNCE_CHANGED_PATHS" >> {out}'
    watch = world.popen("watch", "--delay", "400ms", "--ignore", "*.tmp", "src", "--",
                        "sh", "-c", script)
    # The watcher is ready once a change produces a run.
    def primed():
        (src / "probe").write_text(str(time.monotonic()))
        return out.exists() and out.read_text()
    wait_until(primed, timeout=15, interval=0.5)
    wait_until(lambda: not any(k["pending"] or k["running"] for k in _status(world)["keys"]))
    out.write_text("")
    for name in ("a.c", "b.c", "c.c"):
        (src / name).write_text(name)
        time.sleep(0.1)
    (src / "junk.tmp").write_text("x")
    (src / ".git" / "index").write_text("x")
    wait_until(lambda: out.read_text().endswith("--\n"), timeout=10)
    time.sleep(0.6)  # a second run would show up within one more delay
    runs = out.read_text().split("--\n")[:-1]
    assert len(runs) == 1, runs
    seen = set(runs[0].split())
    assert {str(src / n) for n in ("a.c", "b.c", "c.c")} <= seen
    assert not any(p.endswith(("junk.tmp", "index")) for p in seen)
    watch.send_signal(2)
    assert watch.wait(timeout=10) == 130  # Ctrl-C: cancels what it left pending
    said = watch.stderr.read()
    assert "Traceback" not in said and "KeyboardInterrupt" not in said


def test_watch_needs_a_command_and_a_path(world):
    (world.work / "src").mkdir()
    r = world.run("watch", "src")
    assert r.returncode == 2 and "missing COMMAND" in r.stderr
    r = world.run("watch", "--", "true")
    assert r.returncode == 2 and "missing PATH" in r.stderr


def test_key_arguments_complete_from_the_running_daemon(world):
    world.run("run", "--no-wait", "--key", "deploy-web", "--delay", "20s", "--", "true")
    world.run("run", "--no-wait", "--key", "deploy-db", "--delay", "20s", "--", "true")
    world.run("run", "--no-wait", "--key", "build", "--delay", "20s", "--", "true")
    env = dict(world.env, _DEBOUNCE_COMPLETE="bash_complete", COMP_WORDS="debounce flush dep",
               COMP_CWORD="2")
    r = subprocess.run(world.argv(), env=env, capture_output=True, text=True, timeout=30)
    assert sorted(r.stdout.split()) == ["plain,deploy-db", "plain,deploy-web"]


def test_socket_activation_serves_a_socket_passed_by_systemd(world):
    """The daemon takes a listening socket on fd 3 (LISTEN_FDS=1, LISTEN_PID=its pid)."""
    world.sock_dir.mkdir(mode=0o700)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(world.socket)
    listener.listen()
    fd = listener.fileno()
    daemon = subprocess.Popen(
        ["bash", "-c", f'LISTEN_PID=$$ LISTEN_FDS=1 exec "$0" -m debounce_cli daemon 3<&{fd}',
         sys.executable],
        pass_fds=(fd,), env=world.env, cwd=world.work, stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True,
    )
    world.procs.append(daemon)
    try:
        r = world.run("run", "--delay", "50ms", "--", "sh", "-c",
                      "echo \"[$LISTEN_FDS$LISTEN_PID]\"")
        if r.returncode:
            daemon.terminate()
            raise AssertionError(r.stderr + daemon.communicate(timeout=10)[1])
        assert r.stdout == "[]\n"  # served, and LISTEN_* kept out of the run's env
        assert _status(world)["pid"] == daemon.pid
        world.run("stop")
        assert daemon.wait(timeout=10) == 0
        assert os.path.exists(world.socket)  # the socket belongs to systemd: left in place
    finally:
        listener.close()


def test_stop_ends_the_daemon_and_is_idempotent(world):
    """stop waits for the daemon to exit and removes its socket; a second stop says so."""
    assert world.run("status").returncode == 0
    pid = world.daemon_pid()
    assert pid
    r = world.run("stop")
    assert r.returncode == 0 and r.stderr == ""
    assert world.daemon_pid() is None and not os.path.exists(world.socket)
    assert not _alive(pid)
    again = world.run("stop")
    assert again.returncode == 0
    assert again.stderr.strip() == f"debounce: no daemon is running on {world.socket}"


def _alive(pid: int) -> bool:
    """Running, as opposed to gone or a zombie waiting for whoever adopted it to reap it."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_idle_daemon_exits_on_its_own(world):
    """An auto-started daemon leaves after --idle-exit with nothing to do."""
    daemon = world.popen("daemon", "--idle-exit", "500ms")
    wait_until(lambda: os.path.exists(world.socket))
    assert world.run("run", "--delay", "10ms", "--", "true").returncode == 0
    assert daemon.wait(timeout=10) == 0
    assert not os.path.exists(world.socket)


def test_history_keeps_the_last_runs_only(world):
    """--keep-history N bounds the journal: older runs and their logs go."""
    daemon = world.popen("daemon", "--keep-history", "2")
    wait_until(lambda: os.path.exists(world.socket))
    for i in range(4):
        r = world.run("run", "--key", "k", "--delay", "10ms", "--", "echo", str(i))
        assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in world.run("history", "--json").stdout.splitlines()]
    assert [row["argv"][-1] for row in rows] == ["3", "2"]
    first = min(row["run_id"] for row in rows) - 2
    assert world.run("logs", str(first)).returncode == 117
    assert world.run("logs", "k").stdout == "3\n"
    world.run("stop")
    assert daemon.wait(timeout=10) == 0


def test_a_client_that_stops_reading_does_not_make_the_daemon_hoard_output(world):
    """A client that stops reading is fed from the run's log once it reads again: the daemon
    holds none of the output in memory meanwhile, and the client gets every byte."""
    import socket as socket_mod

    world.run("status")
    sock = socket_mod.socket(socket_mod.AF_UNIX)
    sock.setsockopt(socket_mod.SOL_SOCKET, socket_mod.SO_RCVBUF, 4096)
    sock.connect(world.socket)
    request = {"type": "run", "argv": ["sh", "-c", "head -c 40000000 /dev/zero; echo end"],
               "cwd": str(world.work), "env": dict(world.env), "key": "flood",
               "options": {"delay": 0.01}, "wait": True}
    sock.sendall(b'{"type":"hello","version":1,"client":"t"}\n' + json.dumps(request).encode()
                 + b"\n")
    wait_until(lambda: world.run("history", "flood", "--json").stdout, timeout=30)
    daemon = world.daemon_pid()
    with open(f"/proc/{daemon}/status") as f:
        rss_kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))
    assert rss_kib < 40_000 * 1.5, f"the daemon holds the output in memory ({rss_kib} KiB)"
    chunks = []
    while True:
        chunk = sock.recv(1 << 20)
        if not chunk:
            break
        chunks.append(chunk)
    sock.close()
    messages = [json.loads(line) for line in b"".join(chunks).splitlines()]
    assert messages[-1]["type"] == "finished" and messages[-1]["exit_code"] == 0
    import base64

    output = b"".join(base64.b64decode(m["data"]) for m in messages if m["type"] == "output")
    assert output == b"\0" * 40_000_000 + b"end\n"
    logs = subprocess.run(world.argv("logs", "flood"), env=world.env, capture_output=True,
                          timeout=60)
    assert logs.stdout == output


def test_arguments_and_directories_that_are_not_utf8_run_and_are_stored(world):
    """Linux file names are bytes: debounce passes them through and the journal keeps them."""
    odd = os.fsdecode(b"caf\xe9")
    where = world.work / odd
    where.mkdir()
    for _ in range(2):  # the second run proves the journal was not wedged by the first
        r = subprocess.run(world.argv("run", "--delay", "10ms", "--", "sh", "-c",
                                      'printf "%s|%s" "$1" "$(pwd)"', "sh", odd),
                           cwd=where, env=world.env, capture_output=True, timeout=30)
        assert r.returncode == 0, r.stderr
        assert r.stdout == b"caf\xe9|" + os.fsencode(str(where))
    rows = [json.loads(line) for line in world.run("history", "--json").stdout.splitlines()]
    assert len(rows) == 2


def test_a_background_child_holding_the_output_does_not_hold_the_run(world):
    """`cmd &` inside the command: the run ends when the command does, as in a shell."""
    started = time.monotonic()
    r = world.run("run", "--delay", "10ms", "--timeout", "20s", "--", "sh", "-c",
                  "echo before; sleep 30.0417 & exit 3", timeout=25)
    assert (r.returncode, r.stdout) == (3, "before\n")
    assert time.monotonic() - started < 10
    subprocess.run(["pkill", "-f", "sleep 30.0417"], check=False)  # only this test's child


def test_clients_joining_a_running_run_get_its_output_once_and_in_order(world):
    """--on-busy ignore: a late caller sees the whole output from the start, no line twice."""
    count = 3000
    script = (f"import sys, time\nfor i in range({count}):\n print(i, flush=True)\n"
              " time.sleep(0.0005)")
    args = ["run", "--on-busy", "ignore", "--key", "join", "--delay", "10ms", "--",
            sys.executable, "-c", script]
    first = world.popen(*args)
    wait_until(lambda: any(k["running"] for k in _status(world)["keys"]))
    joiners = [world.popen(*args) for _ in range(6)]
    expected = "".join(f"{i}\n" for i in range(count))
    for proc in [first, *joiners]:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert out == expected


def test_watch_holds_few_connections_however_many_changes(world):
    """A stream of saves reuses one submitting and one following connection, not one each."""
    src = world.work / "src"
    src.mkdir()
    out = world.root / "runs.txt"
    world.run("status")  # the daemon, before the watcher has anything to say
    daemon = world.daemon_pid()
    watch = world.popen("watch", "--delay", "400ms", "src", "--", "sh", "-c",
                        f"echo run >> {out}")
    baseline = len(os.listdir(f"/proc/{daemon}/fd"))
    most = 0
    deadline = time.monotonic() + 3
    i = 0
    while time.monotonic() < deadline:
        (src / f"f{i % 5}").write_text(str(i))
        i += 1
        time.sleep(0.03)
        most = max(most, len(os.listdir(f"/proc/{daemon}/fd")))
    assert most - baseline < 12, f"{most - baseline} more descriptors than at rest"
    wait_until(lambda: out.exists() and lines(out), timeout=10)
    watch.send_signal(2)
    assert watch.wait(timeout=10) == 130  # Ctrl-C: cancels what it left pending


def test_a_client_arriving_while_the_daemon_shuts_down_is_served_by_the_next(world):
    """Between `debounce stop` and the daemon's exit, new work starts the next daemon."""
    world.run("run", "--no-wait", "--key", "slow", "--delay", "10ms", "--stop-timeout", "2s",
              "--", "sh", "-c", "trap '' TERM; sleep 5")
    wait_until(lambda: any(k["running"] for k in _status(world)["keys"]))
    old = world.daemon_pid()
    stopping = world.popen("stop")
    wait_until(lambda: not os.path.exists(world.socket), timeout=10)  # it stopped listening
    r = world.run("run", "--delay", "10ms", "--", "echo", "served", timeout=40)
    assert (r.returncode, r.stdout) == (0, "served\n"), r.stderr
    assert stopping.wait(timeout=30) == 0
    assert world.daemon_pid() not in (None, old)


def test_status_of_a_daemon_with_many_keys_is_not_cut_off(world):
    """An answer larger than the 4 MiB request cap (here ~5 MiB of status) still arrives."""
    import socket as socket_mod

    world.run("status")
    sock = socket_mod.socket(socket_mod.AF_UNIX)
    sock.connect(world.socket)
    reader = sock.makefile("rb")
    sock.sendall(b'{"type":"hello","version":1,"client":"t"}\n')
    reader.readline()
    long_arg = "x" * 300
    count = 12_000
    for i in range(count):
        request = {"type": "run", "argv": ["echo", long_arg], "cwd": "/", "env": {},
                   "key": f"k{i}", "options": {"delay": 3600.0}, "wait": False}
        sock.sendall(json.dumps(request).encode() + b"\n")
        assert reader.readline().startswith(b'{"type":"accepted"')
    sock.close()
    r = world.run("status", "--json", timeout=60)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout) > 4 * 1024 * 1024
    assert len(json.loads(r.stdout)["keys"]) == count
