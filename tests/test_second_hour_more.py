"""What a user checks in the second hour, continued (issue 19): JSON that any reader takes,
a stdin daemon stopped early says what it leaves, the fleet in plain sight, short messages
and tables for huge commands, cron and the login shell meeting one daemon, and completion."""

from __future__ import annotations

import base64
import json
import subprocess

from conftest import wait_until

BAD = "k\udce9y"  # the bytes b"k\xe9y": Latin-1, not UTF-8
BAD_BYTES = b"k\xe9y"


def _cli(world, *args: str, **kw) -> subprocess.CompletedProcess:
    """The CLI with its output as bytes (a program reading it gets exactly these)."""
    kw.setdefault("stdin", subprocess.DEVNULL)
    return subprocess.run(world.argv(*args), cwd=world.work, env=world.env,
                          capture_output=True, timeout=60, **kw)


def _strict_json(data: bytes) -> object:
    """What jq or any strict reader gets: valid UTF-8, and no string standing for no
    character (a lone surrogate)."""
    value = json.loads(data.decode("utf-8"))

    def check(v: object) -> None:
        if isinstance(v, str):
            v.encode("utf-8")  # raises on a lone surrogate
        elif isinstance(v, list):
            for item in v:
                check(item)
        elif isinstance(v, dict):
            for name, item in v.items():
                check(name)
                check(item)

    check(value)
    return value


def _b64(data: str) -> bytes:
    return base64.b64decode(data)


# ------------------------------------------------------------------------------ 1. --json bytes
def test_json_outputs_are_utf8_and_give_the_exact_bytes_in_b64_fields(world):
    r = _cli(world, "run", "--json", "--delay", "0", "--key", BAD, "--", "echo", BAD)
    assert r.returncode == 0, r.stderr
    done = _strict_json(r.stdout)
    assert isinstance(done, dict)
    assert done["key"] == "k\ufffdy" and _b64(done["key_b64"]) == BAD_BYTES
    assert [_b64(a) for a in done["argv_b64"]] == [b"echo", BAD_BYTES]
    assert done["argv"] == ["echo", "k\ufffdy"]

    r = _cli(world, "history", "--json")
    row = _strict_json(r.stdout)
    assert isinstance(row, dict)
    assert _b64(row["key_b64"]) == BAD_BYTES and _b64(row["argv_b64"][1]) == BAD_BYTES
    assert "cwd_b64" not in row  # a field that is UTF-8 has no sibling

    r = _cli(world, "run", "--no-wait", "--json", "--delay", "1h", "--key", BAD, "--", "echo", BAD)
    accepted = _strict_json(r.stdout)
    assert isinstance(accepted, dict) and _b64(accepted["key_b64"]) == BAD_BYTES
    status = _strict_json(_cli(world, "status", "--json").stdout)
    assert isinstance(status, dict)
    key = status["keys"][0]
    assert _b64(key["key_b64"]) == BAD_BYTES
    assert _b64(key["pending"]["argv_b64"][1]) == BAD_BYTES


def test_a_stdin_json_line_takes_the_b64_fields_back_to_the_same_bytes(world):
    out = world.root / "out"
    line = json.dumps({
        "argv": ["sh", "-c", 'printf %s "$1" > "$2"', "sh", "?", str(out)],
        "argv_b64": [base64.b64encode(a).decode() for a in
                     (b"sh", b"-c", b'printf %s "$1" > "$2"', b"sh", BAD_BYTES,
                      str(out).encode())],
        "key_b64": base64.b64encode(BAD_BYTES).decode(), "delay": "0",
    })
    proc = world.popen("daemon", "--stdin", "--no-journal", stdin=subprocess.PIPE)
    proc.communicate(line + "\n", timeout=60)
    assert proc.returncode == 0
    assert out.read_bytes() == BAD_BYTES


def test_messages_show_such_bytes_as_a_shell_would_not_as_python_escapes(world):
    r = _cli(world, "logs", "--key", BAD)
    assert r.returncode == 117
    assert b"\\udc" not in r.stderr and b"$'k\\xe9y'" in r.stderr, r.stderr
    r = _cli(world, "cancel", "--key", BAD)
    assert r.returncode == 117
    assert b"\\udc" not in r.stderr and b"$'k\\xe9y'" in r.stderr, r.stderr



