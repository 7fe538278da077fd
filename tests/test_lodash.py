"""Differential test: our scheduler against a reference model of lodash's ``debounce``.

SPEC rules 6 and 7 define ``--max-wait`` and ``--leading``/``--no-trailing`` "as lodash's
``maxWait``/``leading``/``trailing`` do". :func:`lodash_model` is that reference, written in
Python from lodash's documented algorithm (not its code), for ``debounce(func, wait,
{leading, trailing, maxWait})``:

* State: ``last_call`` (none at first), ``last_invoke`` (0 at first; also set when a burst
  starts even if nothing is invoked), one timer, ``args`` (the latest call not yet invoked).
  ``maxWait`` is raised to at least ``wait``.
* ``should_invoke(t)``: no call yet, or ``t - last_call >= wait``, or (maxing and
  ``t - last_invoke >= maxWait``).
* A call at ``t``: ``invoking = should_invoke(t)``; record ``args`` and ``last_call = t``. If
  invoking and no timer is pending: leading edge (``last_invoke = t``, timer in ``wait``,
  invoke now if ``leading``). If invoking, a timer is pending and maxing: restart the timer
  for ``wait`` and invoke now with this call's args. Otherwise start a timer for ``wait`` if
  none is pending.
* Timer expiry at ``t``: if ``should_invoke(t)``: trailing edge (clear the timer; invoke with
  ``args`` if ``trailing`` and there are some; forget ``args``). Else re-arm it for
  ``min(wait - (t - last_call), maxWait - (t - last_invoke) if maxing)``.
* Invoking at ``t`` sets ``last_invoke = t`` and consumes ``args``.

Calls and timer expiries are processed exactly, in time order. A call at the very instant a
timer expires: **the timer goes first** (the callback was queued before the call), the same
order as the scheduler harness below, which ticks every deadline ``<= t`` before submitting
at ``t``. ``call_first=True`` flips that order; it is used only to tell examples whose
outcome hangs on that tie from the others (``test_..._tie_free``).

Mapping to our scheduler: one key; call ``i`` at ``t`` is ``Scheduler.submit("k",
Options(delay=wait, max_wait=maxWait, leading=..., trailing=...), payload=i)`` with the fake
clock at ``t``; each ``StartRun`` effect is one invocation, recorded as (clock time, payload
of the winning invocation), and its run ends at once (``run_exited`` at the same instant:
runs take no time, so the busy-key rules of SPEC rule 5 never come in). Time moves from one
``next_deadline()`` to the next with ``tick()`` there, as ``tests/test_scheduler.py``'s
``Sim`` does. All times are sums of binary fractions, so float equality is exact.

``trailing=False`` without ``leading`` is skipped: lodash would never invoke anything, and our
CLI refuses it as a usage error (``Options.problems()``).
"""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from debounce_cli.scheduler import Options, Scheduler, StartRun

Invocations = list[tuple[float, int]]  # (time, index of the call whose args were used)


# ------------------------------------------------------------------------- the reference
def lodash_model(
    wait: float,
    max_wait: float | None,
    leading: bool,
    trailing: bool,
    calls: list[float],
    call_first: bool = False,
) -> Invocations:
    """lodash's debounce on calls at the sorted times ``calls``; call ``i`` carries args ``i``."""
    maxing = max_wait is not None
    limit = max(max_wait, wait) if max_wait is not None else math.inf
    last_call: float | None = None
    last_invoke = 0.0
    timer: float | None = None  # when the pending timer fires
    args: int | None = None
    out: Invocations = []

    def should_invoke(t: float) -> bool:
        return (
            last_call is None or t - last_call >= wait or (maxing and t - last_invoke >= limit)
        )

    i = 0
    while i < len(calls) or timer is not None:
        timer_now = timer is not None and (
            i == len(calls) or timer < calls[i] or (timer == calls[i] and not call_first)
        )
        if timer_now:
            assert timer is not None and last_call is not None
            t = timer
            if should_invoke(t):  # trailing edge
                timer = None
                if trailing and args is not None:
                    out.append((t, args))
                    last_invoke = t
                args = None
            else:
                remaining = wait - (t - last_call)
                if maxing:
                    remaining = min(remaining, limit - (t - last_invoke))
                timer = t + remaining
            continue
        t = calls[i]
        invoking = should_invoke(t)
        args, last_call = i, t
        i += 1
        if invoking and timer is None:  # leading edge
            last_invoke = t
            timer = t + wait
            if leading:
                out.append((t, args))
                args = None
        elif invoking and maxing:
            timer = t + wait
            out.append((t, args))
            last_invoke, args = t, None
        elif timer is None:
            timer = t + wait
    return out


