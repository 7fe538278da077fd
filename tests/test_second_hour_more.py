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