def test_a_stdin_line_refused_for_such_bytes_names_them_as_a_shell_would(world):
    line = json.dumps({"argv": ["true"],
                       "key_b64": base64.b64encode(b"{9}" + BAD_BYTES).decode()})
    proc = world.popen("daemon", "--stdin", "--no-journal", stdin=subprocess.PIPE,
                       stderr=subprocess.PIPE)
    _, err = proc.communicate(line + "\n", timeout=60)
    assert proc.returncode == 1
    assert "stdin line 1: key template $'{9}k\\xe9y'" in err and "\\udc" not in err, err

# ------------------------------------------------------------------------------ 2. stdin stopped
def _stdin_daemon(world, *options: str, lines: list[str]) -> subprocess.Popen:
    """``daemon --stdin --socket S``, once its first line runs and the rest are pending."""
    proc = world.popen("daemon", "--stdin", "--socket", world.socket, "--delay", "0",
                       *options, stdin=subprocess.PIPE)
    assert proc.stdin is not None
    proc.stdin.write("".join(line + "\n" for line in lines))
    proc.stdin.flush()
    wait_until(lambda: world.daemon_pid() == proc.pid, timeout=30)

    def settled() -> bool:
        r = world.run("status", "--json", "--socket", world.socket)
        if r.returncode != 0:
            return False
        keys = json.loads(r.stdout)["keys"]
        return (sum(k["running"] is not None for k in keys) == 1
                and sum(k["pending"] is not None for k in keys) == len(lines) - 1)

    wait_until(settled, timeout=30)
    return proc


def test_ctrl_c_on_a_stdin_daemon_says_what_it_stopped_and_kept_and_how_to_drop_it(world):
    import shlex
    import signal

    later = json.dumps({"argv": ["echo", "later"], "delay": "1h", "key": "later"})
    proc = _stdin_daemon(world, lines=["sleep 30", later])
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    stopped = [line for line in err.splitlines() if "stopped 1 run" in line]
    kept = [line for line in err.splitlines() if "kept 1 pending invocation" in line]
    assert len(stopped) == 1 and "line 1: sleep 30" in stopped[0], err
    assert len(kept) == 1 and "line 2: echo later" in kept[0], err
    # The line says how to drop what it kept, and that command does it.
    drop = kept[0].split("drop before due: ", 1)[1]
    assert drop.startswith("debounce cancel --socket")
    r = world.run(*shlex.split(drop)[1:])
    assert r.returncode == 0, r.stderr
    assert json.loads(world.run("status", "--json").stdout)["keys"] == []


def test_sigterm_on_a_stdin_daemon_without_journal_says_what_it_dropped(world):
    import signal

    later = json.dumps({"argv": ["echo", "later"], "delay": "1h"})
    proc = _stdin_daemon(world, "--no-journal", lines=["sleep 30", later])
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    dropped = [line for line in err.splitlines() if "dropped 1 pending invocation" in line]
    assert len(dropped) == 1 and "line 2: echo later" in dropped[0], err
    assert any("stopped 1 run" in line for line in err.splitlines()), err



def test_a_client_racing_a_stdin_daemons_start_uses_it_at_once(world):
    """`debounce status` at the moment `daemon --stdin` starts: the client, finding no socket,
    starts a daemon of its own, which waits for the stdin daemon's lock; it used to wait with
    it (until the stdin daemon exited, or 10 s) and then show nothing. (When the client's
    daemon takes the lock first, both were quick before too.)"""
    import time

    proc = world.popen("daemon", "--stdin", "--socket", world.socket, "--delay", "0",
                       stdin=subprocess.PIPE)
    assert proc.stdin is not None
    proc.stdin.write("sleep 30\n")
    proc.stdin.flush()
    started = time.monotonic()
    r = world.run("status", "--json", "--socket", world.socket)
    took = time.monotonic() - started
    assert r.returncode == 0, r.stderr
    assert took < 5, took
    # Which of the two took the lock is a race: when the stdin daemon did (most runs), the
    # status is its own and shows its line; else it reads its input without a socket.
    if world.daemon_pid() == proc.pid:
        wait_until(lambda: json.loads(world.run("status", "--json").stdout)["keys"])
    # The daemon the client started serves the socket once the stdin daemon is gone (or did
    # from the start): stopped here, so that none outlives the test.
    proc.terminate()
    proc.communicate(timeout=30)
    wait_until(lambda: world.daemon_pid() not in (None, proc.pid), timeout=40)
    assert world.run("stop").returncode == 0
    assert world.daemon_pid() is None

