"""The journal under replayed histories: two daemons on two sockets sharing one journal file,
random submissions (plain, ``--collect``, ``--no-defer``), cancels, runs that start, note
their pid and end, commits that fail at a random statement (rolled back, as on a full disk),
``kill -9`` restarts and clean stops (which fold the intake), each restart going through the
daemon's own start-up (``_put_back``, ``settle``, ``_run_again``, ``prune_envs``).

After every restart the new daemon must find exactly what the last successful commit held:
the same pending invocations (id, command line, count, due time, batch), the same unfinished
runs, and an id counter past every id it ever accepted (an id handed out again would make
``debounce wait --invocation`` answer for another invocation)."""

from __future__ import annotations

import random
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from debounce_cli import journal as journal_module
from debounce_cli.clock import FakeClock
from debounce_cli.daemon import startup
from debounce_cli.daemon.jobs import Job
from debounce_cli.journal import Journal, JournalError
from debounce_cli.scheduler import Options, Run, Scheduler, StartRun

KEYS = ["a", "b", "c", "d", "k\udcff"]

Pending = dict[str, tuple[int, list[str], int, float, list[list[str]] | None]]


class FailingDB:
    """A journal's connection whose ``fail_at``-th statement of a transaction fails as a full
    disk does."""

    def __init__(self, db: sqlite3.Connection, fail_at: int) -> None:
        self._db, self.fail_at, self.count, self.in_transaction = db, fail_at, 0, False

    def _statement(self, sql: str) -> None:
        if sql.startswith("BEGIN"):
            self.in_transaction, self.count = True, 0
            return
        if sql == "ROLLBACK":
            self.in_transaction = False
            return
        self.count += 1
        if self.in_transaction and self.count == self.fail_at:
            raise sqlite3.OperationalError("database or disk is full")
        if sql == "COMMIT":
            self.in_transaction = False

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        self._statement(sql)
        return self._db.execute(sql, *args)

    def executemany(self, sql: str, *args: Any) -> sqlite3.Cursor:
        self._statement(sql)
        return self._db.executemany(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._db, name)


class Daemon:
    """One socket's daemon: its scheduler and journal, and what its last good commit held."""

    def __init__(self, state: str, socket: str, clock: FakeClock, rnd: random.Random) -> None:
        self.state, self.socket, self.clock, self.rnd = state, socket, clock, rnd
        self.committed: Pending = {}
        self.committed_runs: set[int] = set()
        self.accepted: set[int] = set()  # every invocation id a good commit held
        self.running: list[Run] = []
        self.start(first=True)

    def pending(self) -> Pending:
        offset = self.clock.wall() - self.clock.monotonic()
        found: Pending = {}
        for key, ks in self.sched.keys.items():
            inv = ks.pending
            if inv is not None:
                batch = [p.argv for p in inv.batch] if inv.batch else None
                found[key] = (inv.id, list(inv.payload.argv), inv.coalesced,
                              round(inv.due + offset, 4), batch)
        return found

    def start(self, first: bool = False) -> None:
        journal = Journal(self.state, self.socket)
        journal.open()
        restored = journal.load()
        found = {p.key: (p.id, p.argv, p.coalesced, round(p.due_at, 4), p.batch)
                 for p in restored.pending}
        unfinished = {r.run_id for r in restored.unfinished}
        if not first:
            assert found == self.committed, (self.socket, found, self.committed)
            assert unfinished == self.committed_runs, (self.socket, unfinished)
            again = sorted(i for i in self.accepted if i >= restored.next_id)
            assert not again, f"ids handed out again from {restored.next_id}: {again}"
        sched = Scheduler(self.clock.monotonic, wall=self.clock.wall,
                          first_id=restored.next_id, first_run_id=restored.next_run_id)
        startup._put_back(sched, restored, self.clock)
        lost = [r.run_id for r in restored.unfinished if r.pid]
        if lost:
            journal.settle(lost, [])
        for run in restored.unfinished:
            if not run.pid:
                startup._run_again(journal, sched, run, self.clock)
        journal.prune_envs()
        sched.observer = journal.observe
        self.sched, self.journal = sched, journal
        self.committed = found
        self.committed_runs = unfinished - set(lost)
        self.running = []

    def kill9(self) -> None:
        self.journal.close()
        self.start()

    def commit(self, fold: bool = False, fail_at: int | None = None) -> None:
        journal = self.journal
        real = journal.db
        assert real is not None
        if fail_at is not None:
            journal.db = FailingDB(real, fail_at)  # type: ignore[assignment]
        try:
            journal.commit(self.sched, self.clock.wall() - self.clock.monotonic(), fold=fold)
        except JournalError:
            return
        finally:
            journal.db = real
        self.committed = self.pending()
        self.committed_runs = set(self.sched.runs)
        self.accepted |= {inv_id for inv_id, *_ in self.committed.values()}

    def step(self, n: int) -> None:
        rnd = self.rnd
        what = rnd.choice(["submit"] * 5 + ["cancel", "advance", "advance", "end", "pid",
                                            "commit", "commit", "commit", "fail", "kill9",
                                            "stop"])
        if what == "submit":
            options = Options(delay=rnd.choice([0.0, 1.0, 5.0]), collect=rnd.random() < 0.3,
                              defer=rnd.random() > 0.1)
            job = Job([f"cmd-{self.socket[-1]}-{n}"], "/", {"N": str(n % 3)})
            self.sched.submit(rnd.choice(KEYS), options, job)
        elif what == "cancel":
            key = rnd.choice(KEYS)
            ks = self.sched.keys.get(key)
            ids = list(ks.pending.covered or [ks.pending.id]) if ks and ks.pending else []
            if self.sched.cancel(key)[0]:
                self.journal.cancelled(key, ids)
        elif what == "advance":
            self.clock.advance(rnd.choice([0.5, 2.0, 6.0]))
            self.running += [e.run for e in self.sched.tick() if isinstance(e, StartRun)]
        elif what == "end" and self.running:
            run = self.running.pop(rnd.randrange(len(self.running)))
            if run.id in self.sched.runs:
                effects = self.sched.run_exited(run.id, 0)
                self.running += [e.run for e in effects if isinstance(e, StartRun)]
        elif what == "pid" and self.running:
            run = rnd.choice(self.running)
            if run.id in self.sched.runs and run.invocation.payload.pid is None:
                run.invocation.payload.pid = 4242
                self.journal.note_run(run)
        elif what == "commit":
            self.commit()
        elif what == "fail":
            self.commit(fail_at=rnd.randint(1, 12))
        elif what == "kill9":
            self.kill9()
        elif what == "stop":
            self.commit(fold=True)
            self.kill9()


