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


def _unused() -> None:
    wait_until(lambda: True)
