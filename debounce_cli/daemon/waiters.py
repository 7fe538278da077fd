"""Who waits for a run, and who is owed an answer: the interfaces the core delivers to.

A client connection and the stdin source are both waiters; the core never needs to know
which. A waiter may stand for several coalesced invocations, so deliveries go through
:func:`unique`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Protocol

from debounce_cli import protocol
from debounce_cli.daemon import records
from debounce_cli.scheduler import Invocation, Run


class Waiter(Protocol):
    """Who waits for an invocation's run: a client connection, or the stdin source."""

    def raw(self, line: bytes) -> None:
        """An encoded progress message (Pending)."""

    def follows(self, run_id: int) -> bool:
        """Has it been told this run started (and so gets its output live)?"""

    def start(self, run_id: int, line: bytes, log: str | None) -> None:
        """The run started (``line`` is the encoded Started message; ``log`` its output log,
        where a waiter that falls behind catches up)."""

    def output(self, fd: int, data: bytes, line: bytes, end: int | None) -> None:
        """A chunk of the run's output (``line`` is the encoded Output message; ``end`` is
        where its record ends in the run's log, ``None`` when it is in no log)."""

    def replay(self, so_far: Callable[[], Iterable[tuple[int, bytes]]]) -> None:
        """Just joined a run that is executing: its output so far, before any live chunk."""

    def finish(self, msg: protocol.Message) -> None:
        """Finished or Cancelled: the waiter's last message."""


class Submitter(Protocol):
    """Who is owed the answer to a submission once the turn's commit is done."""

    def answered(self, msg: protocol.Message) -> None: ...

    def accepted(self, inv: Invocation, now: float) -> None:
        """The answer is ``records.accepted_line(inv, now)``: made only by a submitter that
        sends it."""


def unique(waiters: Iterable[Any]) -> list[Any]:
    """One delivery per waiter, even when it stands for several coalesced invocations."""
    return list(dict.fromkeys(waiters))


class RunWaiters:
    """A local run's audience (``jobs.Audience``): its waiters, as ``daemon.runs`` tells them
    it started and its output, each message encoded once for all of them. The list is read
    at each chunk: waiters join and leave while the run executes."""

    def __init__(self, run: Run) -> None:
        self.run = run

    def started(self, log: str | None) -> None:
        if not self.run.waiters:  # (--no-wait runs have nobody to tell: no message to build)
            return
        line = protocol.encode(records.started_msg(self.run))
        for waiter in unique(self.run.waiters):
            waiter.start(self.run.id, line, log)

    def output(self, fd: int, data: bytes, end: int | None) -> None:
        line = records.output_line(fd, data)
        run_id = self.run.id
        for waiter in unique(self.run.waiters):
            if waiter.follows(run_id):
                waiter.output(fd, data, line, end)
