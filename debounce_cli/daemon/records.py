"""The scheduler's objects as the protocol's records and messages: each built in one place.

``run_record`` is the one view of a run (history, ``wait``, ``--json``); the Started and
Finished messages derive from it. Times the scheduler keeps on the monotonic clock are turned
into "due in" seconds against ``now``.
"""

from __future__ import annotations

import binascii

from debounce_cli import protocol, states
from debounce_cli.daemon.jobs import Job
from debounce_cli.scheduler import Invocation, KeyState, Run


def job_of(inv: Invocation) -> Job:
    return job_of_payload(inv.payload)


def job_of_payload(payload: object) -> Job:
    assert isinstance(payload, Job)
    return payload


def run_record(run: Run) -> protocol.RunRecord:
    job = job_of(run.invocation)
    return protocol.RunRecord(
        run_id=run.id, key=run.key, argv=job.argv, cwd=job.cwd, exit_code=run.exit_code,
        coalesced=run.coalesced, started_at=run.started_wall, finished_at=run.finished_wall,
        outcome=run.outcome, due_at=run.due_wall, invocation=run.invocation.id,
        log_path=job.log_path, covered=run.covered.shown() if run.covered else [run.invocation.id],
    )


def started_msg(run: Run) -> protocol.Started:
    return run_record(run).started()


def finished_msg(run: Run) -> protocol.Finished:
    """The result of a finished run (the scheduler sets its outcome and times when it ends)."""
    return run_record(run).finished()


def due_in(inv: Invocation, now: float) -> float:
    return max(0.0, inv.due - now)


def pending_msg(inv: Invocation, now: float) -> protocol.Pending:
    return protocol.Pending(key=inv.key, state=inv.state, due_in=due_in(inv, now),
                            coalesced=inv.coalesced)


def accepted_line(inv: Invocation, now: float) -> bytes:
    """Where a submission landed (the invocation that stands for it now, or its run), as
    the encoded Accepted answer (``protocol.accepted_line``: made without the message)."""
    head = inv.head()
    if head.run is not None:
        return protocol.accepted_line(inv.id, head.key, head.run.state, None,
                                      head.run.coalesced)
    return protocol.accepted_line(inv.id, head.key, head.state, due_in(head, now),
                                  head.coalesced)


def output_line(fd: int, data: bytes) -> bytes:
    """One Output message, encoded once for all the waiters of a run."""
    return protocol.encode(
        protocol.Output(fd=fd, data=binascii.b2a_base64(data, newline=False).decode())
    )


def key_status(ks: KeyState, last: Run | None, now: float) -> protocol.KeyStatus:
    """One row of ``debounce status``."""
    pending = running = None
    if ks.pending is not None:
        inv = ks.pending
        job = job_of(inv)
        pending = protocol.PendingRow(id=inv.id, argv=job.argv, cwd=job.cwd, state=inv.state,
                                      due_in=due_in(inv, now), coalesced=inv.coalesced)
    if ks.running is not None:
        run = ks.running
        job = job_of(run.invocation)
        # Its process exists once it has a pid (daemon.runs sets it): until then the run is
        # decided but waits (for a place among the runs at once, the spawner, a commit).
        running = protocol.RunningRow(run_id=run.id, argv=job.argv,
                                      started_at=run.started_wall, coalesced=run.coalesced,
                                      stopping=run.stop_reason,
                                      state=states.RUNNING if job.pid is not None
                                      else states.STARTING)
    return protocol.KeyStatus(
        key=ks.key, pending=pending, running=running,
        last=None if last is None else protocol.LastRun(
            run_id=last.id, exit_code=last.exit_code, finished_at=last.finished_wall),
    )
