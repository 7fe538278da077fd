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
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TextIO

from debounce_cli import protocol, states
from debounce_cli.client import Display
from debounce_cli.durations import format_duration

if TYPE_CHECKING:
    from rich.console import Console


#: Seconds past due after which a fleet waiter's line says its store may be unreachable.
FLEET_LATE = 2.0


class TerminalDisplay(Display):
    """One live status line at the bottom of the terminal, on stderr.

    While waiting: the key, the countdown to due, how many invocations were coalesced. While
    the run goes: "running" and the time since it started, kept below the run's output: the
    line is cleared before each chunk of output and drawn again once the output has ended a
    line, so it never cuts into what the command prints.
    """

    refresh = 0.1

    def __init__(self, stream: TextIO | None = None):
        self.stream = stream or sys.stderr
        self.color = not os.environ.get("NO_COLOR")  # set and not empty (no-color.org)
        # A terminal that cannot move the cursor (TERM=dumb: Emacs shells, some CI logs) would
        # show every redraw as garbage: it gets no live line at all.
        self.live = os.environ.get("TERM") != "dumb"
        self.key = ""
        self.state = ""
        self.due_at: float | None = None
        self.started_at: float | None = None
        self.coalesced = 1
        self.shown = False
        self.waiting = True
        self.at_line_start = True
        #: A fleet key: past its due time it may wait for its store rather than its key.
        self.fleet = False

    def pending(self, msg: protocol.Accepted | protocol.Pending) -> None:
        self.key = msg.key
        self.state = msg.state
        if msg.state == protocol.STORE_UNREACHABLE:
            # Nothing about the key is known while its store is out: what was shown stays,
            # said to be on hold, until a Pending or Started from the store replaces it.
            self.waiting = True
            self.tick()
            return
        self.coalesced = msg.coalesced
        self.due_at = None if msg.due_in is None else time.monotonic() + msg.due_in
        self.waiting = msg.state not in ("running", "finished")
        self.tick()

    def started(self, msg: protocol.Started) -> None:
        self.waiting = False
        self.key = msg.key
        self.coalesced = msg.coalesced
        self.started_at = time.monotonic()
        self.tick()

    def output(self, fd: int, data: bytes, write: Callable[[int, bytes], None]) -> None:
        """Write a chunk of the run's output above the status line."""
        self._clear()
        write(fd, data)
        if data:
            self.at_line_start = data.endswith(b"\n")
        self.tick()

    def tick(self) -> None:
        if not self.at_line_start:
            return
        count = f"{self.coalesced} coalesced" if self.coalesced != 1 else "1 invocation"
        if self.started_at is not None:
            elapsed = format_duration(time.monotonic() - self.started_at)
            self._draw(f"debounce: running {self.key} · {elapsed} · {count}")
            return
        if not self.waiting:
            return
        if self.state == protocol.STORE_UNREACHABLE:
            when = "fleet store unreachable, waiting for it"
        elif self.state == "queued":
            when = "queued for a job slot"
        elif self.due_at is not None:
            left = self.due_at - time.monotonic()
            if left > 0:
                when = f"due in {format_duration(left)}"
            elif self.fleet and left < -FLEET_LATE:
                when = "due; key busy or store unreachable"
            else:
                when = "due, key busy"
        else:
            when = self.state
        self._draw(f"debounce: waiting for {self.key} · {when} · {count}")

    def _draw(self, text: str) -> None:
        if not self.live:
            return
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
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z"
    )


def finished_json(msg: protocol.Finished) -> str:
    """The ``--json`` object of ``debounce run`` and ``debounce wait``."""
    return json.dumps(protocol.json_safe(
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
    ))


