"""One function per request: ``handle_<request>(ctx, client, request)``.

Each returns the message to answer with, or ``None`` when the answer comes later (a
submission is answered after the commit that holds it; a waiter gets the run's events). An
Error answer ends the connection. Handlers see the daemon only through :class:`Context` and
the client only through :class:`Client`, so their tests need neither sockets nor a loop.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from debounce_cli import protocol
from debounce_cli.daemon import records
from debounce_cli.daemon.core import Core, run_id_of
from debounce_cli.daemon.jobs import check_job
from debounce_cli.daemon.waiters import Submitter, Waiter
from debounce_cli.options import KILL_SIGNALS
from debounce_cli.protocol import ProtocolError
from debounce_cli.scheduler import Invocation, Options, Run
from debounce_cli.states import FINISHED, NOT_FOUND, REFUSED

TYPE_CHECKING = False
if TYPE_CHECKING:
    from debounce_cli.daemon.fleet.coordinator import Fleet


@dataclass(eq=False)
class Context:
    """What request handlers may use of the daemon."""

    core: Core
    jobs: int | None  # the daemon's --jobs, for status
    shutdown: Callable[[], None]  # SIGTERM's way out (``debounce stop``)
    fleet: Fleet | None = None  # with a store (--store, DEBOUNCE_STORE)


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
    if options.fleet:
        return _fleet_run(ctx, client, req, options)
    refusal = core.refusal()
    if refusal:
        return protocol.Error(message=refusal, code=REFUSED)
    client.owe(wait=req.wait)
    job = core.shared.job(req.argv, req.cwd, req.env)
    core.submit(req.key, options, job, client if req.wait else None, client)
    return None


NO_STORE = ("--fleet needs a store: set DEBOUNCE_STORE=redis://host:port/db (this daemon was "
            "started without one: 'debounce stop' first)")
#: The same for a ``daemon --stdin`` line: that daemon is the user's own foreground process,
#: so the way out is an option of it, not ``debounce stop``.
NO_STORE_STDIN = ('"fleet": true needs a store: start this daemon with --store '
                  "redis://host:port/db (or with DEBOUNCE_STORE set)")


def _fleet_run(ctx: Context, client: Client, req: protocol.RunRequest,
               options: Options) -> Reply:
    if ctx.fleet is None:
        return protocol.Error(message=NO_STORE)
    client.owe(wait=req.wait)
    job = ctx.core.shared.job(req.argv, req.cwd, req.env)
    ctx.fleet.submit(req.key, options, job, client if req.wait else None, client)
    return None


def _later(ctx: Context, client: Client, answer: Callable[[], Awaitable[protocol.Message]]
           ) -> Reply:
    """Answer a request once the store has been asked (a fleet key); the connection holds
    its next request until then. The store being down is a refusal (116)."""
    from debounce_cli.daemon.fleet.layout import StoreDown

    async def ask() -> None:
        try:
            reply = await answer()
        except StoreDown as exc:
            reply = protocol.Error(message=str(exc), code=REFUSED)
        client.answered(reply)

    client.owe(wait=False)
    assert ctx.fleet is not None
    ctx.fleet.spawn(ask())
    return None


def _in_fleet(ctx: Context, client: Client, command: str,
              answer: Callable[[Fleet], Awaitable[protocol.Message]]) -> Reply:
    """``status --fleet`` and ``history --fleet``: answered from the store, or refused when
    this daemon has none."""
    fleet = ctx.fleet
    if fleet is None:
        return protocol.Error(message=NO_STORE.replace("--fleet", f"{command} --fleet", 1))
    return _later(ctx, client, lambda: answer(fleet))


@dataclass(frozen=True)
class Named:
    """What a KEY|RUN_ID argument names: a key, or a run by its id.

    ``bare`` is the text of a bare number that names no key here, read as a run id: if no
    such run is found, the fleet may still know a key by that name.
    """

    key: str | None = None
    run_id: int | None = None
    bare: str | None = None

    def missing(self) -> str:
        """What was looked for, for a "not found" line."""
        if self.key is not None:
            return f"key {protocol.shown(self.key)}"
        if self.bare is not None:
            return f"run {self.run_id} (nor key {protocol.shown(self.bare)})"
        return f"run {self.run_id}"


def resolve(core: Core, target: str, by: str | None) -> Named | protocol.Error:
    """Read ``target`` as ``by`` says ("key" or "run"); left open, a bare number is a run id
    unless it is a key here: one that is both is refused, naming both ways to say it."""
    if by not in (None, "key", "run"):
        return protocol.Error(message=f"'by' must be \"key\" or \"run\", not {by!r}")
    run_id = run_id_of(target)
    if by == "run":
        if run_id is None:
            return protocol.Error(message=f"a run id is a number, not {protocol.shown(target)}")
        return Named(run_id=run_id)
    if by == "key" or run_id is None:
        return Named(key=target)
    if not core.knows_key(target):
        return Named(run_id=run_id, bare=target)
    if core.knows_run(run_id):
        quoted = protocol.shell_word(target)
        return protocol.Error(
            message=f"{protocol.shown(target)} is both a key and a run id; write --key {quoted} "
            f"or "
            f"--run {quoted}")
    return Named(key=target)


def handle_wait(ctx: Context, client: Client, req: protocol.WaitRequest) -> Reply:
    """Follow what is pending or running; when nothing is, the result of the last run."""
    core = ctx.core
    if req.by == "invocation":
        return _wait_invocation(ctx, client, req.target)
    named = resolve(core, req.target, req.by)
    if isinstance(named, protocol.Error):
        return named
    if named.key is not None:
        target: Invocation | Run | None = core.find_key(named.key)
    else:
        assert named.run_id is not None
        target = core.find_run(named.run_id)
    if target is None:
        record = core.stored_run(named.key, named.run_id)
        if record is not None:
            return record.finished()
        if ctx.fleet is not None:
            return _fleet_wait(ctx, client, named)
        return protocol.Error(message=f"no {named.missing()} pending, running or finished",
                              code=NOT_FOUND)
    client.wait_for_runs(acked=True)
    if isinstance(target, Invocation):
        client.send(records.pending_msg(target, core.clock.monotonic()))
    core.attach(target, client)
    return None


def covering(ctx: Context, target: str) -> Invocation | Run | protocol.Message:
    """What stands for the invocation named by ``target`` (an id ``run --json`` printed):
    the pending invocation or executing run to follow, the finished run's record, a
    ``Cancelled``, or an Error that says why nothing does."""
    inv_id = run_id_of(target)
    if inv_id is None:
        return protocol.Error(
            message=f"an invocation id is a number, not {protocol.shown(target)}")
    found = ctx.core.find_invocation(inv_id)
    if isinstance(found, str):
        return protocol.Cancelled(key=found)
    if found is None:
        return protocol.Error(
            message=f"no invocation {inv_id} pending, running or in this daemon's history "
            "(ids are per daemon; its run may be older than the history keeps)",
            code=NOT_FOUND)
    return found


def _wait_invocation(ctx: Context, client: Client, target: str) -> Reply:
    """``wait --invocation N``: follow the run that stands for invocation N (a fleet
    invocation this daemon accepted: through the store)."""
    found = covering(ctx, target)
    fleet = ctx.fleet
    if _not_found(found) and fleet is not None:
        inv_id = run_id_of(target)
        assert inv_id is not None
        client.wait_for_runs(acked=True)

        async def follow() -> None:
            from debounce_cli.daemon.fleet.layout import StoreDown

            try:
                reply = await fleet.wait_invocation(inv_id, client)
            except StoreDown as exc:
                reply = protocol.Error(message=str(exc), code=REFUSED)
            if isinstance(reply, protocol.Error):
                client.send(reply)
                client.close()
            elif reply is not None:
                client.finish(reply)

        fleet.spawn(follow())
        return None
    if isinstance(found, protocol.RunRecord):
        return found.finished()
    if isinstance(found, protocol.Message):
        return found
    client.wait_for_runs(acked=True)
    if isinstance(found, Invocation):
        client.send(records.pending_msg(found, ctx.core.clock.monotonic()))
    ctx.core.attach(found, client)
    return None


def _history_of_invocation(ctx: Context, client: Client, inv_id: int) -> Reply:
    """``history --invocation N``: the finished run that stood for invocation N, or one line
    that says where N stands instead."""
    found = covering(ctx, str(inv_id))
    if _not_found(found) and ctx.fleet is not None:
        return _in_fleet(ctx, client, "history", lambda fleet: fleet.covering(inv_id))
    if isinstance(found, protocol.RunRecord):
        return protocol.HistoryReply(runs=[found])
    if isinstance(found, Run) and found.state == FINISHED:
        return protocol.HistoryReply(runs=[records.run_record(found)])
    if isinstance(found, protocol.Cancelled):
        return protocol.Error(message=f"invocation {inv_id} was cancelled before it ran "
                              f"(key {protocol.shown(found.key)})", code=NOT_FOUND)
    if isinstance(found, protocol.Message):
        return found
    what = "it is pending" if isinstance(found, Invocation) else "its run is executing"
    return protocol.Error(
        message=f"invocation {inv_id} has not finished: {what} "
        f"(key {protocol.shown(found.key)}); debounce wait --invocation {inv_id} waits for it",
        code=NOT_FOUND)


def _fleet_wait(ctx: Context, client: Client, named: Named) -> Reply:
    """``wait`` on a key or run this daemon does not know: the fleet's, if it is one (a bare
    number: the fleet's key of that name, else its run of that id)."""
    from debounce_cli.daemon.fleet.layout import StoreDown

    fleet = ctx.fleet
    assert fleet is not None
    client.wait_for_runs(acked=True)
    key = named.key if named.bare is None else named.bare
    run_id = named.run_id

    async def follow() -> None:
        try:
            reply = await fleet.wait(key, client) if key is not None else None
            if run_id is not None and (key is None or _not_found(reply)):
                reply = await fleet.wait_run(run_id, client)
        except StoreDown as exc:
            reply = protocol.Error(message=str(exc), code=REFUSED)
        if isinstance(reply, protocol.Error):
            client.send(reply)
            client.close()
        elif reply is not None:
            client.finish(reply)

    fleet.spawn(follow())
    return None


