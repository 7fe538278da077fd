"""Every per-key decision, once: pure functions over a key's record.

A local key (``scheduler.KeyState``, whose pending invocation and run are objects with
waiters) and a fleet key (``daemon.fleet.record.KeyState``, kept as JSON in the store) both
inherit :class:`KeyRecord` and call these functions for every decision; neither keeps a rule of
its own. What stays with them is bookkeeping of their own kind: the local scheduler's heaps,
waiters and job-slot queue; the fleet's slots, fencing tokens, hosts and events.

The decisions, in the SPEC's terms:

- :func:`land`: an invocation arrives. It joins the running run (``--on-busy ignore``), joins
  its burst's leader or leading run (``--leading --no-trailing``), or becomes the key's
  pending invocation (new, or replacing the pending one, which keeps its place in the job
  queue: rule 4), due at its leading edge or its trailing edge (lodash's ``debounce``: see
  :func:`arrive`).
- :func:`fall_due`: the pending invocation is due. It starts, queues for a job slot, waits
  for the key's run to end, stops that run (``restart``), or signals and joins it
  (``signal``).
- :func:`started`: a run starts; max-wait counts from here.
- :func:`ended`: a run ended; its outcome, and whether its waiters follow the pending
  invocation (a run stopped for ``--on-busy restart``).
- :func:`flushed`, :func:`cancelled`: ``debounce flush`` and ``debounce cancel``.

Where these depart from lodash (which ``tests/test_lodash.py`` compares against), on
purpose:

- ``--throttle D`` (``--leading --max-wait``) keeps its promise of at most one start per D:
  a leading run never starts less than ``--delay`` after the key's previous start; it is due
  then instead (lodash starts it at once).
- A run that starts before its burst's trailing edge without being a leading run (flushed,
  or a queued invocation that kept its place in the job queue) leaves that edge armed up to
  max-wait after its start, so the SPEC's bound (max-wait after the later of the burst's
  start and the previous run's start) holds for the calls that follow. lodash's ``flush``
  does the same by accident: it leaves its timer running.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any, NamedTuple, Protocol

from debounce_cli import states
from debounce_cli.options import DEFAULTS, usage_problems

_INF = math.inf


@dataclass(frozen=True, slots=True)
class Options:
    """Per-invocation rules; the latest invocation's options win, like its argv."""

    delay: float = DEFAULTS["delay"]
    max_wait: float | None = DEFAULTS["max_wait"]
    leading: bool = DEFAULTS["leading"]
    trailing: bool = DEFAULTS["trailing"]
    on_busy: str = DEFAULTS["on_busy"]
    stop_timeout: float = DEFAULTS["stop_timeout"]
    timeout: float | None = DEFAULTS["timeout"]
    defer: bool = DEFAULTS["defer"]
    signal: str = DEFAULTS["signal"]
    collect: bool = DEFAULTS["collect"]
    fleet: bool = DEFAULTS["fleet"]

    def problems(self) -> list[str]:
        """Usage errors, worded for the command line; empty when the options are usable."""
        return usage_problems({
            "delay": self.delay, "max_wait": self.max_wait, "leading": self.leading,
            "trailing": self.trailing, "on_busy": self.on_busy,
            "stop_timeout": self.stop_timeout, "timeout": self.timeout, "signal": self.signal,
        })

    def stored(self) -> dict[str, Any]:
        """The stored and wire form: every field by name (the fleet's store keeps this)."""
        return {name: getattr(self, name) for name in _OPTION_FIELDS}

    @classmethod
    def from_stored(cls, obj: dict[str, Any] | None) -> Options:
        """Back from :meth:`stored`; a field this version does not know is left out, one it
        misses takes its default (a state written by another version still loads)."""
        if not obj:
            return cls()
        return cls(**{name: obj[name] for name in _OPTION_FIELDS if name in obj})

    @property
    def max_wait_or_none(self) -> float | None:
        """Max-wait as it counts: never shorter than the delay."""
        return None if self.max_wait is None else max(self.max_wait, self.delay)


_OPTION_FIELDS = tuple(f.name for f in fields(Options))


@dataclass(eq=False, slots=True)
class KeyRecord:
    """What every key keeps for the rules, local or fleet.

    The timing fields are lodash's state (see :func:`arrive`); ``lead_after`` is the earliest
    a leading run may start (``--throttle``: a delay after the previous start). ``leader``
    says that the key's pending invocation leads its burst (a leading edge not started yet:
    ``--no-trailing`` calls share its result).
    ``burst_run`` names the burst's latest run (a ``Run`` locally, a run id in the fleet):
    later ``--no-trailing`` calls of the burst join it.
    """

    key: str
    quiet_at: float = -_INF  # a full delay after the key's last invocation
    max_from: float = 0.0  # max-wait counts from here: the burst's start or the last run start
    timer_first: float = -_INF  # when the quiet period armed first in this burst ends
    edge_at: float = -_INF  # the burst's trailing edge: until then it goes on
    lead_after: float = -_INF  # no leading run before (see lead_due)
    leader: bool = False
    burst_run: Any = None


