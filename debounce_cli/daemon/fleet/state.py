"""Every step taken on a fleet key's state (its record, :mod:`.record`, as the store keeps it).

Each step is a pure function of the state, the invocation or run it is about, and the store's
time (``now``, Redis's ``TIME`` as the host reckons it): the store applies it at once (one
script that checks the state and time it was computed on), and the tests run it with
made-up times and no store. Every decision is the rules' own
(:mod:`debounce_cli.rules`, which the local scheduler calls too), so a fleet key debounces
exactly as a local one; what is here is the fleet's bookkeeping: slots, hosts, fencing tokens,
events.

A key has at most one pending invocation (the latest: it wins, with its host, argv, cwd and
environment) and at most one run. A pending invocation sits in a *slot*: the quiet period it
waits in, which later invocations take over, so waiters anywhere follow the slot to the run it
becomes. ``seq`` numbers slots and runs' fencing tokens: a step from a host that was away
(frozen, cut off) names a run whose token is no longer the key's, and changes nothing.

Every step returns the events it adds to the key's stream; every daemon with a waiter, a
pending invocation or a run of the key reads them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from debounce_cli import rules, states
from debounce_cli.daemon.fleet.covering import cover, covered_ids, covers, mark
from debounce_cli.daemon.fleet.record import Event as Event
from debounce_cli.daemon.fleet.record import KeyState as KeyState
from debounce_cli.daemon.fleet.record import Last as Last
from debounce_cli.daemon.fleet.record import Pending as Pending
from debounce_cli.daemon.fleet.record import Running as Running
from debounce_cli.rules import Options


# ---------------------------------------------------------------------- landing places
@dataclass(frozen=True, slots=True)
class InSlot:
    """The invocation waits in ``slot`` (its own, or one it took over)."""

    slot: int
    due: float
    coalesced: int
    state: str = states.PENDING


@dataclass(frozen=True, slots=True)
class InRun:
    """The invocation joined run ``run``, executing now (``--on-busy ignore``, or a burst's
    leading run with ``--no-trailing``)."""

    run: int
    coalesced: int


@dataclass(frozen=True, slots=True)
class Done:
    """The invocation joined a run that has already ended (``--no-trailing``)."""

    last: Last


@dataclass(frozen=True, slots=True)
class Gone:
    """A retried submission the store had taken before: nothing stands for it any more (it
    was cancelled, or the key has moved on past what it remembers)."""


Landed = InSlot | InRun | Done | Gone

#: Submission tokens a key remembers (see ``KeyState.tokens``).
TOKENS_KEPT = 64


def _where(st: KeyState, invocation: str) -> Landed:
    """Where an invocation the key took before stands now."""
    p, r, last = st.pending, st.running, st.last
    if p is not None and covers(p, invocation):
        return InSlot(p.slot, p.due, p.coalesced,
                      states.QUEUED if p.queued else states.PENDING)
    if r is not None and covers(r, invocation):
        return InRun(r.run, r.coalesced)
    if last is not None and covers(last, invocation):
        return Done(last)
    return Gone()


def _taken(st: KeyState, token: str) -> None:
    if token:
        st.tokens.append(token)
        del st.tokens[:-TOKENS_KEPT]


def _pending_event(p: Pending) -> Event:
    return {"t": "pending", "slot": p.slot, "due": p.due, "coalesced": p.coalesced,
            "host": p.host, "inv": p.inv, "queued": p.queued}


def submit(st: KeyState, *, inv: int, host: str, job: dict[str, Any], options: Options,
           now: float, token: str = "") -> tuple[Landed, list[Event]]:
    """One invocation of the key, from ``host``, at the store's time ``now``, where the
    rules land it. ``token`` names this submission: if the key's pending invocation already
    carries it, this is a retry of a transaction that went through, and nothing changes."""
    p = st.pending
    if token and p is not None and p.token == token:
        return InSlot(p.slot, p.due, p.coalesced), []
    if token and token in st.tokens:  # taken before, its answer lost: never twice
        return _where(st, mark(host, inv)), []
    _taken(st, token)
    running = st.running
    burst: Running | Last | None = None
    if st.burst_run is not None:
        if running is not None and running.run == st.burst_run:
            burst = running
        elif st.last is not None and st.last.run == st.burst_run:
            burst = st.last
    landing = rules.land(st, options, now, pending=p, running=running, burst=burst)
    kind = landing.kind
    this = [mark(host, inv)]
    if kind == rules.JOIN_RUN:
        assert running is not None
        cover(running, running, this)
        return InRun(running.run, landing.coalesced), []
    if kind == rules.JOIN_LEADER:
        assert p is not None
        cover(p, p, this)
        return InSlot(p.slot, p.due, p.coalesced), [_pending_event(p)]
    if kind == rules.JOIN_BURST:
        assert burst is not None
        cover(burst, burst, this)
        if isinstance(burst, Running):
            return InRun(burst.run, landing.coalesced), []
        assert isinstance(burst, Last)
        return Done(burst), []
    if p is not None:
        slot = p.slot
    else:
        st.seq += 1
        slot = st.seq
    batch = None
    if landing.collect and p is not None:
        batch = p.batch or [p.job["argv"]]
        batch.append(job["argv"])
    new = Pending(slot=slot, inv=inv, host=host, job=job, options=options,
                  due=landing.due, coalesced=landing.coalesced, lead=landing.lead,
                  received=now, token=token, queued=landing.keeps_place, batch=batch)
    if p is not None:
        cover(new, p, this)
    st.pending = new
    state = states.QUEUED if landing.keeps_place else states.PENDING
    return InSlot(slot, landing.due, landing.coalesced, state), [_pending_event(st.pending)]


# ---------------------------------------------------------------------- claiming a run
@dataclass(frozen=True, slots=True)
class Nothing:
    """Nothing to start: nothing pending, or it is another live host's to start."""