def _not_found(reply: object) -> bool:
    return isinstance(reply, protocol.Error) and reply.code == NOT_FOUND


def handle_status(ctx: Context, client: Client, req: protocol.StatusRequest) -> Reply:
    if req.fleet:
        async def rows(fleet: Fleet) -> protocol.Message:
            return protocol.StatusReply(keys=await fleet.status(), pid=os.getpid(),
                                        jobs=ctx.jobs)

        return _in_fleet(ctx, client, "status", rows)
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

    return _later(ctx, client, lambda: with_fleet(fleet))


def handle_history(ctx: Context, client: Client, req: protocol.HistoryRequest) -> Reply:
    if req.invocation is not None and not req.fleet:
        return _history_of_invocation(ctx, client, req.invocation)
    if req.fleet:
        async def fleet_runs(fleet: Fleet) -> protocol.Message:
            return protocol.HistoryReply(runs=await fleet.history(req.key, max(0, req.limit)))

        return _in_fleet(ctx, client, "history", fleet_runs)
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

    return _later(ctx, client, lambda: with_fleet(fleet))


def handle_logs(ctx: Context, client: Client, req: protocol.LogsRequest) -> Reply:
    """Where the log of a running run, or of a finished one, is; the client reads it."""
    core = ctx.core
    named = resolve(core, req.target, req.by)
    if isinstance(named, protocol.Error):
        return named
    if named.key is not None:
        ks = core.scheduler.keys.get(named.key)
        run = ks.running if ks is not None else None
    else:
        assert named.run_id is not None
        run = core.scheduler.runs.get(named.run_id)
    if run is not None:
        core.runs.log_of(run.id)  # its log is on disk once the client reads it (made lazily)
        return protocol.LogsReply(run_id=run.id, key=run.key,
                                  log_path=records.job_of(run.invocation).log_path, running=True)
    record = core.stored_run(named.key, named.run_id)
    if record is None and ctx.fleet is not None:
        fleet, key, run_id, bare = ctx.fleet, named.key, named.run_id, named.bare

        async def fleet_logs() -> protocol.Message:
            if bare is not None:  # the fleet's key of that name, else its run of that id
                reply = await fleet.logs(bare)
                if not _not_found(reply):
                    return reply
            return await fleet.logs(key, run_id)

        return _later(ctx, client, fleet_logs)
    if record is None:
        if named.bare is not None:
            what = (f"no run {named.run_id} is known (nor a run of key "
                    f"{protocol.shown(named.bare)})")
        elif named.key is not None:
            what = f"no run of key {protocol.shown(named.key)} is known"
        else:
            what = f"no run of id {named.run_id} is known"
        return protocol.Error(message=what, code=NOT_FOUND)
    if not record.log_path:
        return protocol.Error(message=f"the log of run {record.run_id} is no longer kept",
                              code=NOT_FOUND)
    ended = core.find_run(record.run_id)
    if ended is not None:
        core.runs.log_of(ended.id)  # a run that ended in a burst may have left it unmade
    return protocol.LogsReply(run_id=record.run_id, key=record.key, log_path=record.log_path,
                              running=False)


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

    return _later(ctx, client, fleet_act)


def handle_kill(ctx: Context, client: Client, req: protocol.KillRequest) -> Reply:
    """Stop what runs for a key (or run N); its waiters get its real status."""
    core = ctx.core
    if req.signal is not None and req.signal not in KILL_SIGNALS:
        return protocol.Error(
            message=f"--signal must be one of {', '.join(KILL_SIGNALS)}, not {req.signal!r}")
    named = resolve(core, req.target, req.by)
    if isinstance(named, protocol.Error):
        return named
    if named.key is not None:
        ks = core.scheduler.keys.get(named.key)
        run = ks.running if ks is not None else None
    else:
        assert named.run_id is not None
        run = core.scheduler.runs.get(named.run_id)
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

        return _later(ctx, client, fleet_kill)
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