class PendingLike(Protocol):
    """A key's pending invocation as the rules see it (``scheduler.Invocation``, or the
    fleet's ``Pending``)."""

    due: float
    coalesced: int
    lead: bool  # due at once: a leading edge (or a max-wait run) not started yet

    @property
    def options(self) -> Options: ...

    @property
    def queued(self) -> bool: ...  # due, waiting for a job slot

    @property
    def batch(self) -> Any: ...  # --collect: what it stands for, when it gathers a batch


class Counted(Protocol):
    """Something invocations join: it counts them."""

    coalesced: int


class RunLike(Counted, Protocol):
    """A key's run as the rules see it."""

    @property
    def stopping(self) -> str | None: ...  # states.STOP_*: asked to stop


# -------------------------------------------------------------------- timing (lodash)
def arrive(k: KeyRecord, options: Options, now: float) -> tuple[bool, bool, float]:
    """One invocation of a key arrives at ``now``: lodash's ``debounce``, step for step.

    Updates the key's timing fields and returns ``(new_burst, lead, edge)``: whether it
    begins a burst, whether it runs at once (leading edge, or max-wait has passed), and when
    the burst's trailing edge comes.

    A call "invokes" when a full delay has passed since the key's last call, or max-wait since
    its last run started (or its burst began); with no trailing edge pending (lodash's
    "timer"), that begins a burst; with one pending and a max-wait, the call runs at once.
    Max-wait is never shorter than the delay.
    """
    max_wait = options.max_wait_or_none
    edge_pending = now < k.edge_at
    invoking = now >= k.quiet_at or (max_wait is not None and now >= k.max_from + max_wait)
    # One float for "a delay from now", wherever it goes: each one kept costs 24 bytes, and
    # a pending key keeps several.
    quiet = now + options.delay
    k.quiet_at = quiet
    new_burst = invoking and not edge_pending
    lead = False
    if new_burst:
        k.max_from = now
        k.timer_first = quiet
        lead = options.leading
    elif invoking and max_wait is not None:
        k.timer_first = quiet
        lead = True  # max-wait has passed: this one runs now, leading or not
    elif not edge_pending:
        k.timer_first = quiet  # a quiet period armed by this call
    # When the trailing edge comes (lodash: min(last call + wait, max(first timer expiry,
    # last invoke + maxWait))); a call in no burst of its own keeps it, for the next call.
    edge = quiet
    if max_wait is not None:
        edge = min(edge, max(k.timer_first, k.max_from + max_wait))
    k.edge_at = edge
    return new_burst, lead, edge


def lead_due(k: KeyRecord, options: Options, now: float) -> float:
    """When a leading run may start: now, except that with a max-wait (``--throttle``) it
    never starts less than a delay after the key's previous start."""
    return now if options.max_wait is None else max(now, k.lead_after)


# -------------------------------------------------------------------- landing
JOIN_RUN = "join-run"  # joins the run executing (--on-busy ignore)
JOIN_LEADER = "join-leader"  # joins the burst's leading invocation, not started yet
JOIN_BURST = "join-burst"  # joins the burst's leading run, executing or ended
PEND = "pend"  # is the key's pending invocation now (new, or replacing the pending one)


class Landing(NamedTuple):
    """Where an arriving invocation lands. For ``PEND``: when it is due, how many it stands
    for, whether it leads, whether it replaces the pending one (``replaces``) and keeps that
    one's place in the job queue (``keeps_place``), and whether it carries a batch
    (``collect``: every coalesced invocation's argument). (A named tuple: one is made for
    every submission, in two fifths of a frozen dataclass's time.)"""

    kind: str
    coalesced: int = 1
    due: float = 0.0
    lead: bool = False
    replaces: bool = False
    keeps_place: bool = False
    collect: bool = False


def land(k: KeyRecord, options: Options, now: float, *, pending: PendingLike | None,
         running: RunLike | None, burst: Counted | None) -> Landing:
    """An invocation with ``options`` arrives at ``now``.

    ``pending`` and ``running`` are the key's; ``burst`` is the burst's latest run
    (``k.burst_run``) when it is still known, executing or ended. Counts of what it joins
    (``coalesced``) are raised here; the caller moves waiters and writes events.
    """
    new_burst, lead, edge = arrive(k, options, now)
    if new_burst:
        k.leader = False
        k.burst_run = None
        burst = None
    if running is not None and options.on_busy == "ignore" and running.stopping is None:
        running.coalesced += 1
        return Landing(JOIN_RUN, running.coalesced)
    if options.leading and not lead and not options.trailing:
        # Later invocations of a burst without a trailing edge start nothing: they share the
        # leading invocation's result, whether it is still waiting, running or done (with
        # --max-wait, the first one max-wait after the last run start led, above).
        if k.leader and pending is not None:
            pending.coalesced += 1
            return Landing(JOIN_LEADER, pending.coalesced)
        if burst is not None:
            burst.coalesced += 1
            return Landing(JOIN_BURST, burst.coalesced)
        lead = True  # nothing to join (its leader was cancelled): lead afresh
    if pending is None:
        coalesced, keeps_place, collect = 1, False, options.collect
    else:
        coalesced = pending.coalesced + 1
        lead = lead or pending.lead  # replacing a leader not started yet: due at once
        keeps_place = pending.queued
        # A batch gathers from the first --collect invocation of the chain on: invocations
        # after it that did not say --collect are in it too (a collect run stands for them).
        collect = options.collect or pending.options.collect or bool(pending.batch)
    if keeps_place:
        assert pending is not None
        due = pending.due  # deferring in the backlog: its place, no new quiet period
    elif lead:
        due = lead_due(k, options, now)
    else:
        due = edge
    if lead:
        k.leader = True
    return Landing(PEND, coalesced, due, lead, pending is not None, keeps_place, collect)


