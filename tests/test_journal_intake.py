"""The journal's intake: pending rows are appended in commit order and folded into their
table now and then; whatever the mix of submissions, cancels, runs and folds, a daemon that
starts afterwards finds exactly the pending invocations the last one had."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from debounce_cli import journal as journal_module
from debounce_cli.clock import FakeClock
from debounce_cli.daemon.jobs import Job
from debounce_cli.journal import Journal
from debounce_cli.scheduler import Options, Scheduler, StartRun

SOCKET = "/tmp/intake.sock"
KEYS = [f"k{i}" for i in range(5)] + ["clé-é", "k\udcff"]  # a key from non-UTF-8 bytes too

step = st.one_of(
    st.tuples(st.just("submit"), st.sampled_from(KEYS), st.sampled_from([0.0, 1.0, 5.0])),
    st.tuples(st.just("cancel"), st.sampled_from(KEYS), st.just(0.0)),
    st.tuples(st.just("advance"), st.just(""), st.sampled_from([0.5, 2.0, 6.0])),
    st.tuples(st.just("commit"), st.just(""), st.just(0.0)),
)


def _pending(sched: Scheduler) -> dict[str, tuple[int, list[str], int, float]]:
    return {key: (ks.pending.id, ks.pending.payload.argv, ks.pending.coalesced,
                  round(ks.pending.due, 6))
            for key, ks in sched.keys.items() if ks.pending is not None}


@settings(max_examples=150, deadline=None)
@given(steps=st.lists(step, max_size=60), fold_at=st.sampled_from([1, 3, 4096]),
       fold_bytes=st.sampled_from([300, 1 << 20]))
def test_a_new_daemon_finds_the_pending_invocations_the_last_commit_held(
        tmp_path_factory: pytest.TempPathFactory, steps: list[tuple[str, str, float]],
        fold_at: int, fold_bytes: int) -> None:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(journal_module, "FOLD", fold_at)
        patch.setattr(journal_module, "FOLD_BYTES", fold_bytes)
        _replay_and_reload(str(tmp_path_factory.mktemp("state")), steps)


def _replay_and_reload(state: str, steps: list[tuple[str, str, float]]) -> None:
    """Replays ``steps`` on a scheduler whose journal commits when told, then reads the
    journal back as the next daemon would."""
    clock = FakeClock(now=100.0, wall_offset=0.0)
    journal = Journal(state, SOCKET)
    journal.open()
    sched = Scheduler(clock.monotonic, observer=journal.observe)
    committed: dict[str, tuple[int, list[str], int, float]] = {}
    for n, (what, key, value) in enumerate(steps):
        if what == "submit":
            sched.submit(key, Options(delay=value), Job([f"cmd-{n}"], "/", {"N": str(n)}))
        elif what == "cancel":
            sched.cancel(key)
        elif what == "advance":
            clock.advance(value)
            for effect in sched.tick():
                if isinstance(effect, StartRun):  # each run ends at once
                    sched.run_exited(effect.run.id, 0)
        else:
            journal.commit(sched, 0.0)
            committed = _pending(sched)
    journal.close()  # (a killed daemon: no fold at its end)

    again = Journal(state, SOCKET)
    again.open()
    restored = again.load()
    found = {inv.key: (inv.id, inv.argv, inv.coalesced, round(inv.due_at, 6))
             for inv in restored.pending}
    again.close()
    assert found == committed
    ids = [inv_id for inv_id, *_ in committed.values()]
    assert restored.next_id > max(ids, default=0)


def _opened(tmp_path: Path) -> tuple[Journal, Scheduler]:
    """A journal in ``tmp_path`` and a scheduler on fake time that reports to it."""
    journal = Journal(str(tmp_path), SOCKET)
    journal.open()
    return journal, Scheduler(FakeClock(now=100.0, wall_offset=0.0).monotonic,
                              observer=journal.observe)


def _wal_frames(path: str) -> int:
    db = sqlite3.connect(path)
    try:
        return int(db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[1])
    finally:
        db.close()


def test_a_commit_of_new_keys_writes_a_page_or_two_not_one_per_key(tmp_path: Path) -> None:
    """Eight keys among two thousand pending ones: their rows go to the end of the intake,
    not each into its own page of the table (a 4 KiB WAL frame each)."""
    journal, sched = _opened(tmp_path)
    env = {"PATH": "/usr/bin:/bin", "HOME": "/home/someone"}
    for i in range(2000):
        sched.submit(f"key-{i:05d}", Options(delay=3600.0), Job(["make", "-C", "docs"], "/", env))
    journal.commit(sched, 0.0)
    assert journal.db is not None
    journal.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # start counting from nothing
    commits = 50
    for c in range(commits):
        for i in range(8):  # eight keys spread over the table, as eight clients would send
            key = f"key-{(c * 8 + i) * 37 % 2000:05d}"
            sched.submit(key, Options(delay=3600.0), Job(["make", "-C", "docs"], "/", env))
        journal.commit(sched, 0.0)
    frames = _wal_frames(journal.path)
    journal.close()
    assert frames / commits <= 3, f"{frames / commits:.1f} WAL frames per commit of 8 keys"


def test_a_daemon_that_stops_leaves_its_intake_folded_into_the_table(tmp_path: Path) -> None:
    """A clean stop folds the intake: the pending table alone holds the work, as a daemon of
    an earlier version reads it."""
    journal, sched = _opened(tmp_path)
    for i in range(10):
        sched.submit(f"k{i % 4}", Options(delay=60.0), Job([f"c{i}"], "/", {}))
        journal.commit(sched, 0.0)
    assert journal.db is not None
    assert journal.db.execute("SELECT count(*) FROM intake").fetchone()[0] == 10
    journal.commit(sched, 0.0, fold=True)
    journal.close()
    db = sqlite3.connect(journal.path)
    try:
        assert db.execute("SELECT count(*) FROM intake").fetchone()[0] == 0
        rows = dict(db.execute("SELECT key, argv FROM pending").fetchall())
    finally:
        db.close()
    assert rows == {"k0": '["c8"]', "k1": '["c9"]', "k2": '["c6"]', "k3": '["c7"]'}


def test_a_key_standing_for_many_invocations_does_not_swell_the_intake(tmp_path: Path) -> None:
    """A hot key's row carries the ids it stands for (up to 1,000: 7 KB): commits of it fold
    by size, so the journal holds a megabyte or two of them, not every commit's copy."""
    journal, sched = _opened(tmp_path)
    state = str(tmp_path)
    for _ in range(1500):
        sched.submit("hot", Options(delay=60.0), Job(["make"], "/", {}))
        journal.commit(sched, 0.0)
    assert journal.db is not None
    held = journal.db.execute("SELECT count(*), sum(length(covered)) FROM intake").fetchone()
    journal.close()
    assert held[1] <= 2 << 20, held  # (every copy kept: 5.0 MB)
    again = Journal(state, SOCKET)
    again.open()
    (inv,) = again.load().pending
    again.close()
    assert inv.coalesced == 1500 and inv.covered is not None and len(inv.covered) == 1000


def test_a_stop_whose_last_turn_was_not_committed_still_leaves_no_intake(tmp_path: Path) -> None:
    """The stop's commit carries the last turn's changes straight into the table, even when
    the intake was empty: nothing is left where a daemon of an earlier version would not look."""
    journal, sched = _opened(tmp_path)
    sched.submit("k", Options(delay=60.0), Job(["late"], "/", {}))
    journal.commit(sched, 0.0, fold=True)
    assert journal.db is not None
    assert journal.db.execute("SELECT count(*) FROM intake").fetchone()[0] == 0
    assert journal.db.execute("SELECT argv FROM pending").fetchall() == [('["late"]',)]
    journal.close()
