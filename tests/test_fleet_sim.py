"""The fleet's logic on fake time (``fleet_sim``): takeover, lost runs, frozen hosts, fencing,
store outages and clock skew, in milliseconds; the real-Redis tests (``test_fleet.py``) keep
covering the Redis store itself."""

from __future__ import annotations

import asyncio

import pytest
from fleet_sim import Sim, SimHost, SimProcess

from debounce_cli import protocol


def test_one_run_on_the_latest_host_and_every_caller_gets_it(sim: Sim) -> None:
    a, b = sim.host("a"), sim.host("b")
    first = a.submit("k", 1.0, delay=2.0)
    sim.run_until(lambda: first.answer is not None)
    second = b.submit("k", 1.0, delay=2.0)
    sim.run_until(lambda: first.result is not None and second.result is not None)
    assert first.outcome == second.outcome == ("finished", 0, "exited")
    assert [host for _, host in sim.starts("k")] == ["b"]
    assert isinstance(second.answer, protocol.Accepted) and second.answer.coalesced == 2


def test_a_dead_hosts_pending_invocation_runs_once_on_another_host_after_a_lease(
        sim: Sim) -> None:
    """kill -9 of the host whose invocation is pending: once it has been silent for a lease,
    exactly one other live host takes the run over, and a caller there gets its status."""
    a, b = sim.host("a"), sim.host("b")
    sim.host("c")
    sim.run_for(11.0)  # everyone has judged the fleet for a lease
    first = a.submit("k", 1.0, delay=1.0)
    sim.run_until(lambda: first.answer is not None)
    submitted = sim.loop.now
    a.kill9()
    watcher = sim.do_wait(b, "k")
    sim.run_until(lambda: watcher.result is not None)
    starts = sim.starts("k")
    assert len(starts) == 1 and starts[0][1] in ("b", "c")
    assert starts[0][0] >= submitted + 10.0  # not before a was silent for a lease
    assert watcher.outcome == ("finished", 0, "exited")
    sim.run_for(60.0)
    assert len(sim.starts("k")) == 1 and sim.overlaps() == []


def test_a_run_whose_host_died_is_recorded_lost_and_never_started_again(sim: Sim) -> None:
    a, b = sim.host("a"), sim.host("b")
    sim.run_for(11.0)
    caller = a.submit("k", 30.0, delay=0.0)
    sim.run_until(lambda: sim.starts("k"))
    started = sim.loop.now
    watcher = sim.do_wait(b, "k")
    sim.run_for(5.0)
    a.kill9()
    sim.run_until(lambda: watcher.result is not None)
    assert watcher.outcome is not None and watcher.outcome[2] == "lost"
    assert sim.loop.now >= started + 5.0 + 10.0 - 2.5  # its last heartbeat plus a lease
    sim.run_for(60.0)
    assert len(sim.starts("k")) == 1
    assert caller.result is None  # its own client went with it


def test_a_host_that_just_joined_keeps_its_first_run(sim: Sim) -> None:
    """Issue 18, item 1, on fake time: a and b judge the fleet; c joins and runs a command
    longer than a quarter lease; it is never taken for silent."""
    sim.host("a")
    sim.host("b")
    sim.run_for(12.0)
    c = sim.host("c")
    caller = c.submit("kc", 8.0, delay=1.0)
    sim.run_until(lambda: caller.result is not None)
    assert caller.outcome == ("finished", 0, "exited")


def test_a_frozen_hosts_late_end_changes_nothing_once_its_run_was_given_up(sim: Sim) -> None:
    """Fencing: a freezes while its run executes; the fleet records the run lost after a
    lease; a thaws and reports the end under its old token: the record stays lost, and the
    key's next invocation runs normally."""
    a, b = sim.host("a"), sim.host("b")
    sim.run_for(11.0)
    a.submit("k", 20.0, delay=0.0)
    sim.run_until(lambda: sim.starts("k"))
    watcher = sim.do_wait(b, "k")
    a.freeze()
    sim.run_until(lambda: watcher.result is not None)
    assert watcher.outcome is not None and watcher.outcome[2] == "lost"
    a.thaw()
    sim.run_for(30.0)
    st = sim.do(b.store.snapshot("k"))[0]
    assert st.last is not None and st.last.outcome == "lost"
    after = b.submit("k", 1.0, delay=0.5)
    sim.run_until(lambda: after.result is not None)
    assert after.outcome == ("finished", 0, "exited")


