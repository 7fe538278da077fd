"""The client path stays light: no rich, asyncio, sqlite3 or watchfiles on a pipe."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("rich", "asyncio", "sqlite3", "watchfiles")

PROBE = f"""
import sys
from debounce_cli import cli
try:
    cli.main(sys.argv[1:])
except SystemExit as exc:
    status = exc.code
loaded = [m for m in {HEAVY!r} if m in sys.modules]
print("LOADED=" + ",".join(loaded), file=sys.__stderr__)
"""


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["run", "--help"],
        ["run", "--delay", "50ms", "--", "echo", "hi"],
        ["run", "--no-wait", "--delay", "50ms", "--", "true"],
        ["run", "--delay", "nope", "--", "true"],
    ],
)
def test_client_commands_on_a_pipe_import_nothing_heavy(world, args):
    """What `debounce run` loads on a pipe decides its start-up time on every event."""
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, *args],
        capture_output=True, text=True, env=world.env, cwd=world.work, timeout=30,
    )
    line = [x for x in proc.stderr.splitlines() if x.startswith("LOADED=")]
    assert line, proc.stderr
    assert line[-1] == "LOADED=", f"{args} imported {line[-1][7:]}"
