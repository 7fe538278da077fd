"""`debounce daemon --stdin` edges a new user meets in the first hour (issue 11, items 3 and 9)."""

from __future__ import annotations

import signal
import subprocess

import pytest

from conftest import wait_until


def _stdin_daemon(world, *args: str) -> subprocess.Popen:
    return subprocess.Popen(world.argv("daemon", "--stdin", "--no-journal", *args),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=world.work, env=world.env)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_input_is_open_ends_cleanly(world, sig):
    """It used to abort with "Fatal Python error: _enter_buffered_busy" (exit 134)."""
    proc = _stdin_daemon(world, "--delay", "0")
    marker = world.work / "ran"
    assert proc.stdin is not None
    proc.stdin.write(f"touch {marker}\n".encode())
    proc.stdin.flush()
    wait_until(marker.exists, timeout=10)
    proc.send_signal(sig)
    _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert b"Fatal" not in err and b"Traceback" not in err


def test_comments_are_skipped_and_a_failing_run_names_its_line(world):
    lines_in = b"# rebuild the docs\n  # indented comment\ntrue\nsh -c 'exit 3'\n"
    proc = subprocess.run(world.argv("daemon", "--stdin", "--no-journal", "--delay", "0"),
                          input=lines_in, capture_output=True, cwd=world.work, env=world.env,
                          timeout=30)
    assert proc.returncode == 1
    err = proc.stderr.decode().strip().splitlines()
    assert err == ["debounce: stdin line 4: sh -c 'exit 3' exited with status 3 (run 2, exited)"]
