"""End-to-end tests of ``debounce daemon --stdin``: invocations read one per line."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import time
from pathlib import Path


def lines(path: Path) -> list[str]:
    try:
        return [line for line in path.read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        return []


def feed(world, input_lines: list[str], *options: str) -> subprocess.Popen:
    """Start ``debounce daemon --stdin OPTIONS``, write ``input_lines`` quickly, close stdin."""
    proc = world.popen("daemon", "--stdin", *options, stdin=subprocess.PIPE)
    assert proc.stdin is not None
    try:
        proc.stdin.write("".join(line + "\n" for line in input_lines))
        proc.stdin.close()
    except BrokenPipeError:  # it refused to start (usage error) before reading
        pass
    proc.stdin = None  # closed: communicate() must not flush it again
    return proc


def finish_within(proc: subprocess.Popen, timeout: float) -> tuple[int, str, str]:
    """Wait for the daemon to exit on its own (it must, at end of input)."""
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def test_same_command_lines_run_once_then_the_daemon_exits_0(world):
    log = world.work / "runs.log"
    command = shlex.join(["sh", "-c", f'echo ran >> {log}; echo "RUN-OUTPUT $1"', "sh", "x y"])
    began = time.monotonic()
    proc = feed(world, [command] * 5, "--delay", "200ms")
    code, out, err = finish_within(proc, timeout=10)
    assert code == 0, err
    assert lines(log) == ["ran"]
    assert "RUN-OUTPUT x y" in out
    assert time.monotonic() - began < 5


def test_json_lines_with_argv_key_delay_and_cwd(world):
    log = world.work / "json.log"
    sub = world.work / "sub"
    sub.mkdir()
    script = f'echo "$(pwd -P) $0 $1" >> {log}'

    def line(name: str, n: str, **extra) -> str:
        obj = {"argv": ["sh", "-c", script, name, n], "key": "job-{3}", "delay": "300ms",
               "cwd": str(sub), **extra}
        return json.dumps(obj)

    # The daemon's own --delay is 30s: only the lines' "delay" lets this finish in time.
    proc = feed(world, [line("alpha", "1"), line("alpha", "2"), line("beta", "1")],
                "--delay", "30s")
    code, _out, err = finish_within(proc, timeout=10)
    assert code == 0, err
    here = os.path.realpath(sub)
    assert sorted(lines(log)) == [f"{here} alpha 2", f"{here} beta 1"]


def test_unparseable_lines_are_reported_and_the_others_still_run(world):
    good1 = world.work / "good1"
    good2 = world.work / "good2"
    proc = feed(
        world,
        [
            shlex.join(["touch", str(good1)]),
            '{"argv": ["true"',                               # line 2: bad JSON
            json.dumps({"argv": ["true"], "bogus": 1}),       # line 3: unknown field
            "echo 'unterminated",                             # line 4: bad shell quoting
            json.dumps({"argv": ["touch", str(good2)], "delay": "100ms"}),
        ],
        "--delay", "200ms",
    )
    code, _out, err = finish_within(proc, timeout=10)
    assert code == 1, err
    assert good1.exists() and good2.exists()
    assert "Traceback" not in err
    err_lines = [line for line in err.splitlines() if line.strip()]
    # One report per bad line, each naming its line number first (a JSON parser's own
    # "line 1 column 17" may follow).
    reported = {}
    for text in err_lines:
        match = re.search(r"\bline (\d+)\b", text)
        assert match, f"no line number in {text!r}"
        reported[int(match.group(1))] = text
    assert sorted(reported) == [2, 3, 4], err
    assert len(err_lines) == 3, err
    assert "JSON" in reported[2]
    assert "bogus" in reported[3]


def test_a_failing_run_makes_the_exit_status_1(world):
    ok = world.work / "ok"
    proc = feed(
        world,
        [shlex.join(["sh", "-c", "exit 3"]), shlex.join(["touch", str(ok)])],
        "--delay", "100ms",
    )
    code, _, err = finish_within(proc, timeout=10)
    assert code == 1, err
    assert ok.exists()


def test_no_trailing_without_leading_is_a_usage_error(world):
    marker = world.work / "ran"
    proc = feed(world, [shlex.join(["touch", str(marker)])], "--no-trailing", "--delay", "100ms")
    code, _, err = finish_within(proc, timeout=10)
    assert code == 2, err
    err_lines = [line for line in err.splitlines() if line.strip()]
    assert len(err_lines) == 1 and "--leading" in err_lines[0], err
    assert "Traceback" not in err
    assert not marker.exists()
