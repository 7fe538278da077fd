"""What a user checks in the second hour: stop really stops, write errors are reported, keys
that look like run ids, the honest help texts, and Ctrl-C under watch."""

from __future__ import annotations

import json
import os
import subprocess

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