def _replay(seed: int, state: str) -> None:
    rnd = random.Random(seed)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(journal_module, "FOLD", rnd.choice([1, 2, 3, 8, 4096]))
        patch.setattr(journal_module, "FOLD_BYTES", rnd.choice([200, 1000, 1 << 20]))
        clock = FakeClock(now=100.0, wall_offset=1000.0)
        daemons = [Daemon(state, "/tmp/replay/A", clock, rnd),
                   Daemon(state, "/tmp/replay/B", clock, rnd)]
        for n in range(rnd.randint(20, 120)):
            rnd.choice(daemons).step(n)
        for daemon in daemons:
            daemon.kill9()
            daemon.journal.close()


@pytest.mark.parametrize("first", range(0, 300, 50))
def test_every_restart_finds_what_the_last_good_commit_held(first: int, tmp_path: Path) -> None:
    for seed in range(first, first + 50):
        state = tmp_path / f"seed-{seed}"
        state.mkdir()
        _replay(seed, str(state))


def test_a_collect_batch_that_ran_does_not_come_back_with_the_next_invocation(
        tmp_path: Path) -> None:
    """A batch restored by a new daemon, run and ended there, left its rows in the journal:
    the next batch of its key was stored over the first ones only, and a daemon after that
    ran the old invocation again with it."""
    clock = FakeClock(now=100.0, wall_offset=0.0)
    first = Daemon(str(tmp_path), "/tmp/replay/A", clock, random.Random(0))
    for name in ("old-0", "old-1", "old-2"):
        first.sched.submit("k", Options(delay=1.0, collect=True), Job([name], "/", {}))
    first.commit()
    first.kill9()  # the second daemon: it runs the batch
    clock.advance(2.0)
    (run,) = [e.run for e in first.sched.tick() if isinstance(e, StartRun)]
    first.commit()
    first.sched.run_exited(run.id, 0)
    for name in ("new-0", "new-1"):
        first.sched.submit("k", Options(delay=60.0, collect=True), Job([name], "/", {}))
    first.commit()
    first.journal.close()
    third = Journal(str(tmp_path), "/tmp/replay/A")
    third.open()
    (pending,) = third.load().pending
    third.close()
    assert pending.batch == [["new-0"], ["new-1"]]


def test_a_cancelled_invocations_id_is_not_handed_out_again(tmp_path: Path) -> None:
    """``debounce wait --invocation N`` finds N cancelled after a restart: N must stay N's."""
    clock = FakeClock(now=100.0, wall_offset=0.0)
    daemon = Daemon(str(tmp_path), "/tmp/replay/A", clock, random.Random(0))
    daemon.sched.submit("k", Options(delay=60.0), Job(["true"], "/", {}))
    daemon.commit()
    ids = [daemon.sched.keys["k"].pending.id]  # type: ignore[union-attr]
    daemon.sched.cancel("k")
    daemon.journal.cancelled("k", ids)
    daemon.commit()
    daemon.kill9()
    daemon.journal.close()
    again = Journal(str(tmp_path), "/tmp/replay/A")
    again.open()
    next_id = again.load().next_id
    assert again.was_cancelled(ids[0]) == "k"
    again.close()
    assert next_id > ids[0]
