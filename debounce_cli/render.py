"""What people see: the live waiting line on a terminal, and JSON and text results.

Nothing here imports rich at module level: the waiting line is one line of plain ANSI, so a
waiting client on a terminal starts as fast as one on a pipe.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from typing import Any

from debounce_cli import protocol
from debounce_cli.client import Display
from debounce_cli.durations import format_duration


class QuietDisplay(Display):
    """Pipes and ``--quiet``: nothing about the wait itself."""


class TerminalDisplay(Display):
    """One status line on stderr while waiting, cleared when the run starts."""

    refresh = 0.1

    def __init__(self, stream: Any = None):
        self.stream = stream or sys.stderr
        self.color = "NO_COLOR" not in os.environ
        self.key = ""
        self.state = ""
        self.due_at: float | None = None
        self.coalesced = 1
        self.shown = False
        self.waiting = True

    def pending(self, msg: protocol.Accepted | protocol.Pending) -> None:
        self.key = msg.key
        self.coalesced = msg.coalesced
        self.state = msg.state
        self.due_at = None if msg.due_in is None else time.monotonic() + msg.due_in
        self.waiting = msg.state not in ("running", "finished")
        self.tick()

    def started(self, msg: protocol.Started) -> None:
        self.waiting = False
        self._clear()

    def tick(self) -> None:
        if not self.waiting:
            return
        if self.state == "queued":
            when = "queued for a job slot"
        elif self.due_at is not None:
            left = self.due_at - time.monotonic()
            when = f"due in {format_duration(max(0.0, left))}" if left > 0 else "due, key busy"
        else:
            when = self.state
        count = f"{self.coalesced} coalesced" if self.coalesced != 1 else "1 invocation"
        text = f"debounce: waiting for {self.key} · {when} · {count}"
        width = shutil.get_terminal_size((80, 24)).columns
        if len(text) > width - 1:
            text = text[: max(0, width - 2)] + "…"
        if self.color:
            text = f"\x1b[2m{text}\x1b[0m"
        self._write(f"\r\x1b[2K{text}")
        self.shown = True

    def close(self) -> None:
        self._clear()

    def _clear(self) -> None:
        if self.shown:
            self._write("\r\x1b[2K")
            self.shown = False

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):
            pass


def iso(ts: float) -> str:
    """UTC ISO 8601 with milliseconds, as the JSON output and history use."""
    from datetime import datetime, timezone

    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z"
    )


def finished_json(msg: protocol.Finished) -> str:
    """The ``--json`` object of ``debounce run`` and ``debounce wait``."""
    return json.dumps(
        {
            "run_id": msg.run_id,
            "key": msg.key,
            "argv": msg.argv,
            "exit_code": msg.exit_code,
            "coalesced": msg.coalesced,
            "started_at": iso(msg.started_at),
            "finished_at": iso(msg.finished_at),
            "duration": round(msg.finished_at - msg.started_at, 3),
            "outcome": msg.outcome,
        }
    )


def status_text(reply: protocol.StatusReply) -> str:
    """``debounce status`` on a pipe: one stable tab-separated line per key."""
    lines = []
    for row in reply.keys:
        pending, running = row["pending"], row["running"]
        if running:
            lines.append(
                f"running\t{row['key']}\trun {running['run_id']}\t"
                f"{running['coalesced']} coalesced\t"
                f"for {format_duration(max(0.0, time.time() - running['started_at']))}"
            )
        if pending:
            lines.append(
                f"{pending['state']}\t{row['key']}\tdue in {format_duration(pending['due_in'])}\t"
                f"{pending['coalesced']} coalesced"
            )
    return "\n".join(lines)


def status_json(reply: protocol.StatusReply) -> str:
    return json.dumps({"pid": reply.pid, "jobs": reply.jobs, "keys": reply.keys})


def history_text(runs: list[dict[str, Any]]) -> str:
    """``debounce history`` on a pipe: one stable tab-separated line per run."""
    import shlex

    lines = []
    for run in runs:
        code = "-" if run["exit_code"] is None else str(run["exit_code"])
        duration = (run["finished_at"] or run["started_at"]) - run["started_at"]
        lines.append(
            f"{run['run_id']}\t{code}\t{run['outcome']}\t{iso(run['started_at'])}\t"
            f"{format_duration(duration)}\t{run['coalesced']}\t{run['key']}\t"
            f"{shlex.join(run['argv'])}"
        )
    return "\n".join(lines)


def history_json(runs: list[dict[str, Any]]) -> str:
    """One JSON object per line, timestamps in ISO 8601."""
    out = []
    for run in runs:
        row = dict(run)
        row["started_at"] = iso(run["started_at"])
        row["finished_at"] = iso(run["finished_at"]) if run["finished_at"] else None
        row["duration"] = round((run["finished_at"] or run["started_at"]) - run["started_at"], 3)
        out.append(json.dumps(row))
    return "\n".join(out)