# --------------------------------------------------------------------------- our scheduler
class FakeClock:
    """Monotonic time that moves only when the test moves it."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def ours(
    wait: float, max_wait: float | None, leading: bool, trailing: bool, calls: list[float]
) -> Invocations:
    """The same calls through :class:`Scheduler`: (start time, payload) of every run."""
    opts = Options(delay=wait, max_wait=max_wait, leading=leading, trailing=trailing)
    assert opts.problems() == []
    clock = FakeClock()
    sched = Scheduler(clock)
    out: Invocations = []

    def carry(effects: list[object]) -> None:
        todo = list(effects)
        while todo:
            effect = todo.pop(0)
            if isinstance(effect, StartRun):
                out.append((clock.now, effect.run.invocation.payload))
                todo.extend(sched.run_exited(effect.run.id, 0))  # runs take no time

    def advance(until: float) -> None:
        for _ in range(10_000):
            deadline = sched.next_deadline()
            if deadline is None or deadline > until:
                clock.now = until
                return
            clock.now = max(clock.now, deadline)
            carry(sched.tick())
        raise AssertionError(f"the scheduler spins at {clock.now}")

    for i, t in enumerate(calls):
        advance(t)
        carry(sched.submit("k", opts, payload=i)[1])
    advance(calls[-1] + 100.0)
    return out


# ---------------------------------------------------------------------------- properties
WAITS = st.sampled_from([0.25, 0.5, 1.0, 2.0])
MAX_WAITS = st.sampled_from([None, 0.25, 0.5, 0.75, 1.0, 1.5, 3.0])
# (leading, trailing) minus (False, False): a usage error for us, no invocation ever in lodash.
EDGES = st.sampled_from([(False, True), (True, True), (True, False)])


@st.composite
def call_times(draw: st.DrawFn) -> list[float]:
    """1 to 25 strictly increasing times on a 1/16 s grid within ~10 s: bursts and gaps."""
    step = st.one_of(st.integers(1, 8), st.integers(9, 24), st.integers(25, 64))
    ticks = [draw(st.integers(0, 16))]
    for gap in draw(st.lists(step, max_size=24)):
        if ticks[-1] + gap > 160:
            break
        ticks.append(ticks[-1] + gap)
    return [n / 16 for n in ticks]


def agrees_with_lodash(got: Invocations, model: Invocations, wait: float,
                       max_wait: float | None, leading: bool, trailing: bool,
                       calls: list[float]) -> None:
    """``got`` is what lodash does (``model``), but where lodash breaks the promise of
    ``--throttle`` (``--leading`` with a max-wait: at most one start per delay; lodash's
    ``throttle`` can start a new burst's leading call just after a trailing run, see the
    ``rules`` module): up to that point ours is lodash's, and from there on it keeps the
    promise, and the last call still runs."""
    detail = (f"wait={wait} maxWait={max_wait} leading={leading} trailing={trailing} "
              f"calls={calls}\n lodash: {model}\n ours:   {got}")
    broken = None
    if leading and max_wait is not None:
        broken = next((i for i in range(1, len(model))
                       if model[i][0] - model[i - 1][0] < wait), None)
    if broken is None:
        assert got == model, detail
        return
    assert got[:broken] == model[:broken], detail
    assert all(b[0] - a[0] >= wait for a, b in itertools.pairwise(got)), detail
    if trailing:
        assert got[-1][1] == len(calls) - 1, detail


def _compare(
    wait: float, max_wait: float | None, edges: tuple[bool, bool], calls: list[float]
) -> None:
    leading, trailing = edges
    model = lodash_model(wait, max_wait, leading, trailing, calls)
    got = ours(wait, max_wait, leading, trailing, calls)
    agrees_with_lodash(got, model, wait, max_wait, leading, trailing, calls)


@pytest.mark.timeout(600)
@settings(max_examples=2000, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(wait=WAITS, max_wait=MAX_WAITS, edges=EDGES, calls=call_times())
def test_scheduler_matches_lodash_debounce(
    wait: float, max_wait: float | None, edges: tuple[bool, bool], calls: list[float]
) -> None:
    _compare(wait, max_wait, edges, calls)


@pytest.mark.timeout(600)
@settings(max_examples=2000, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(wait=WAITS, max_wait=MAX_WAITS, edges=EDGES, calls=call_times())
def test_scheduler_matches_lodash_debounce_tie_free(
    wait: float, max_wait: float | None, edges: tuple[bool, bool], calls: list[float]
) -> None:
    """Only examples whose lodash outcome is the same whichever of a call and a timer that
    fall on the same instant goes first: a mismatch here owes nothing to that choice."""
    leading, trailing = edges
    assume(
        lodash_model(wait, max_wait, leading, trailing, calls)
        == lodash_model(wait, max_wait, leading, trailing, calls, call_first=True)
    )
    _compare(wait, max_wait, edges, calls)


# ------------------------------------------------------------- examples from the tracker
def _check(
    wait: float,
    max_wait: float | None,
    leading: bool,
    trailing: bool,
    calls: list[float],
    expected: Invocations,
) -> None:
    """``expected`` is what lodash does (worked by hand); the model must agree, then ours."""
    assert lodash_model(wait, max_wait, leading, trailing, calls) == expected
    assert ours(wait, max_wait, leading, trailing, calls) == expected


def test_a_leading_max_wait_equal_to_delay_runs_the_trailing_call_at_max_wait() -> None:
    """delay 0.5, max-wait 0.5, --leading, calls at 0 and 0.25: runs at 0 and 0.5.

    The leading run at 0 sets lastInvokeTime; the timer due at 0.5 finds 0.5 - 0 >= maxWait
    and invokes the trailing call then (not at 0.25 + 0.5)."""
    _check(0.5, 0.5, True, True, [0.0, 0.25], [(0.0, 0), (0.5, 1)])


def test_max_wait_counts_from_the_previous_run_start() -> None:
    """delay 2, max-wait 3, trailing only, calls at 0, 0.5, 2, 3.5, 4.25: runs at 3 and 6.

    The run at 3 restarts the max-wait clock: the burst 3.5, 4.25 is capped at 3 + 3 = 6, not
    at 3.5 + 3 or 4.25 + 2 (SPEC rule 6: the later of its first call and the previous run)."""
    _check(2.0, 3.0, False, True, [0.0, 0.5, 2.0, 3.5, 4.25], [(3.0, 2), (6.0, 4)])


def test_a_max_wait_shorter_than_the_delay_counts_as_the_delay() -> None:
    """delay 1, max-wait 0.25, calls every 0.25 s for 3 s (0 .. 2.75): one run per second.

    maxWait becomes 1: runs at 1, 2 and 3 with the latest call before each (timer first when
    the call at 1 and 2 meets it; call-first would pick calls 4 and 8, at the same times)."""
    calls = [i * 0.25 for i in range(12)]
    _check(1.0, 0.25, False, True, calls, [(1.0, 3), (2.0, 7), (3.0, 11)])
    # The times do not depend on the tie order.
    assert [t for t, _ in lodash_model(1.0, 0.25, False, True, calls, call_first=True)] == [
        1.0, 2.0, 3.0]


def test_leading_no_trailing_max_wait_is_lodash_throttle_without_trailing() -> None:
    """--leading --no-trailing --max-wait 1 (throttle(f, 1, {trailing: false})), calls every
    0.375 s for 4.5 s: the first call at least 1 s after the previous run's start runs at once.

    Runs at 0, 1.125 (1.125 - 0 >= 1), 2.25, 3.375; every other call starts nothing."""
    calls = [i * 0.375 for i in range(12)]  # 0 .. 4.125; no call meets a timer
    expected = [(0.0, 0), (1.125, 3), (2.25, 6), (3.375, 9)]
    _check(1.0, 1.0, True, False, calls, expected)
