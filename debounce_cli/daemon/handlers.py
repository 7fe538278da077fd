"""One function per request: ``handle_<request>(ctx, client, request)``.

Each returns the message to answer with, or ``None`` when the answer comes later (a
submission is answered after the commit that holds it; a waiter gets the run's events). An
Error answer ends the connection. Handlers see the daemon only through ``context.Context``
and the client only through ``context.Client``. Those that name something to follow or look
up (``wait``, ``logs``, ``--invocation``) are in ``lookup``; the table is here.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from typing import Any

from debounce_cli import protocol
from debounce_cli.daemon.context import (
    NO_STORE,
    NO_STORE_STDIN,
    Client,
    Context,
    Reply,
    in_fleet,
    later,
)
from debounce_cli.daemon.core import Core
from debounce_cli.daemon.jobs import check_job
from debounce_cli.daemon.lookup import (
    executing,
    handle_logs,
    handle_wait,
    history_of_invocation,
    resolve,
)
from debounce_cli.options import KILL_SIGNALS
from debounce_cli.protocol import ProtocolError
from debounce_cli.scheduler import Options
from debounce_cli.states import NOT_FOUND, REFUSED

TYPE_CHECKING = False
if TYPE_CHECKING:
    from debounce_cli.daemon.fleet.coordinator import Fleet

__all__ = ["HANDLERS", "NO_STORE_STDIN", "Client", "Context"]


def handle_run(ctx: Context, client: Client, req: protocol.RunRequest) -> Reply:
    """Submit an invocation; accepted (or refused) once the commit is done."""
    core = ctx.core
    try:
        options = core.shared.options(req.options)
        check_job(req.argv, req.cwd, req.key)
    except (ProtocolError, ValueError) as exc:
        return protocol.Error(message=str(exc))
    if options.fleet:
        return _fleet_run(ctx, client, req, options)
    refusal = core.refusal()
    if refusal:
        return protocol.Error(message=refusal, code=REFUSED)
    client.owe(wait=req.wait)
    job = core.shared.job(req.argv, req.cwd, req.env)
    core.submit(req.key, options, job, client if req.wait else None, client)
    return None


def _fleet_run(ctx: Context, client: Client, req: protocol.RunRequest,
               options: Options) -> Reply:
    if ctx.fleet is None:
        return protocol.Error(message=NO_STORE)
    client.owe(wait=req.wait)
    job = ctx.core.shared.job(req.argv, req.cwd, req.env)
    ctx.fleet.submit(req.key, options, job, client if req.wait else None, client)
    return None


def handle_status(ctx: Context, client: Client, req: protocol.StatusRequest) -> Reply:
    if req.fleet:
        async def rows(fleet: Fleet) -> protocol.Message:
            return protocol.StatusReply(keys=await fleet.status(), pid=os.getpid(),
                                        jobs=ctx.jobs)

        return in_fleet(ctx, client, "status", rows)
    local = ctx.core.status()
    fleet = ctx.fleet
    here = set() if fleet is None else fleet.keys_here()
    if fleet is None or not here:
        return protocol.StatusReply(keys=local, pid=os.getpid(), jobs=ctx.jobs)

    async def with_fleet(fleet: Fleet) -> protocol.Message:
        """This daemon's keys and the fleet keys it has a pending invocation or a run of,
        from the store (their rows carry ``host``); a store that does not answer leaves the
        local keys alone."""
        from debounce_cli.daemon.fleet.layout import StoreDown

        try:
            rows = [row for row in await fleet.status() if row.key in here]
        except StoreDown:
            rows = []
        keys = sorted(local + rows, key=lambda row: (row.key, row.host is not None))
        return protocol.StatusReply(keys=keys, pid=os.getpid(), jobs=ctx.jobs)

    return later(ctx, client, lambda: with_fleet(fleet))


def handle_history(ctx: Context, client: Client, req: protocol.HistoryRequest) -> Reply:
    if req.invocation is not None and not req.fleet:
        return history_of_invocation(ctx, client, req.invocation)
    if req.fleet:
        async def fleet_runs(fleet: Fleet) -> protocol.Message:
            return protocol.HistoryReply(runs=await fleet.history(req.key, max(0, req.limit)))

        return in_fleet(ctx, client, "history", fleet_runs)
    limit = max(0, req.limit)
    runs = ctx.core.history(req.key, limit)
    fleet = ctx.fleet
    if fleet is None:
        return protocol.HistoryReply(runs=runs)

    async def with_fleet(fleet: Fleet) -> protocol.Message:
        """This daemon's runs and the fleet runs that executed on this host (their rows
        carry ``host``), newest first; a store that does not answer leaves the local ones."""
        from debounce_cli.daemon.fleet.layout import StoreDown

        try:
            ours = [row for row in await fleet.history(req.key, limit)
                    if row.host == fleet.link.host]
        except StoreDown:
            ours = []
        rows = sorted(runs + ours, key=lambda row: row.finished_at or 0.0, reverse=True)
        return protocol.HistoryReply(runs=rows[:limit])

    return later(ctx, client, lambda: with_fleet(fleet))


def _key_of(core: Core, key: str, by: str | None) -> str | protocol.Error:
    """The key a flush or cancel is about: KEY, or the key of run N (``--run N``)."""
    named = resolve(core, key, by)
    if isinstance(named, protocol.Error):
        return named
    if named.key is not None:
        return named.key
    assert named.run_id is not None
    run = core.find_run(named.run_id)
    if run is not None:
        return run.key
    record = core.stored_run(run_id=named.run_id)
    if record is None and named.bare is not None:
        return named.bare  # no such run either: a key of that name (the fleet's, perhaps)
    if record is None:
        return protocol.Error(message=f"no run {named.run_id} is known", code=NOT_FOUND)
    return record.key


def handle_flush(ctx: Context, client: Client, req: protocol.FlushRequest) -> Reply:
    fleet = ctx.fleet.flush if ctx.fleet is not None else None
    return _on_pending(ctx, client, ctx.core.flush, fleet, "flushed",
                       _key_of(ctx.core, req.key, req.by))


def handle_cancel(ctx: Context, client: Client, req: protocol.CancelRequest) -> Reply:
    fleet = ctx.fleet.cancel if ctx.fleet is not None else None
    return _on_pending(ctx, client, ctx.core.cancel, fleet, "cancelled",
                       _key_of(ctx.core, req.key, req.by))


def _on_pending(ctx: Context, client: Client, act: Callable[[str], bool],
                in_fleet: Callable[[str], Awaitable[bool]] | None, done: str,
                key: str | protocol.Error) -> Reply:
    """Act on what is pending for ``key`` here, else in the fleet: Done, or why not."""
    if isinstance(key, protocol.Error):
        return key
    if act(key):
        return protocol.Done(ok=True, message=f"{done} {key}")
    nothing = protocol.Error(message=f"nothing is pending for key {protocol.shown(key)}",
                             code=NOT_FOUND)
    if in_fleet is None:
        return nothing
    found_key: str = key

    async def fleet_act() -> protocol.Message:
        assert in_fleet is not None
        if await in_fleet(found_key):
            return protocol.Done(ok=True, message=f"{done} {found_key} (fleet)")
        return nothing

    return later(ctx, client, fleet_act)


def handle_kill(ctx: Context, client: Client, req: protocol.KillRequest) -> Reply:
    """Stop what runs for a key (or run N); its waiters get its real status."""
    core = ctx.core
    if req.signal is not None and req.signal not in KILL_SIGNALS:
        return protocol.Error(
            message=f"--signal must be one of {', '.join(KILL_SIGNALS)}, not {req.signal!r}")
    named = resolve(core, req.target, req.by)
    if isinstance(named, protocol.Error):
        return named
    run = executing(core, named)
    what = named.missing()
    if run is None and ctx.fleet is not None:
        fleet, key, run_id, bare = ctx.fleet, named.key, named.run_id, named.bare

        async def fleet_kill() -> protocol.Message:
            running = None
            if bare is not None:  # the fleet's key of that name, else its run of that id
                running = await fleet.kill(bare, req.signal)
            if running is None:
                running = await fleet.kill(key, req.signal, run_id)
            if running is None:
                return protocol.Error(message=f"nothing is running for {what}",
                                      code=NOT_FOUND)
            done = f"sent {req.signal} to" if req.signal else "stopping"
            of = f" of {key}" if key is not None else ""
            return protocol.Done(ok=True,
                                 message=f"{done} run {running.run}{of} on {running.host}")

        return later(ctx, client, fleet_kill)
    if run is None:
        return protocol.Error(message=f"nothing is running for {what}", code=NOT_FOUND)
    core.kill(run.id, req.signal)
    done = f"sent {req.signal} to" if req.signal else "stopping"
    return protocol.Done(ok=True, message=f"{done} run {run.id} of {run.key}")


def handle_stop(ctx: Context, client: Client, req: protocol.StopRequest) -> Reply:
    """Answer first, then shut down: the client learns the daemon heard it before it goes."""
    client.send(protocol.Done(ok=True, message="stopping"))
    client.close()
    ctx.shutdown()
    return None


def handle_metrics(ctx: Context, client: Client, req: protocol.MetricsRequest) -> Reply:
    """The metrics in the Prometheus text format, as ``--metrics-listen`` serves them."""
    from debounce_cli.daemon.metrics import text_of

    return protocol.MetricsReply(text=text_of(ctx.core, ctx.fleet))


#: The handler of each request type (the hello is the connection's own business).
HANDLERS: dict[type[protocol.Message], Callable[[Context, Any, Any], Reply]] = {
    protocol.RunRequest: handle_run,
    protocol.WaitRequest: handle_wait,
    protocol.StatusRequest: handle_status,
    protocol.HistoryRequest: handle_history,
    protocol.LogsRequest: handle_logs,
    protocol.FlushRequest: handle_flush,
    protocol.CancelRequest: handle_cancel,
    protocol.KillRequest: handle_kill,
    protocol.StopRequest: handle_stop,
    protocol.MetricsRequest: handle_metrics,
}