# ------------------------------------------------------------------------------ 3. fleet in sight
def _fleet():
    """A real Redis and three hosts (a, b, c); the caller cleans up."""
    import tempfile
    from pathlib import Path

    from fleet_support import Fleet, Redis

    redis = Redis(Path(tempfile.mkdtemp(prefix="dbr-", dir="/tmp")), aof=True)
    return redis, Fleet(redis)


def test_piped_fleet_status_and_history_keep_the_host_and_plain_status_shows_fleet_keys():
    import shutil

    redis, fleet = _fleet()
    try:
        a, _b, c = fleet.hosts
        r = c.run("run", "--fleet", "--no-wait", "--key", "k", "--delay", "30s", "--", "true")
        assert r.returncode == 0, r.stderr
        # status --fleet on a pipe: state, key, seconds, coalesced, host, command.
        line = a.run("status", "--fleet").stdout.strip()
        assert line.split("\t")[:2] == ["pending", "k"] and line.split("\t")[4:] == ["c", "true"]
        # Plain status on the host that holds the pending invocation shows it, with its host;
        # other hosts' plain status stays local.
        line = c.run("status").stdout.strip()
        assert line.split("\t")[:2] == ["pending", "k"] and line.split("\t")[4] == "c", line
        rows = json.loads(c.run("status", "--json").stdout)["keys"]
        assert [(row["key"], row["host"]) for row in rows] == [("k", "c")]
        assert a.run("status").stdout == ""
        assert c.run("flush", "k").returncode == 0
        wait_until(lambda: a.run("history", "--fleet").stdout.strip(), timeout=30)
        fields = a.run("history", "--fleet").stdout.strip().split("\t")
        # run, exit, outcome, start, took, coalesced, host, key, command
        assert fields[6:] == ["c", "k", "true"], fields
    finally:
        fleet.cleanup()
        redis.stop()
        shutil.rmtree(redis.root, ignore_errors=True)


def test_a_fleet_waiter_past_due_says_the_store_may_be_unreachable(monkeypatch):
    """The waiting line of a fleet key (a unit: the display, fed the daemon's messages):
    past due it no longer claims the key is busy, and a daemon that says its store is out
    is shown as such."""
    import io

    monkeypatch.setenv("COLUMNS", "200")
    from debounce_cli import protocol
    from debounce_cli.render import FLEET_LATE, TerminalDisplay

    shown = io.StringIO()
    display = TerminalDisplay(shown)
    display.fleet = True
    display.pending(protocol.Pending(key="k", state="pending", due_in=-(FLEET_LATE + 1),
                                     coalesced=1))
    assert "store unreachable" in shown.getvalue()
    display.pending(protocol.Pending(key="k", state=protocol.STORE_UNREACHABLE, due_in=3.0,
                                     coalesced=1))
    assert "fleet store unreachable" in shown.getvalue().rsplit("\r", 1)[-1]


# ------------------------------------------------------------------------------ 4. smaller ones
def test_a_fleet_stdin_line_without_a_store_names_the_store_option_not_stop(world):
    line = json.dumps({"argv": ["true"], "fleet": True})
    proc = world.popen("daemon", "--stdin", "--no-journal", stdin=subprocess.PIPE)
    _, err = proc.communicate(line + "\n", timeout=60)
    assert proc.returncode == 1
    assert "stdin line 1:" in err and "--store" in err, err
    assert "debounce stop" not in err, err


