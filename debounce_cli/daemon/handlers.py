"""One function per request: ``handle_<request>(ctx, client, request)``.

Each returns the message to answer with, or ``None`` when the answer comes later (a
submission is answered after the commit that holds it; a waiter gets the run's events). An
Error answer ends the connection. Handlers see the daemon only through :class:`Context` and
the client only through :class:`Client`, so their tests need neither sockets nor a loop.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from debounce_cli import protocol
from debounce_cli.daemon import records
from debounce_cli.daemon.core import Core, run_id_of
from debounce_cli.daemon.jobs import check_job
from debounce_cli.daemon.waiters import Submitter, Waiter
from debounce_cli.protocol import ProtocolError
from debounce_cli.scheduler import Invocation
from debounce_cli.states import NOT_FOUND, REFUSED


@dataclass(eq=False)
class Context:
    """What request handlers may use of the daemon."""

    core: Core
    jobs: int | None  # the daemon's --jobs, for status
    shutdown: Callable[[], None]  # SIGTERM's way out (``debounce stop``)


class Client(Waiter, Submitter, Protocol):
    """What handlers may do with the connection a request came on."""

    def owe(self, wait: bool) -> None: ...

    def wait_for_runs(self, acked: bool) -> None: ...

    def send(self, msg: protocol.Message) -> None: ...

    def close(self) -> None: ...


Reply = protocol.Message | None


def handle_run(ctx: Context, client: Client, req: protocol.RunRequest) -> Reply:
    """Submit an invocation; accepted (or refused) once the commit is done."""
    core = ctx.core
    try:
        options = core.shared.options(req.options)
        check_job(req.argv, req.cwd, req.key)
    except (ProtocolError, ValueError) as exc:
        return protocol.Error(message=str(exc))
    refusal = core.refusal()
    if refusal:
        return protocol.Error(message=refusal, code=REFUSED)
    client.owe(wait=req.wait)
    job = core.shared.job(req.argv, req.cwd, req.env)
    core.submit(req.key, options, job, client if req.wait else None, client)
    return None


def handle_wait(ctx: Context, client: Client, req: protocol.WaitRequest) -> Reply:
    """Follow what is pending or running; when nothing is, the result of the last run."""
    core = ctx.core
    target = core.find(req.target)
    if target is None:
        record = core.stored_run(req.target)
        if record is not None:
            return record.finished()
        return protocol.Error(
            message=f"no key or run {req.target!r} pending, running or finished", code=NOT_FOUND)
    client.wait_for_runs(acked=True)
    if isinstance(target, Invocation):
        client.send(records.pending_msg(target, core.clock.monotonic()))
    core.attach(target, client)
    return None


def handle_status(ctx: Context, client: Client, req: protocol.StatusRequest) -> Reply:
    return protocol.StatusReply(keys=ctx.core.status(), pid=os.getpid(), jobs=ctx.jobs)


def handle_history(ctx: Context, client: Client, req: protocol.HistoryRequest) -> Reply:
    runs = ctx.core.history(req.key, max(0, req.limit))
    return protocol.HistoryReply(runs=runs)


def handle_logs(ctx: Context, client: Client, req: protocol.LogsRequest) -> Reply:
    """Where the log of a running run, or of a finished one, is; the client reads it."""
    core = ctx.core
    target = req.target
    ks = core.scheduler.keys.get(target)
    run = ks.running if ks is not None else None
    run_id = run_id_of(target)
    if run is None and run_id is not None:
        run = core.scheduler.runs.get(run_id)
    if run is not None:
        return protocol.LogsReply(run_id=run.id, key=run.key,
                                  log_path=records.job_of(run.invocation).log_path, running=True)
    record = core.stored_run(target)
    if record is None:
        return protocol.Error(message=f"no run of key or id {target!r} is known", code=NOT_FOUND)
    if not record.log_path:
        return protocol.Error(message=f"the log of run {record.run_id} is no longer kept",
                              code=NOT_FOUND)
    return protocol.LogsReply(run_id=record.run_id, key=record.key, log_path=record.log_path,
                              running=False)


def handle_flush(ctx: Context, client: Client, req: protocol.FlushRequest) -> Reply:
    if ctx.core.flush(req.key):
        return protocol.Done(ok=True, message=f"flushed {req.key}")
    return _nothing_pending(req.key)


def handle_cancel(ctx: Context, client: Client, req: protocol.CancelRequest) -> Reply:
    if ctx.core.cancel(req.key):
        return protocol.Done(ok=True, message=f"cancelled {req.key}")
    return _nothing_pending(req.key)


def handle_stop(ctx: Context, client: Client, req: protocol.StopRequest) -> Reply:
    """Answer first, then shut down: the client learns the daemon heard it before it goes."""
    client.send(protocol.Done(ok=True, message="stopping"))
    client.close()
    ctx.shutdown()
    return None


def _nothing_pending(key: str) -> protocol.Error:
    return protocol.Error(message=f"nothing is pending for key {key!r}", code=NOT_FOUND)


#: The handler of each request type (the hello is the connection's own business).
HANDLERS: dict[type[protocol.Message], Callable[[Context, Any, Any], Reply]] = {
    protocol.RunRequest: handle_run,
    protocol.WaitRequest: handle_wait,
    protocol.StatusRequest: handle_status,
    protocol.HistoryRequest: handle_history,
    protocol.LogsRequest: handle_logs,
    protocol.FlushRequest: handle_flush,
    protocol.CancelRequest: handle_cancel,
    protocol.StopRequest: handle_stop,
}