def test_a_store_outage_is_survived_by_runs_in_flight(sim: Sim) -> None:
    """The store refuses connections for 5 s while a run executes: the run goes on, its end
    is reported once the store is back, and its caller gets the real status."""
    a, b = sim.host("a"), sim.host("b")
    sim.run_for(11.0)
    caller = a.submit("k", 3.0, delay=0.0)
    sim.run_until(lambda: sim.starts("k"))
    for host in (a, b):
        host.store.down = True
    sim.run_for(5.0)
    for host in (a, b):
        host.store.down = False
    sim.run_until(lambda: caller.result is not None)
    assert caller.outcome == ("finished", 0, "exited")
    assert len(sim.starts("k")) == 1


def test_hosts_with_skewed_clocks_run_at_the_stores_due_time(sim: Sim) -> None:
    """Host a's wall clock is an hour fast, b's an hour slow: due times are on the store's
    clock, so the run starts a delay after the latest invocation whatever the hosts think."""
    a = sim.host("a", skew=3600.0)
    b = sim.host("b", skew=-3600.0)
    sim.run_for(11.0)
    first = a.submit("k", 0.5, delay=3.0)
    sim.run_until(lambda: first.answer is not None)
    second = b.submit("k", 0.5, delay=3.0)
    sim.run_until(lambda: second.answer is not None)
    latest = sim.loop.now
    sim.run_until(lambda: second.result is not None)
    (start, host), = sim.starts("k")
    assert host == "b" and latest + 2.99 <= start <= latest + 3.01


# ------------------------------------------------------------------ issue 18: faults
def pause_store(sim: Sim) -> None:
    for host in sim.hosts.values():
        host.store.pause()


def resume_store(sim: Sim) -> None:
    for host in sim.hosts.values():
        if not host.frozen and not host.dead:
            host.store.resume()


def stopped_runs(sim: Sim) -> set[tuple[str, int]]:
    """(host, run id) of the runs their own host stopped (ended by a signal)."""
    return {(name, run) for name, host in sim.hosts.items() if host.runs is not None
            for _, run, code in host.runs.ended if code >= 128}


def lost_records(sim: Sim) -> set[tuple[str, int]]:
    return {(row["host"], row["run_id"]) for row in sim.memory.history
            if row["outcome"] == "lost"}


def test_a_store_pause_longer_than_the_lease_never_runs_a_key_twice_at_once() -> None:
    """Issue 18, item 2: five hosts each run a 10 s command; the store stops for 3.5 s (lease
    2 s). Before, live hosts' runs were recorded lost while they ran and a second run of a key
    started beside the first. Now a host that cannot renew its lease stops its own runs
    before anyone may take over, so a run recorded lost was really stopped, and no key ever
    has two runs at once."""
    sim = Sim(lease=2.0)
    try:
        hosts = [sim.host(name) for name in "abcde"]
        sim.run_for(3.0)
        callers = [h.submit(f"k{h.name}", 10.0, delay=0.0) for h in hosts]
        sim.run_until(lambda: all(sim.starts(f"k{h.name}") for h in hosts))
        sim.run_for(1.0)
        pause_store(sim)
        sim.run_for(3.5)
        resume_store(sim)
        again = [h.submit(f"k{h.name}", 1.0, delay=0.0) for h in hosts]
        sim.run_until(lambda: all(c.result is not None for c in callers + again), limit=200)
        assert sim.overlaps() == []
        assert lost_records(sim) <= stopped_runs(sim)
        assert all(c.outcome == ("finished", 0, "exited") for c in again)
    finally:
        sim.close()