def status_text(reply: protocol.StatusReply) -> str:
    """``debounce status`` on a pipe: one line per pending or running invocation, five
    tab-separated columns that never change (README says them): state, key, seconds (until
    due when pending or queued, since the start when running, since it was decided when
    starting), coalesced count, command.
    When a row is a fleet key (``--fleet``, or a fleet key of this host's), every line has a
    sixth column before the command: the host (``-`` for a local key)."""
    lines = []
    now = time.time()
    fleet = any(row.host is not None for row in reply.keys)
    for row in reply.keys:
        pending, running = row.pending, row.running
        host = f"{row.host or '-'}\t" if fleet else ""
        if running:
            lines.append(f"{running.state}\t{row.key}\t"
                         f"{max(0.0, now - running.started_at):.3f}\t"
                         f"{running.coalesced}\t{host}{_command(running.argv)}")
        if pending:
            lines.append(f"{pending.state}\t{row.key}\t{pending.due_in:.3f}\t"
                         f"{pending.coalesced}\t{host}{_command(pending.argv)}")
    return "\n".join(lines)


def _command(argv: list[str]) -> str:
    """A command line, shell-quoted, for a pipe: the whole of it."""
    import shlex

    return shlex.join(argv)


#: The most of a command a table cell shows; the rest is counted (``… [99,934 more
#: arguments]``): a run of 100,000 arguments is one row, not 16,000 lines.
TABLE_COMMAND = 200


def status_json(reply: protocol.StatusReply) -> str:
    """One JSON object; times in ISO 8601 as ``history --json`` gives them, bytes that are
    not UTF-8 as :func:`protocol.json_safe` says."""
    keys = [_iso_times(_without_host(row.to_dict())) for row in reply.keys]
    return json.dumps(protocol.json_safe({"pid": reply.pid, "jobs": reply.jobs, "keys": keys}),
                      default=_plain)


#: Fields of ``status --json`` that hold a moment (epoch seconds on the wire).
_MOMENTS = ("started_at", "finished_at", "due_at")


def _iso_times(value: Any) -> Any:
    """``value`` with every moment written in ISO 8601 (UTC), as in ``history --json``."""
    if isinstance(value, protocol.Record):
        value = value.to_dict()
    if type(value) is dict:
        return {name: (iso(item) if name in _MOMENTS and isinstance(item, (int, float))
                       else _iso_times(item)) for name, item in value.items()}
    if type(value) is list:
        return [_iso_times(item) for item in value]
    return value


def _without_host(row: dict[str, Any]) -> dict[str, Any]:
    """Only fleet rows carry ``host``."""
    if row.get("host", "") is None:
        del row["host"]
    return row


def _plain(obj: Any) -> Any:
    if isinstance(obj, protocol.Record):
        return obj.to_dict()
    raise TypeError(type(obj).__name__)


def _took(run: protocol.RunRecord) -> float:
    return (run.finished_at or run.started_at) - run.started_at


def history_text(runs: list[protocol.RunRecord]) -> str:
    """``debounce history`` on a pipe: one stable tab-separated line per run (with
    ``--fleet``, a host column before the key, as in the table)."""
    lines = []
    fleet = any(run.host is not None for run in runs)
    for run in runs:
        code = "-" if run.exit_code is None else str(run.exit_code)
        host = f"{run.host or '-'}\t" if fleet else ""
        lines.append(
            f"{run.run_id}\t{code}\t{run.outcome}\t{iso(run.started_at)}\t"
            f"{format_duration(_took(run))}\t{run.coalesced}\t{host}{run.key}\t"
            f"{_command(run.argv)}"
        )
    return "\n".join(lines)


#: The fields of ``debounce history --json``, in order.
HISTORY_FIELDS = ("run_id", "key", "argv", "cwd", "exit_code", "coalesced", "started_at",
                  "finished_at", "outcome", "due_at", "invocation", "covered")


