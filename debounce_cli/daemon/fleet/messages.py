"""A fleet key's state and events as the protocol's messages and records: each built in one
place, as ``daemon.records`` does for local keys."""

from __future__ import annotations

from typing import Any

from debounce_cli import protocol, states
from debounce_cli.daemon.fleet import state as fs


def no_run(run_id: int) -> protocol.Error:
    return protocol.Error(message=f"no run {run_id} is known here or in the fleet",
                          code=states.NOT_FOUND)


def started(key: str, event: dict[str, Any]) -> protocol.Started:
    return protocol.Started(run_id=event["run"], invocation=event.get("inv", 0), key=key,
                            argv=event.get("argv", []), coalesced=event.get("coalesced", 1),
                            started_at=event.get("started_at", 0.0))


def finished(key: str, row: dict[str, Any]) -> protocol.Finished:
    code = row.get("exit_code")
    return protocol.Finished(
        run_id=row["run_id"], invocation=row.get("invocation") or 0, key=key,
        argv=row.get("argv", []), exit_code=-1 if code is None else code,
        coalesced=row.get("coalesced", 1), started_at=row.get("started_at", 0.0),
        finished_at=row.get("finished_at") or row.get("started_at", 0.0),
        outcome=row.get("outcome") or states.LOST)


def key_status(st: fs.KeyState, now: float) -> protocol.KeyStatus:
    pending = running = last = None
    host = None
    if st.pending is not None:
        p = st.pending
        pending = protocol.PendingRow(id=p.inv, argv=p.job["argv"], cwd=p.job["cwd"],
                                      state=states.QUEUED if p.queued else states.PENDING,
                                      due_in=max(0.0, p.due - now), coalesced=p.coalesced)
        host = p.host
    if st.running is not None:
        r = st.running
        running = protocol.RunningRow(run_id=r.run, argv=r.job["argv"], started_at=r.started_at,
                                      coalesced=r.coalesced, stopping=r.stopping)
        host = r.host
    if st.last is not None:
        last = protocol.LastRun(run_id=st.last.run, exit_code=st.last.exit_code,
                                finished_at=st.last.finished_at)
    return protocol.KeyStatus(key=st.key, pending=pending, running=running, last=last,
                              host=host)