def test_a_store_pause_across_the_due_time_still_runs_the_command() -> None:
    """Issue 18, item 3: one host; due at 1 s; the store stops at 0.8 s for 2 s (lease 2 s).
    Before, the claim's answer came late, the fence took the host for frozen and the run was
    recorded lost without ever running. Now the claim is given back and the run starts once
    the store answers again."""
    sim = Sim(lease=2.0)
    try:
        a = sim.host("a")
        sim.run_for(3.0)
        caller = a.submit("k", 0.5, delay=1.0)
        sim.run_until(lambda: caller.answer is not None)
        sim.run_for(0.8)
        pause_store(sim)
        sim.run_for(2.0)
        resume_store(sim)
        sim.run_until(lambda: caller.result is not None, limit=100)
        assert caller.outcome == ("finished", 0, "exited")
        assert len(sim.starts("k")) == 1
    finally:
        sim.close()


def test_a_host_cut_off_from_the_store_stops_its_run_before_another_takes_over() -> None:
    """Issue 18, item 4: host a runs a 6 s command and is cut off from the store; host b
    submits the key. Before, b's run started while a's still ran. Now a stops its run once it
    cannot renew its lease, before b may start; a's caller learns the run was lost."""
    sim = Sim(lease=2.0)
    try:
        a, b = sim.host("a"), sim.host("b")
        sim.run_for(3.0)
        caller = a.submit("k", 6.0, delay=0.0)
        sim.run_until(lambda: sim.starts("k"))
        a.store.pause()  # a partition: a's calls get no answer
        late = b.submit("k", 1.0, delay=0.0)
        sim.run_until(lambda: late.result is not None, limit=100)
        a.store.resume()
        sim.run_until(lambda: caller.result is not None, limit=100)
        assert sim.overlaps() == []
        assert [host for _, host in sim.starts("k")] == ["a", "b"]
        assert caller.outcome is not None and caller.outcome[2] == "lost"
        assert late.outcome == ("finished", 0, "exited")
    finally:
        sim.close()


def test_hosts_with_different_leases_never_run_a_key_twice_at_once() -> None:
    """Found by tests/fleet_jepsen.py: a host judged another silent after its own lease, so
    a host with a short lease (2 s) took over the key of a cut-off host with a long one
    (10 s), whose guard stops its runs only at half of its own lease: two runs at once.
    Each host now says its lease in its heartbeat, and is judged by the longer one."""
    sim = Sim(lease=2.0)
    try:
        a, b = sim.host("a", lease=10.0), sim.host("b", lease=2.0)
        sim.run_for(12.0)
        caller = a.submit("k", 30.0, delay=0.0)
        sim.run_until(lambda: sim.starts("k"))
        a.store.pause()
        late = b.submit("k", 1.0, delay=0.0)
        sim.run_until(lambda: late.result is not None, limit=200)
        a.store.resume()
        sim.run_until(lambda: caller.result is not None, limit=200)
        assert sim.overlaps() == []
        assert [host for _, host in sim.starts("k")] == ["a", "b"]
        assert caller.outcome is not None and caller.outcome[2] == "lost"
    finally:
        sim.close()


def test_a_host_frozen_between_its_claim_and_the_spawn_never_starts_the_run() -> None:
    """Issue 18, item 5: the fence is asked immediately before the process is created. Host a
    claims the run, freezes before spawning it for 3 s (lease 2 s); b records it lost; a
    thaws and does not start it (it used to: the check ran before the async spawn)."""
    sim = Sim(lease=2.0)
    try:
        a, b = sim.host("a"), sim.host("b")
        sim.run_for(3.0)
        a.spawn_delay = 0.05
        caller = a.submit("k", 1.0, delay=0.5)
        watcher = None
        sim.run_until(lambda: sim.memory.states.get("k") is not None
                      and '"running":{' in sim.memory.states["k"])
        a.freeze()
        watcher = sim.do_wait(b, "k")
        sim.run_for(3.0)
        a.thaw()
        sim.run_until(lambda: watcher is not None and watcher.result is not None, limit=100)
        sim.run_for(5.0)
        assert sim.starts("k") == []
        assert a.runs is not None and a.runs.refused
        assert watcher.outcome is not None and watcher.outcome[2] == "lost"
        assert caller.result is not None
    finally:
        sim.close()