@dataclass(frozen=True, slots=True)
class Later:
    """Not due yet: look again at ``due``."""

    due: float


@dataclass(frozen=True, slots=True)
class Busy:
    """Due, but the key's run goes on; it is looked at again when that one finishes."""


@dataclass(frozen=True, slots=True)
class Queued:
    """Due, but this host's job slots are all taken (``daemon --jobs``): it waits for one
    and keeps its place (a later invocation that replaces it does not wait again)."""


@dataclass(frozen=True, slots=True)
class Start:
    """This host starts ``running`` now."""

    running: Running


Claim = Nothing | Later | Busy | Queued | Start


def claim(st: KeyState, *, host: str, now: float, run_id: int, may_take_over: bool,
          slot_free: bool = True, silent: float = 0.0) -> tuple[Claim, list[Event]]:
    """``host`` would start the key's pending invocation, if it is due and is its to start:
    its own, or (``may_take_over``) one whose host has gone silent. A retry of a claim that
    went through (``run_id`` is already the key's run, here) starts it all the same."""
    r = st.running
    if r is not None and r.run == run_id and r.host == host:
        return Start(r), []
    p = st.pending
    if p is None or (p.host != host and (not may_take_over or now - p.received < silent)):
        return Nothing(), []  # not ours; or its host was alive less than ``silent`` ago
    if p.due > now:
        return Later(p.due), []
    running = st.running
    decision = rules.fall_due(st, p, running, slot_free)
    if decision == rules.QUEUE:
        if p.queued:
            return Queued(), []
        p.queued = True
        return Queued(), [_pending_event(p)]
    if decision == rules.WAIT:
        return Busy(), []
    if decision == rules.RESTART:
        assert running is not None
        running.stopping = states.STOP_RESTART
        return Busy(), [{"t": "stop", "run": running.run, "fence": running.fence,
                         "why": states.STOP_RESTART}]
    if decision == rules.SIGNAL:
        # A server that reloads on a signal: tell it; this invocation joins that run.
        assert running is not None
        st.pending = None
        cover(running, running, covered_ids(p), p.covered_more)
        return Busy(), [{"t": "signal", "run": running.run, "fence": running.fence,
                         "sig": p.options.signal},
                        {"t": "moved", "slot": p.slot, "run": running.run}]
    st.seq += 1
    run = Running(run=run_id, slot=p.slot, inv=p.inv, host=host, fence=st.seq, job=p.job,
                  options=p.options, coalesced=p.coalesced, due=p.due, started_at=now,
                  batch=p.batch, covered=p.covered, covered_more=p.covered_more)
    st.running = run
    st.pending = None
    rules.started(st, p, now)
    st.burst_run = run_id
    return Start(run), [started_event(run)]


def started_event(run: Running) -> Event:
    return {"t": "started", "slot": run.slot, "run": run.run, "host": run.host,
            "argv": run.job["argv"], "coalesced": run.coalesced, "started_at": run.started_at,
            "inv": run.inv}