# -------------------------------------------------------------------- falling due
START = "start"  # start it now
QUEUE = "queue"  # wait for a job slot, keeping its place
WAIT = "wait"  # wait for the key's run to end (it is looked at again then)
RESTART = "restart"  # stop the key's run (TERM, KILL after the stop timeout); start after
SIGNAL = "signal"  # send --signal to the key's run; the invocation joins that run


def fall_due(k: KeyRecord, pending: PendingLike, running: RunLike | None,
             slot_free: bool) -> str:
    """The pending invocation is due: what happens to it. The latest invocation's
    ``--on-busy`` decides, not the running run's. ``SIGNAL`` moves the pending
    invocation's count onto the run (the caller drops the pending invocation)."""
    if running is not None:
        if running.stopping is not None:
            return WAIT
        on_busy = pending.options.on_busy
        if on_busy == "restart":
            return RESTART
        if on_busy == "signal":
            k.leader = False
            running.coalesced += pending.coalesced
            return SIGNAL
        return WAIT
    return START if slot_free else QUEUE


def started(k: KeyRecord, pending: PendingLike, now: float) -> None:
    """The pending invocation starts as a run at ``now``; the caller sets ``k.burst_run`` to
    it: the burst's latest run, which later ``--no-trailing`` calls of the burst join (its
    leading run, unless options were mixed within the burst)."""
    max_wait = pending.options.max_wait_or_none
    if max_wait is not None and not pending.lead and now < k.edge_at:
        # Started before its burst's trailing edge (flushed, or queued and kept its place):
        # the edge stays armed, at most max-wait after this start.
        k.edge_at = max(k.edge_at, now + max_wait)
    k.max_from = now  # max-wait counts from the last run start
    if max_wait is not None:
        k.lead_after = now + pending.options.delay
    k.leader = False


# -------------------------------------------------------------------- ending and control
def ended(stopping: str | None, reported: str, has_pending: bool,
          exit_code: int | None = None, signalled: Sequence[str] = ()) -> tuple[str, bool]:
    """A run asked to stop for ``stopping`` (or not) ended; ``reported`` is the outcome its
    host saw (``EXITED``, ``TIMED_OUT``..., or ``LOST`` when its host went away), with
    ``exit_code``; ``signalled`` are the signals ``debounce kill --signal`` sent it. Returns
    its outcome, and whether its waiters follow the key's pending invocation: those of a run
    stopped for ``--on-busy restart`` do; if there is none (it was cancelled), the run was
    simply stopped. A run that died of a signal ``kill --signal`` sent it was killed; one
    that survived it (a server reloading on USR1) and ended later exited."""
    follow = stopping == states.STOP_RESTART and has_pending
    if reported == states.LOST:
        return states.LOST, follow
    if stopping == states.STOP_RESTART:
        return (states.RESTARTED if has_pending else states.STOPPED), follow
    if stopping is None:
        if reported == states.EXITED and signalled and exit_code in _deaths(signalled):
            return states.KILLED, False
        return reported, False
    return states.OUTCOME_OF_STOP[stopping], False


def _deaths(names: Sequence[str]) -> set[int]:
    """The statuses of a process that died of one of these signals (128+N)."""
    import signal

    return {128 + signal.Signals["SIG" + name].value for name in names}


def flushed(pending: PendingLike, now: float) -> bool:
    """``debounce flush``: what is pending is due now. Returns whether its due time moved."""
    if pending.due > now:
        pending.due = now
        return True
    return False


def cancelled(k: KeyRecord) -> None:
    """``debounce cancel``: the pending invocation is dropped (the caller tells its
    waiters). A leader cancelled before it started leaves nothing to join: the burst's next
    ``--no-trailing`` call leads afresh."""
    k.leader = False


def remembered_until(k: KeyRecord) -> float:
    """An idle key (nothing pending or running) is kept until then: while its burst goes
    on (a delay after its last call, and its trailing edge still armed) and while no leading
    run may start yet."""
    return max(k.quiet_at, k.edge_at, k.lead_after)


def restore(k: KeyRecord, options: Options, *, received_at: float, due: float,
            first_at: float, lead: bool) -> None:
    """A pending invocation put back from the journal after a restart: where max-wait counts
    from, when its quiet period ends and when its trailing edge comes, as they were."""
    k.max_from = first_at
    k.quiet_at = received_at + options.delay
    k.timer_first = k.edge_at = due
    k.leader = lead