def test_random_faults_break_no_invariant() -> None:
    """The short version of ``fleet_chaos.py`` (Jepsen-style, on fake time): random
    submissions from four hosts, hosts killed and frozen, the store paused, hosts cut off;
    the checker finds no run of a key beside another, nothing run twice, every live caller
    told, every status true, no live reachable host's run taken for lost."""
    from fleet_chaos import check, play

    for seed in range(24):
        sim, rec = play(seed)
        try:
            broken = check(sim, rec)
        finally:
            sim.close()
        assert broken == [], f"seed {seed}: {broken}\n" + "\n".join(rec.faults)


def test_random_faults_with_every_option_and_control_break_no_invariant() -> None:
    """The same with ``--rich``: every option (leading and trailing edges, max-wait,
    collect, timeouts, no-defer, on-busy signal), a host with one job slot, and flush,
    cancel and kill from any host among the faults."""
    from fleet_chaos import check, play

    for seed in range(100, 112):
        sim, rec = play(seed, rich=True)
        try:
            broken = check(sim, rec)
        finally:
            sim.close()
        assert broken == [], f"seed {seed}: {broken}\n" + "\n".join(rec.faults)


def test_a_fleet_waiter_is_told_the_store_is_unreachable_and_then_where_its_key_stands(
        sim: Sim) -> None:
    """Issue 19, item 6: a waiter showed "due, key busy" for a whole store outage. It is told
    the store is unreachable, and where its key stands once the store answers again."""
    a, b = sim.host("a"), sim.host("b")
    sim.run_for(11.0)
    caller = a.submit("k", 1.0, delay=30.0)
    sim.run_until(lambda: caller.answer is not None)
    watcher = sim.do_wait(b, "k")
    for host in (a, b):
        host.store.down = True
    sim.run_until(lambda: "store-unreachable" in watcher.progress, limit=100)
    for host in (a, b):
        host.store.down = False
    sim.run_until(lambda: watcher.progress[-1] == "pending", limit=100)
    sim.run_until(lambda: watcher.result is not None, limit=200)
    assert watcher.outcome == ("finished", 0, "exited")


def test_a_run_that_ended_during_a_store_outage_keeps_its_real_duration() -> None:
    """Issue 19, item 6: after an outage a 4 s run was recorded as taking 8 s (its end was
    stamped when the store heard of it). The end is stamped when it happened."""
    sim = Sim(lease=20.0)  # an outage shorter than half a lease: the run goes on
    try:
        a = sim.host("a")
        sim.run_for(25.0)
        caller = a.submit("k", 4.0, delay=0.0)
        sim.run_until(lambda: sim.starts("k"))
        sim.run_for(2.0)
        a.store.down = True
        sim.run_for(6.0)  # the run ends 2 s into the outage
        a.store.down = False
        sim.run_until(lambda: caller.result is not None, limit=200)
        [row] = sim.memory.history
        assert 3.9 <= row["finished_at"] - row["started_at"] <= 4.1, row
    finally:
        sim.close()


def test_a_run_reported_after_the_store_restarted_empty_is_found_by_its_id(sim: Sim) -> None:
    """Issue 19, item 6: after Redis restarted empty, `logs --run N` said no run N was known
    while `history --fleet` listed it (the end was recorded again, its id not)."""
    a = sim.host("a")
    sim.run_for(11.0)
    caller = a.submit("k", 3.0, delay=0.0)
    sim.run_until(lambda: sim.starts("k"))
    sim.memory.wipe()  # restarted without its data while the run executes
    sim.run_until(lambda: caller.result is not None, limit=100)
    [row] = sim.memory.history
    assert sim.do(a.store.key_of_run(row["run_id"])) == "k"


