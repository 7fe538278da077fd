"""Requests that name something to follow or look up: a key, a run id (``KEY|RUN_ID``, or
said outright with ``--key``/``--run``), or an invocation id (``--invocation``): ``wait``,
``logs``, and which run covered an invocation (``history --invocation``).
"""

from __future__ import annotations

from dataclasses import dataclass

from debounce_cli import protocol
from debounce_cli.daemon import records
from debounce_cli.daemon.context import (
    Client,
    Context,
    Reply,
    follow_in_fleet,
    in_fleet,
    later,
    not_found,
)
from debounce_cli.daemon.core import Core, run_id_of
from debounce_cli.logfile import make_empty
from debounce_cli.scheduler import Invocation, Run
from debounce_cli.states import FINISHED, NOT_FOUND

TYPE_CHECKING = False
if TYPE_CHECKING:
    from debounce_cli.daemon.fleet.coordinator import Fleet


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


def executing(core: Core, named: Named) -> Run | None:
    """The run executing here for what ``named`` names (a key's, or run N)."""
    if named.key is not None:
        ks = core.scheduler.keys.get(named.key)
        return ks.running if ks is not None else None
    assert named.run_id is not None
    return core.scheduler.runs.get(named.run_id)


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
    if not_found(found) and ctx.fleet is not None:
        inv_id = run_id_of(target)
        assert inv_id is not None
        return follow_in_fleet(ctx, client, lambda fleet: fleet.wait_invocation(inv_id, client))
    if isinstance(found, protocol.RunRecord):
        return found.finished()
    if isinstance(found, protocol.Message):
        return found
    client.wait_for_runs(acked=True)
    if isinstance(found, Invocation):
        client.send(records.pending_msg(found, ctx.core.clock.monotonic()))
    ctx.core.attach(found, client)
    return None


def history_of_invocation(ctx: Context, client: Client, inv_id: int) -> Reply:
    """``history --invocation N``: the finished run that stood for invocation N, or one line
    that says where N stands instead."""
    found = covering(ctx, str(inv_id))
    if not_found(found) and ctx.fleet is not None:
        return in_fleet(ctx, client, "history", lambda fleet: fleet.covering(inv_id))
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
    key = named.key if named.bare is None else named.bare
    run_id = named.run_id

    async def ask(fleet: Fleet) -> protocol.Message | None:
        reply = await fleet.wait(key, client) if key is not None else None
        if run_id is not None and (key is None or not_found(reply)):
            reply = await fleet.wait_run(run_id, client)
        return reply

    return follow_in_fleet(ctx, client, ask)


def handle_logs(ctx: Context, client: Client, req: protocol.LogsRequest) -> Reply:
    """Where the log of a running run, or of a finished one, is; the client reads it."""
    core = ctx.core
    named = resolve(core, req.target, req.by)
    if isinstance(named, protocol.Error):
        return named
    run = executing(core, named)
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
                if not not_found(reply):
                    return reply
            return await fleet.logs(key, run_id)

        return later(ctx, client, fleet_logs)
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
    make_empty(record.log_path)  # a run that wrote nothing left no file (daemon.runs)
    return protocol.LogsReply(run_id=record.run_id, key=record.key, log_path=record.log_path,
                              running=False)
