"""The client path stays light: no rich, asyncio, sqlite3, watchfiles or redis on a pipe, and
a plain `debounce run` not even click (the fast path, debounce_cli/fast.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("rich", "asyncio", "sqlite3", "watchfiles", "redis")

PROBE = f"""
import sys
from debounce_cli import fast
sys.argv = ["debounce", *sys.argv[1:]]
try:
    fast.main()
except SystemExit as exc:
    status = exc.code
loaded = [m for m in {(*HEAVY, "click")!r} if m in sys.modules]
print("LOADED=" + ",".join(loaded), file=sys.__stderr__)
"""


def _loaded(world, args: list[str]) -> list[str]:
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, *args],
        capture_output=True, text=True, env=world.env, cwd=world.work, timeout=30,
    )
    line = [x for x in proc.stderr.splitlines() if x.startswith("LOADED=")]
    assert line, proc.stderr
    return [m for m in line[-1][7:].split(",") if m]


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["run", "--help"],
        ["run", "--delay", "nope", "--", "true"],
        ["status"],
    ],
)
def test_client_commands_on_a_pipe_import_nothing_heavy(world, args):
    """What `debounce run` loads on a pipe decides its start-up time on every event."""
    assert set(_loaded(world, args)) <= {"click"}, args


@pytest.mark.parametrize(
    "args",
    [
        ["run", "--delay", "50ms", "--", "echo", "hi"],
        ["run", "--no-wait", "--delay", "50ms", "--key", "k", "--", "true"],
        ["run", "-q", "--on-busy", "restart", "--throttle", "100ms", "--json", "true"],
        # A fleet run (refused here: this world has no store) costs the client nothing more.
        ["run", "--fleet", "--delay", "0", "--", "true"],
    ],
)
def test_a_plain_run_does_not_even_import_click(world, args):
    assert _loaded(world, args) == [], args