def _one_run(sim: Sim, host: SimHost) -> tuple[float, SimProcess]:
    """When the only run on ``host`` started, and its process."""
    assert host.runs is not None
    [(started, run_id, _)] = host.runs.started
    return started, host.runs.procs_made[run_id]


def test_a_fleet_runs_timeout_terms_it_then_kills_what_ignores_term(sim: Sim) -> None:
    """Issue 17: a fleet run's --timeout goes through the runs' one stop path, as a local
    run's: TERM when it passes, KILL --stop-timeout later to a command that ignores TERM."""
    a = sim.host("a")
    caller = a.submit("k", 60.0, delay=1.0, trap=True, timeout=2.0, stop_timeout=3.0)
    sim.run_until(lambda: caller.result is not None)
    started, proc = _one_run(sim, a)
    assert proc.signals == [(pytest.approx(started + 2.0), "TERM"),
                            (pytest.approx(started + 5.0), "KILL")]
    assert caller.outcome == ("finished", 137, "timeout")


def test_a_fleet_run_that_ends_on_term_gets_no_kill(sim: Sim) -> None:
    a = sim.host("a")
    caller = a.submit("k", 60.0, delay=1.0, timeout=2.0, stop_timeout=3.0)
    sim.run_until(lambda: caller.result is not None)
    sim.run_for(10.0)  # past the stop timeout: no KILL is left armed
    started, proc = _one_run(sim, a)
    assert proc.signals == [(pytest.approx(started + 2.0), "TERM")]
    assert caller.outcome == ("finished", 143, "timeout")


def test_killing_a_fleet_run_from_another_host_terms_then_kills_it(sim: Sim) -> None:
    """`debounce kill` of a fleet key on host b stops the run executing on a: TERM at once
    (the stop event reaches a), KILL --stop-timeout later, as for a local run."""
    a, b = sim.host("a"), sim.host("b")
    caller = a.submit("k", 60.0, delay=0.5, trap=True, stop_timeout=4.0)
    sim.run_until(lambda: a.runs is not None and a.runs.started)
    sim.run_for(1.0)
    asked = sim.loop.now
    assert sim.do(b.fleet.kill("k", None)) is not None
    sim.run_until(lambda: caller.result is not None)
    _, proc = _one_run(sim, a)
    [(term, name), (kill, name2)] = proc.signals
    assert (name, name2) == ("TERM", "KILL")
    assert asked <= term < asked + 1.0  # once the stop event has come through the store
    assert kill == pytest.approx(term + 4.0)
    assert caller.outcome == ("finished", 137, "killed")


def test_a_fleet_run_that_dies_of_kill_signal_is_killed_one_that_survives_it_exited(
        sim: Sim) -> None:
    """`debounce kill --signal SIG` from another host: a run that dies of SIG is recorded
    `killed` (as a local one, README), one that survives it and ends later `exited`."""
    a, b = sim.host("a"), sim.host("b")
    caller = a.submit("k", 60.0, delay=0.5)
    sim.run_until(lambda: a.runs is not None and a.runs.started)
    assert sim.do(b.fleet.kill("k", "TERM")) is not None
    sim.run_until(lambda: caller.result is not None)
    assert caller.outcome == ("finished", 143, "killed")

    survivor = a.submit("s", 5.0, delay=0.5, trap=True)  # ignores TERM
    sim.run_until(lambda: a.runs is not None and len(a.runs.started) == 2)
    assert sim.do(b.fleet.kill("s", "TERM")) is not None
    sim.run_until(lambda: survivor.result is not None)
    assert survivor.outcome == ("finished", 0, "exited")