# ---------------------------------------------------------------------- ending a run
def finish(st: KeyState, *, run: Running, exit_code: int | None, outcome: str,
           now: float, ended: float | None = None) -> tuple[Last | None, list[Event]]:
    """``run`` ended (its host says so, with the fencing token it was started under), at
    ``ended`` on the store's clock as its host reckons it (else ``now``: a report delayed by
    a store outage does not make the run longer than it was).

    ``None`` when the key's state holds a newer fencing token: the run was given up as lost
    while its host was away, and that record stands. When the state has never heard of the
    token (the store lost data since the run started), the end is still recorded and its
    waiters everywhere are told."""
    r = st.running
    if r is None or r.run != run.run or r.fence != run.fence:
        if run.fence <= st.seq:
            return None, []
        st.seq = run.fence  # the store forgot this run: later tokens stay above its token
        r = run
    else:
        st.running = None
    outcome, follow = rules.ended(r.stopping, outcome, st.pending is not None, exit_code,
                                  r.signalled)
    last = Last(run=r.run, host=r.host, argv=r.job["argv"], cwd=r.job["cwd"],
                exit_code=exit_code, outcome=outcome, coalesced=r.coalesced,
                started_at=r.started_at,
                finished_at=now if ended is None else min(now, max(r.started_at, ended)),
                due=r.due, inv=r.inv, slot=r.slot, covered=r.covered,
                covered_more=r.covered_more)
    st.last = last
    event: Event = {"t": "finished", **last.record(st.key)}
    if follow:
        assert st.pending is not None
        # The run that replaces it stands for what it stood for, too (as locally).
        cover(st.pending, r, covered_ids(st.pending), st.pending.covered_more)
        event["then"] = st.pending.slot  # its waiters follow the run that replaces it
    return last, [event]


def unclaim(st: KeyState, *, run: Running, now: float) -> tuple[bool, list[Event]]:
    """``run`` was claimed but its host did not start it (the claim's answer came too late
    to start safely): the invocation is pending again, due now, on that host, and the run's
    waiters everywhere go back to its slot. Nothing if the run is no longer the key's (it
    was given up meanwhile, and that record stands)."""
    r = st.running
    if r is None or r.run != run.run or r.fence != run.fence:
        return False, []
    st.running = None
    if st.burst_run == r.run:
        st.burst_run = None
    p = st.pending
    if p is None:
        p = st.pending = Pending(slot=r.slot, inv=r.inv, host=r.host, job=r.job,
                                 options=r.options, due=now, coalesced=r.coalesced,
                                 received=now, batch=r.batch, covered=r.covered,
                                 covered_more=r.covered_more)
    else:  # a later invocation waits already: it stands for this one too
        p.coalesced += r.coalesced
        cover(p, r, covered_ids(p), p.covered_more)
    return True, [{"t": "returned", "run": r.run, "slot": p.slot}, _pending_event(p)]


def lose(st: KeyState, *, run: Running, now: float, silent: float = 0.0,
         seen: float | None = None) -> tuple[Last | None, list[Event]]:
    """``run`` was executing on a host that went silent: it is recorded lost (it may have
    run, so it is never started again). Only if it is still the key's run, under the same
    fencing token, and it had started at least ``silent`` before ``seen``, the store's time
    of the view of the heartbeats that found its host silent (``now`` without one): its
    start proves its host was alive then, so a host that just joined, and a view older than
    the run (a host judging with what it saw before it was frozen), never gets a live run
    taken for lost."""
    r = st.running
    heard = now if seen is None else min(now, seen)
    if r is None or r.run != run.run or r.fence != run.fence or heard - r.started_at < silent:
        return None, []
    return finish(st, run=r, exit_code=None, outcome=states.LOST, now=now)


# ---------------------------------------------------------------------- control
def flush(st: KeyState, *, now: float) -> tuple[bool, list[Event]]:
    """Make what is pending due now."""
    p = st.pending
    if p is None:
        return False, []
    if rules.flushed(p, now):
        return True, [_pending_event(p)]
    return True, []


def cancel(st: KeyState) -> tuple[bool, list[Event]]:
    """Drop what is pending; its waiters everywhere are told so."""
    p = st.pending
    if p is None:
        return False, []
    st.pending = None
    rules.cancelled(st)
    st.cancelled = covered_ids(p)
    return True, [{"t": "cancelled", "slot": p.slot}]


def kill(st: KeyState, *, signal: str | None, run: int | None = None
         ) -> tuple[Running | None, list[Event]]:
    """``debounce kill`` on a fleet key: stop its run (or send it ``signal``), wherever it
    executes; with ``run``, only if that is the run executing."""
    r = st.running
    if r is None or (run is not None and r.run != run):
        return None, []
    if signal is not None:
        if signal not in r.signalled:
            r.signalled.append(signal)
        return r, [{"t": "signal", "run": r.run, "fence": r.fence, "sig": signal}]
    if r.stopping is None:
        r.stopping = states.STOP_KILL
    return r, [{"t": "stop", "run": r.run, "fence": r.fence, "why": states.STOP_KILL}]