def history_json(runs: list[protocol.RunRecord]) -> str:
    """One JSON object per line, timestamps in ISO 8601."""
    out = []
    for run in runs:
        row = {name: getattr(run, name) for name in HISTORY_FIELDS}
        row["started_at"] = iso(run.started_at)
        row["finished_at"] = iso(run.finished_at) if run.finished_at else None
        row["due_at"] = iso(run.due_at) if run.due_at else None
        row["duration"] = round(_took(run), 3)
        if run.host is not None:
            row["host"] = run.host
        out.append(json.dumps(protocol.json_safe(row)))
    return "\n".join(out)


def when(ts: float) -> str:
    """A local time for tables: the time of day today, the date and time before."""
    from datetime import datetime

    moment = datetime.fromtimestamp(ts)
    if moment.date() == datetime.now().date():
        return moment.strftime("%H:%M:%S")
    return moment.strftime("%Y-%m-%d %H:%M")


def _console() -> Console:
    from rich.console import Console

    return Console()  # rich itself honours NO_COLOR and the terminal's width


def _table(**kwargs: Any) -> Any:
    """A rich table, drawn in ASCII on a terminal that may not show box-drawing characters
    (TERM=dumb or unknown, as rich itself tells such a terminal)."""
    from rich import box
    from rich.table import Table

    if os.environ.get("TERM", "").lower() in ("dumb", "unknown"):
        kwargs["box"] = box.ASCII
    return Table(**kwargs)


def _cell(argv: list[str]) -> str:
    """A command for a table cell: shell-quoted, elided past :data:`TABLE_COMMAND`
    characters with a count of what is left out."""
    from rich.markup import escape

    return escape(protocol.command_line(argv, TABLE_COMMAND))


def status_table(reply: protocol.StatusReply) -> None:
    """``debounce status`` on a terminal: one row per key (a fleet key of this host's among
    local ones is marked "(fleet)", with its host)."""
    table = _table(title=f"debounce daemon {reply.pid}" + (f", {reply.jobs} jobs"
                                                          if reply.jobs else ""),
                   title_justify="left")
    fleet = any(row.host is not None for row in reply.keys)
    all_fleet = all(row.host is not None for row in reply.keys)  # status --fleet
    names = ["key", "state", "command", "due in / running for", "coalesced", "last"]
    if fleet:
        names.insert(2, "host")
    for name in names:
        table.add_column(name, overflow="fold")
    now = time.time()
    for row in reply.keys:
        last = row.last
        last_text = "" if not last else f"run {last.run_id}: exit {last.exit_code}"
        running, pending = row.running, row.pending
        host = [row.host or ""] if fleet else []
        mark = " (fleet)" if row.host is not None and not all_fleet else ""
        if running:
            colour = "bold green" if running.state == states.RUNNING else "green"
            table.add_row(row.key, f"[{colour}]{running.state}[/]{mark}", *host,
                          _cell(running.argv),
                          format_duration(max(0.0, now - running.started_at)),
                          str(running.coalesced), last_text)
        if pending:
            table.add_row("" if running else row.key, f"[yellow]{pending.state}[/]{mark}",
                          *host, _cell(pending.argv), format_duration(pending.due_in),
                          str(pending.coalesced), "" if running else last_text)
    if not reply.keys:
        _console().print(f"debounce daemon {reply.pid}: nothing pending or running")
        return
    _console().print(table)


def history_table(runs: list[protocol.RunRecord]) -> None:
    """``debounce history`` on a terminal."""
    table = _table()
    fleet = any(run.host is not None for run in runs)
    names = ["run", "exit", "outcome", "started", "took", "coalesced", "key", "command"]
    if fleet:
        names.insert(6, "host")
    for name in names:
        table.add_column(name, overflow="fold")
    for run in runs:
        code = run.exit_code
        style = "green" if code == 0 else "red"
        host = [run.host or ""] if fleet else []
        table.add_row(
            str(run.run_id), f"[{style}]{'-' if code is None else code}[/]", run.outcome or "",
            when(run.started_at), format_duration(_took(run)), str(run.coalesced), *host,
            run.key, _cell(run.argv),
        )
    _console().print(table)