def test_status_and_history_json_give_times_in_the_same_iso_format(world):
    from datetime import datetime

    assert world.run("run", "--delay", "0", "--key", "t", "--", "true").returncode == 0
    world.run("run", "--no-wait", "--delay", "1h", "--key", "t", "--", "true")
    last = json.loads(world.run("status", "--json").stdout)["keys"][0]["last"]
    run = json.loads(world.run("history", "--json").stdout.splitlines()[0])
    assert isinstance(last["finished_at"], str) and last["finished_at"] == run["finished_at"]
    assert datetime.fromisoformat(last["finished_at"]).tzinfo is not None


def test_a_huge_stdin_line_that_fails_to_start_gives_a_short_error_line(world):
    """A word of almost 1 MiB is more than the kernel takes as one argument: the run fails
    (126) and the line that says so does not repeat the megabyte."""
    proc = world.popen("daemon", "--stdin", "--no-journal", stdin=subprocess.PIPE)
    _, err = proc.communicate("true '" + "x" * ((1 << 20) - 100) + "'\n", timeout=60)
    assert proc.returncode == 1
    assert "stdin line 1: true xxx" in err and "exited with status 126" in err, err[:300]
    assert max(len(line) for line in err.splitlines()) < 400, [len(x) for x in err.splitlines()]


def test_history_of_a_run_with_100000_arguments_is_short_on_a_terminal(world):
    import os
    import pty
    import select

    args = [str(i) for i in range(100_000)]
    # Through a file of arguments: one command line of 100,000 words is fine for the kernel.
    r = world.run("run", "--delay", "0", "--key", "big", "--", "true", *args)
    assert r.returncode == 0, r.stderr[:300]
    master, slave = pty.openpty()
    proc = subprocess.Popen(world.argv("history"), stdin=subprocess.DEVNULL, stdout=slave,
                            stderr=slave, env=dict(world.env, COLUMNS="120", TERM="xterm"),
                            cwd=world.work)
    os.close(slave)
    chunks = []
    while select.select([master], [], [], 30)[0]:
        try:
            data = os.read(master, 65536)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    assert proc.wait(timeout=30) == 0
    drawn = b"".join(chunks).decode(errors="replace")
    assert len(drawn.splitlines()) < 20, len(drawn.splitlines())
    import re

    assert re.search(r"99,9\d\d\s+more\s+arguments", " ".join(
        part.strip(" │|") for part in drawn.split("│"))), drawn