def test_a_waiter_filed_after_its_run_was_claimed_here_still_gets_the_run(
        sim: Sim, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by ``fleet_chaos.py`` (7 rounds of 400 under faults): the host claimed the key
    and began following its events from the claim on, a moment before the submission that
    the waiter came with was filed there with an older position. The events in between
    (the run's start) were never read here, so the waiter stayed in the slot and was never
    told anything. Here the submission's continuation comes 10 ms late, as it did then."""
    from debounce_cli.daemon.fleet.following import Following

    attach = Following.attach

    async def late_attach(self: Following, *args: object, **kw: object) -> None:
        await asyncio.sleep(0.01)
        await attach(self, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(Following, "attach", late_attach)
    a = sim.host("a")
    caller = a.submit("k", 0.3, delay=0.0)
    sim.run_until(lambda: caller.result is not None, limit=30.0)
    assert caller.outcome == ("finished", 0, "exited")
    assert len(caller.started) == 1


def test_a_host_that_thaws_with_an_old_view_does_not_take_a_newer_run_for_lost() -> None:
    """Found by ``fleet_chaos.py``: host b saw host x silent for over a lease, then froze
    (SIGSTOP) in the middle of its scan; x came back and started a run; b thawed and judged
    that run with its view from before the freeze, recorded it lost, and another host ran
    the key while x's run went on. Here b's scan is handed such a view: the run is not
    lost, neither when b's last heartbeat is old (b judges no one) nor when it is fresh (the
    view is older than the run)."""
    from debounce_cli.daemon.fleet.layout import Beat

    sim = Sim(lease=2.0)
    try:
        sim.host("a")
        b, x = sim.host("b"), sim.host("x")
        sim.run_for(3.0)  # everyone judges
        caller = x.submit("k", 8.0, delay=0.0)
        sim.run_until(lambda: sim.starts("k"), limit=30)
        sim.run_for(3.0)  # the run is over a lease old by the store's clock
        fresh = b.fleet.liveness.beats
        assert fresh is not None
        started = sim.memory.now() - 3.0
        old = Beat(started - 0.5, {**fresh.hosts, "x": started - 3.0}, fresh.epoch, fresh.runs,
                   fresh.leases)
        liveness = b.fleet.liveness
        for beat_at in (liveness.beat_at - 5.0, liveness.beat_at):
            liveness.beat_at = beat_at
            sim.do(liveness._scan_once(old))
        sim.run_until(lambda: caller.result is not None, limit=60)
        assert caller.outcome == ("finished", 0, "exited")
        assert [host for _, host in sim.starts("k")] == ["x"]
        assert [row["outcome"] for row in sim.memory.history if row["key"] == "k"] == ["exited"]
    finally:
        sim.close()


def test_a_run_stopped_for_its_lease_that_had_succeeded_keeps_its_outcome() -> None:
    """Found by ``fleet_chaos.py``: the lease guard's TERM went out as the command exited 0
    by itself, and the run was recorded lost though it had done its work. Here the command
    ignores TERM and exits 0 before the guard's KILL; one that dies of the TERM is lost."""
    sim = Sim(lease=2.0)
    try:
        a, b = sim.host("a"), sim.host("b")
        sim.run_for(3.0)
        sim.run_until(lambda: sim.loop.now - a.fleet.link.renewed < 0.01)  # a heartbeat now
        done = a.submit("k", 1.2, delay=0.0, trap=True)
        cut = a.submit("j", 30.0, delay=0.0)
        sim.run_until(lambda: len(sim.starts("k")) == len(sim.starts("j")) == 1)
        for host in (a, b):  # the store pauses: TERM at half a lease, KILL at 3/4
            host.store.pause()
        sim.run_for(2.0)
        for host in (a, b):
            host.store.resume()
        sim.run_until(lambda: done.result is not None and cut.result is not None, limit=60)
        assert done.outcome == ("finished", 0, "exited")
        assert cut.outcome == ("finished", 143, "lost")
    finally:
        sim.close()