# ------------------------------------------------------------------------------ 5. cron
def test_a_cron_job_set_up_as_readme_says_reaches_the_login_shells_daemon(world):
    """cron gives a job a bare environment (env -i plus HOME, LOGNAME, PATH, SHELL and the
    crontab's own assignments). With the line README's cron recipe puts at the top of the
    crontab, the job and a login shell (XDG_RUNTIME_DIR set, no DEBOUNCE_SOCKET) meet at
    one daemon."""
    import os
    import re
    import sys
    from pathlib import Path

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    recipe = re.search(r"```crontab\n(.*?)```", readme, re.S)
    assert recipe, "README has no crontab recipe"
    assignments = [line for line in recipe.group(1).splitlines()
                   if re.fullmatch(r"[A-Z_]+=\S+", line)]
    assert [a.split("=")[0] for a in assignments] == ["XDG_RUNTIME_DIR"], assignments
    # The test's own per-user runtime directory stands in for /run/user/$UID.
    runtime = world.root / "run-user"
    runtime.mkdir(mode=0o700)
    home = world.root / "home"
    home.mkdir()
    cron_env = {"HOME": str(home), "LOGNAME": "me", "PATH": "/usr/bin:/bin",
                "SHELL": "/bin/sh", "XDG_RUNTIME_DIR": str(runtime)}
    job = subprocess.run(["env", "-i", *(f"{k}={v}" for k, v in cron_env.items()),
                          sys.executable, "-m", "debounce_cli", "run", "--no-wait", "--key",
                          "sync", "--delay", "1h", "--", "true"],
                         cwd=world.work, capture_output=True, text=True, timeout=60)
    assert job.returncode == 0, job.stderr
    shell_env = {k: v for k, v in world.env.items() if k != "DEBOUNCE_SOCKET"}
    shell_env.update(XDG_RUNTIME_DIR=str(runtime), HOME=str(home))
    shell_env.pop("DEBOUNCE_STATE_DIR")
    try:
        r = subprocess.run(world.argv("status", "--json"), cwd=world.work, env=shell_env,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert [row["key"] for row in json.loads(r.stdout)["keys"]] == ["sync"]
    finally:
        subprocess.run(world.argv("stop"), env=shell_env, capture_output=True, timeout=60)
        assert not os.path.exists(runtime / "debounce" / "daemon.sock")


# ------------------------------------------------------------------------------ 6. completion
BASH_COMPLETION = "/usr/share/bash-completion/bash_completion"


def _complete(world, *words: str, bash_completion: bool = False) -> list[str]:
    """What a real bash with debounce's completion loaded offers for ``words`` (the last
    being completed): COMP_WORDS and COMP_CWORD set as bash sets them on TAB, then the
    function that ``complete -p debounce`` names."""
    import os
    import shlex
    import sys
    from pathlib import Path

    script = Path(__file__).parent.parent / "completions" / "debounce.bash"
    load = f"source {BASH_COMPLETION}; " if bash_completion else ""
    words_text = " ".join(shlex.quote(w) for w in words)
    program = (f"{load}source {script}; complete -p debounce >&2; "
               f"COMP_WORDS=({words_text}); COMP_CWORD=$((${{#COMP_WORDS[@]}} - 1)); "
               'COMP_LINE="${COMP_WORDS[*]}"; COMP_POINT=${#COMP_LINE}; COMPREPLY=(); '
               "_debounce_completion debounce 2>/dev/null; "
               "printf '%s\\n' \"${COMPREPLY[@]}\"")
    env = dict(world.env, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    proc = subprocess.run(["bash", "--norc", "-c", program], cwd=world.work, env=env,
                          capture_output=True, text=True, timeout=60)
    assert "-F _debounce_completion debounce" in proc.stderr, proc.stderr
    return [line for line in proc.stdout.splitlines() if line]


def test_bash_completes_the_command_after_dashes_then_its_files(world):
    import os

    deploy = world.work / "deploy.sh"
    deploy.write_text("#!/bin/sh\n")
    deploy.chmod(0o755)
    (world.work / "data file").write_text("")
    loaders = [False] + ([True] if os.path.exists(BASH_COMPLETION) else [])
    for loaded in loaders:
        assert _complete(world, "debounce", "run", "--", "./dep",
                         bash_completion=loaded) == ["./deploy.sh"], loaded
        assert _complete(world, "debounce", "run", "--delay", "2s", "--", "./deploy.sh", "da",
                         bash_completion=loaded) == ["data file"], loaded
        assert "sh" in _complete(world, "debounce", "run", "--key", "k", "s",
                                 bash_completion=loaded), loaded
        assert _complete(world, "debounce", "watch", ".", "--", "./dep",
                         bash_completion=loaded) == ["./deploy.sh"], loaded
        assert _complete(world, "debounce", "status", "--socket", "./dep",
                         bash_completion=loaded) == ["./deploy.sh"], loaded
        # debounce's own words still complete as before.
        assert _complete(world, "debounce", "con", bash_completion=loaded) == ["config"]


def test_bash_completes_keys_quoted_and_logs_offers_keys_with_history_only(world):
    assert world.run("run", "--delay", "0", "--key", "only history", "--", "true"
                     ).returncode == 0
    assert world.run("run", "--no-wait", "--delay", "1h", "--key", "my key", "--", "true"
                     ).returncode == 0
    assert _complete(world, "debounce", "cancel", "my") == ["my\\ key"]
    assert _complete(world, "debounce", "cancel", "on") == []  # nothing pending for it
    assert _complete(world, "debounce", "logs", "on") == ["only\\ history"]
    assert _complete(world, "debounce", "logs", "--key", "on") == ["only\\ history"]
    assert _complete(world, "debounce", "history", "") == ["my\\ key", "only\\ history"]
