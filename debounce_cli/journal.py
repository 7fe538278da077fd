"""Durable state in SQLite: pending invocations, run history, and the output logs' index.

The rule it keeps: **an acknowledged invocation runs exactly once, unless it is cancelled**
(or coalesced into a later one whose run stands for it). The daemon changes its scheduler
first and commits afterwards, once per turn of its event loop (group commit); it acknowledges
a submission only after the commit that holds it, and a run is recorded before its process
can exist (a run the journal cannot record waits unstarted). So the journal always holds a
state the daemon really had, and everything a client was told is in it. After a crash, each
run left unfinished either started (its process noted its id in the started ledger, see
``runner.RunProcess``; what is left of it is killed, and it is recorded lost, or with the exit
status its daemon saw) or never did, and then its invocation is pending again (its
environment and options stay in its row until it finishes, for that).

What is written is a snapshot, not a log of events: the scheduler reports which keys and runs
changed (its ``observer``), and :meth:`Journal.commit` writes each changed key's current
pending invocation, or that nothing is pending any more. A key touched a thousand times in
one turn costs one row write. Those rows are appended to the ``intake`` table, in the order
of their commits, rather than put in their place in ``pending``: a commit of eight keys then
writes one or two pages instead of eight scattered ones (each a 4 KiB frame in the WAL).
Every ``FOLD`` rows or so a commit folds the intake into ``pending`` (each key it names
written once, in its current state) and empties it. The pending invocations are those of
``pending`` with the intake's rows laid over them in order, a row without an ``id`` saying
that the key has none.

The database runs in WAL mode with ``synchronous=NORMAL``: a commit survives the daemon's death
(``kill -9``, a crash, an OOM kill) because it is in the operating system's hands before the
daemon goes on; a power cut may lose the last moments. Every daemon keeps its rows under its
socket's path, so daemons on different sockets can share one state directory without seeing
each other's work.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from debounce_cli.options import HISTORY_LIMIT
from debounce_cli.protocol import RunRecord
from debounce_cli.scheduler import Covered, Invocation, Options, Run, Scheduler
from debounce_cli.states import EXITED, FINISHED, LOST

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS envs (
    id INTEGER PRIMARY KEY,
    digest TEXT NOT NULL UNIQUE,
    env TEXT NOT NULL,
    socket TEXT
);
CREATE TABLE IF NOT EXISTS pending (
    socket TEXT NOT NULL,
    key TEXT NOT NULL,
    id INTEGER NOT NULL,
    argv TEXT NOT NULL,
    cwd TEXT NOT NULL,
    env_id INTEGER NOT NULL REFERENCES envs(id),
    options TEXT NOT NULL,
    received_at REAL NOT NULL,
    due_at REAL NOT NULL,
    first_at REAL NOT NULL,
    coalesced INTEGER NOT NULL,
    leading_edge INTEGER NOT NULL,
    state TEXT NOT NULL,
    PRIMARY KEY (socket, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS intake (
    seq INTEGER PRIMARY KEY,
    socket TEXT NOT NULL,
    key TEXT NOT NULL,
    id INTEGER,
    argv TEXT,
    cwd TEXT,
    env_id INTEGER,
    options TEXT,
    received_at REAL,
    due_at REAL,
    first_at REAL,
    coalesced INTEGER,
    leading_edge INTEGER,
    state TEXT,
    batch TEXT,
    covered TEXT,
    covered_more INTEGER
);
CREATE TABLE IF NOT EXISTS runs (
    socket TEXT NOT NULL,
    run_id INTEGER NOT NULL,
    key TEXT NOT NULL,
    argv TEXT NOT NULL,
    cwd TEXT NOT NULL,
    coalesced INTEGER NOT NULL,
    started_at REAL NOT NULL,
    due_at REAL,
    inv_id INTEGER,
    finished_at REAL,
    exit_code INTEGER,
    outcome TEXT,
    pid INTEGER,
    log_path TEXT,
    PRIMARY KEY (socket, run_id)
);
CREATE INDEX IF NOT EXISTS runs_by_key ON runs (socket, key, run_id);
CREATE TABLE IF NOT EXISTS cancelled (
    socket TEXT NOT NULL,
    inv_id INTEGER NOT NULL,
    key TEXT NOT NULL,
    cancelled_at REAL NOT NULL,
    PRIMARY KEY (socket, inv_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS batches (
    socket TEXT NOT NULL,
    key TEXT NOT NULL,
    seq INTEGER NOT NULL,
    argv TEXT NOT NULL,
    PRIMARY KEY (socket, key, seq)
) WITHOUT ROWID;
"""

#: The intake is folded into ``pending`` by the commit that would take it past this many rows,
#: or past twice as many rows as keys it names (so it never holds much more than the keys
#: changed since the last fold), or past FOLD_BYTES of rows (a key standing for many
#: invocations keeps their ids in its row: up to 1,000 of them, 7 KB).
FOLD = 4096
FOLD_BYTES = 1 << 20

#: Cancelled invocations remembered for ``debounce wait --invocation`` (the newest).
CANCELLED_KEPT = 10_000

#: Columns added after the first journals were written: (table, column, type).
_ADDED_COLUMNS = [
    ("runs", "due_at", "REAL"), ("runs", "inv_id", "INTEGER"), ("envs", "socket", "TEXT"),
    ("runs", "env_id", "INTEGER"), ("runs", "options", "TEXT"), ("pending", "batch", "TEXT"),
    ("runs", "batch", "TEXT"), ("pending", "covered", "TEXT"), ("runs", "covered", "TEXT"),
    ("pending", "covered_more", "INTEGER"), ("runs", "covered_more", "INTEGER"),
]

class JournalError(Exception):
    """The journal cannot be written; ``str()`` says why and what to do."""


@dataclass(slots=True)
class StoredInvocation:
    """A pending invocation as the journal keeps it; times are wall-clock seconds.

    ``env`` is ``None`` when its environment row is missing (a journal damaged by hand).
    """

    key: str
    id: int
    argv: list[str]
    cwd: str
    env: dict[str, str] | None
    options: dict[str, Any]
    received_at: float
    due_at: float
    first_at: float
    coalesced: int
    leading_edge: bool
    state: str
    batch: list[list[str]] | None = None  # --collect: the argv of each coalesced invocation
    covered: Covered | None = None  # the invocations it stands for (None: only itself)


@dataclass(slots=True)
class UnfinishedRun:
    """A run that had not finished when its daemon died: it started, or it never did.

    It carries what is needed to run it after all if it never started (its invocation's id,
    argv, cwd, environment and options, and with ``--collect`` the argv of every invocation
    it stands for; ``env``, ``options`` or ``batch`` is ``None`` in journals written before
    they were kept), and its ``pid`` if that was committed.
    """

    run_id: int
    key: str
    pid: int | None
    invocation: int | None
    argv: list[str]
    cwd: str
    env: dict[str, str] | None
    options: dict[str, Any] | None
    coalesced: int
    batch: list[list[str]] | None = None  # --collect: the argv of each invocation it stands for
    covered: Covered | None = None  # the invocations it stands for


@dataclass
class Restored:
    """What a daemon finds in the journal for its socket when it starts."""

    pending: list[StoredInvocation]
    unfinished: list[UnfinishedRun]  # runs not finished when the last daemon died
    next_id: int
    next_run_id: int


def _t(text: str) -> str | bytes:
    """Text for SQLite. A key or path from bytes that are not UTF-8 (Python carries them as
    surrogates) cannot be stored as TEXT; it is stored as the original bytes instead."""
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        # A lone surrogate that stands for no byte: refused at the edge (protocol.decode),
        # so this is defence only. Stored all the same, so that one value never wedges the
        # journal for every other key.
        return text.encode("utf-8", "surrogatepass")


def _s(value: str | bytes) -> str:
    """The text stored by :func:`_t`, as Python had it."""
    return value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else value


def _describe(exc: Exception, where: str, reading: bool = False) -> str:
    text = str(exc)
    if reading:
        return f"cannot read {where} ({text}); check the file, or move it aside to start afresh"
    lowered = text.lower()
    if "full" in lowered:
        return f"the disk holding {where} is full; free some space and retry"
    if "readonly" in lowered or "read-only" in lowered or "permission" in lowered:
        return f"{where} is read-only; make it writable and retry"
    return f"cannot write {where} ({text}); check the disk and retry"


class Journal:
    """The state of one daemon (one socket) inside a shared state directory."""

    def __init__(self, state_dir: str, socket: str):
        self.state_dir = state_dir
        self.socket = _t(socket)
        self.socket_path = socket
        self.path = os.path.join(state_dir, "journal.db")
        self.db: sqlite3.Connection | None = None
        self.dirty_keys: set[str] = set()
        self.dirty_runs: dict[int, Run] = {}
        self.env_ids: dict[str, int] = {}
        self.env_objects: dict[int, tuple[dict[str, str], int]] = {}
        self.argv_objects: dict[int, tuple[list[str], str]] = {}
        self.broken: str | None = None  # why the last commit failed, until one succeeds
        self.forgotten_runs: list[int] = []  # run rows to delete with the next commit
        #: Invocations cancelled since the last commit: (key, ids, wall-clock time).
        self.cancellations: list[tuple[str, list[int], float]] = []
        #: --collect batches of pending invocations: per key, the batch list and how many of
        #: its items are in the ``batches`` table. A batch only grows at its end (what was
        #: committed cannot be taken back), so each commit writes only the new items.
        self.batch_rows: dict[str, tuple[list[Any], int]] = {}
        #: The keys the intake has rows of, how many rows it has, and about how many bytes
        #: (see FOLD).
        self.intake_keys: set[str] = set()
        self.intake_rows = 0
        self.intake_bytes = 0
        #: Runs not finished whose row a commit wrote: the next write of each is an update.
        self.run_rows: set[int] = set()

    # ------------------------------------------------------------------ opening
    def open(self) -> None:
        old_umask = os.umask(0o077)
        try:
            self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.execute("PRAGMA busy_timeout=5000")
            self.db.execute("PRAGMA wal_autocheckpoint=10000")  # fewer checkpoints (fsyncs)
            self.db.executescript(_SCHEMA)
            for table, column, kind in _ADDED_COLUMNS:  # journals written by earlier versions
                columns = {row[1] for row in self.db.execute(f"PRAGMA table_info({table})")}
                if column not in columns:
                    self.db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
            self.db.execute(
                "INSERT OR IGNORE INTO meta (name, value) VALUES ('schema', ?)",
                (str(SCHEMA_VERSION),),
            )
        except sqlite3.Error as exc:
            raise JournalError(_describe(exc, self._unwritable() or self.path)) from None
        finally:
            os.umask(old_umask)
        for suffix in ("", "-wal", "-shm"):
            try:
                os.chmod(self.path + suffix, 0o600)
            except OSError:
                pass

    def _unwritable(self) -> str | None:
        """Which of the journal's files cannot be written, if one exists and cannot (SQLite
        names the database whichever of them it was)."""
        for suffix in ("", "-wal", "-shm"):
            path = self.path + suffix
            if os.path.lexists(path) and not os.access(path, os.W_OK):
                return path
        return None

    def close(self) -> None:
        if self.db is not None:
            self.db.close()
            self.db = None

    # ------------------------------------------------------------------ writing
    def observe(self, state: str, obj: Invocation | Run) -> None:
        """The scheduler's observer: remember what changed until the next commit."""
        if isinstance(obj, Run):
            self.dirty_runs[obj.id] = obj
        else:
            self.dirty_keys.add(obj.key)

    def forget_unwritten(self, run: Run) -> None:
        """A run taken back before any commit held it: it is never to be written."""
        self.dirty_runs.pop(run.id, None)

    def note_run(self, run: Run) -> None:
        """A run's details changed outside the scheduler (its pid, its log)."""
        self.dirty_runs[run.id] = run

    def cancelled(self, key: str, ids: list[int]) -> None:
        """``debounce cancel`` dropped the invocations ``ids``: remember it with the next commit,
        for ``debounce wait --invocation``."""
        self.cancellations.append((key, ids, time.time()))

    @property
    def dirty(self) -> bool:
        return bool(self.dirty_keys or self.dirty_runs or self.forgotten_runs
                    or self.cancellations)

    def commit(self, scheduler: Scheduler, wall_offset: float, fold: bool = False) -> None:
        """Write every changed key and run in one transaction; raise JournalError on failure.

        ``wall_offset`` turns the scheduler's monotonic times into wall-clock times. On failure
        nothing is forgotten: the same changes are written by the next commit that succeeds.
        With ``fold`` (a daemon that stops) the intake is folded into ``pending`` now.
        """
        if not (self.dirty or (fold and self.intake_rows)):
            return
        batch_rows: dict[str, tuple[list[Any], int] | None] = {}
        keys = self.dirty_keys
        added = self.intake_rows + len(keys)
        fold = fold or (bool(self.intake_rows) and (
            self.intake_bytes > FOLD_BYTES or added > max(FOLD, 2 * len(self.intake_keys))))
        if fold:
            keys = self.intake_keys | keys
        with self._transaction() as db:
            gone, rows = [], []
            for key in keys:
                ks = scheduler.keys.get(key)
                inv = ks.pending if ks is not None else None
                if inv is None:
                    gone.append((self.socket, _t(key)))
                else:
                    rows.append(self._pending_row(db, inv, wall_offset))
                batch = inv.batch if inv is not None else ()
                if batch or key in self.batch_rows:
                    batch_rows[key] = self._write_batch(db, key, batch)
            if fold:
                db.executemany("DELETE FROM pending WHERE socket = ? AND key = ?", gone)
                db.executemany(f"INSERT OR REPLACE INTO pending {_PENDING_COLUMNS}", rows)
                db.execute("DELETE FROM intake WHERE socket = ?", (self.socket,))
            else:
                db.executemany("INSERT INTO intake (socket, key) VALUES (?, ?)", gone)
                db.executemany(f"INSERT INTO intake {_PENDING_COLUMNS}", rows)
            for run in self.dirty_runs.values():
                self._write_run(db, run)
            if self.forgotten_runs:
                db.executemany("DELETE FROM runs WHERE socket = ? AND run_id = ?",
                               [(self.socket, run_id) for run_id in self.forgotten_runs])
            if self.cancellations:
                db.executemany(
                    "INSERT OR REPLACE INTO cancelled (socket, inv_id, key, cancelled_at) "
                    "VALUES (?, ?, ?, ?)",
                    [(self.socket, inv_id, _t(key), when)
                     for key, ids, when in self.cancellations for inv_id in ids],
                )
        if fold:
            self.intake_keys.clear()
            self.intake_rows = self.intake_bytes = 0
        else:
            self.intake_keys |= keys
            self.intake_rows = added
            self.intake_bytes += sum(_ROW_BYTES + len(row[3]) + len(row[14] or "")
                                     for row in rows) + _ROW_BYTES * len(gone)
        for key, written in batch_rows.items():  # only once the commit holds them
            if written is None:
                self.batch_rows.pop(key, None)
            else:
                self.batch_rows[key] = written
        for run in self.dirty_runs.values():
            if run.state == FINISHED:
                self.run_rows.discard(run.id)
            else:
                self.run_rows.add(run.id)
        self.run_rows.difference_update(self.forgotten_runs)
        self.dirty_keys.clear()
        self.dirty_runs.clear()
        self.forgotten_runs.clear()
        self.cancellations.clear()

    def _write_batch(self, db: sqlite3.Connection, key: str, batch: Any
                     ) -> tuple[list[Any], int] | None:
        """Bring the ``batches`` rows of ``key`` up to its pending batch: the items added
        since the last commit, or the whole batch when it is another list than before."""
        known = self.batch_rows.get(key)
        start = 0
        if known is not None and batch and known[0] is batch and known[1] <= len(batch):
            start = known[1]
        elif known is not None:
            db.execute("DELETE FROM batches WHERE socket = ? AND key = ?", (self.socket, _t(key)))
        if not batch:
            return None
        assert isinstance(batch, list)
        if start < len(batch):
            db.executemany(
                "INSERT OR REPLACE INTO batches (socket, key, seq, argv) VALUES (?, ?, ?, ?)",
                [(self.socket, _t(key), seq, self._argv_json(batch[seq].argv))
                 for seq in range(start, len(batch))],
            )
        return batch, len(batch)

    def refusal(self) -> str | None:
        """Why new invocations cannot be stored now, or ``None`` when they can.

        After a failed commit every call probes the disk again, so the daemon takes new
        submissions as soon as space is freed.
        """
        if self.broken is not None and not self.probe():
            return self.broken
        return None

    def probe(self) -> bool:
        """After a failure: can the journal be written again? Clears ``broken`` when it can."""
        try:
            with self._transaction() as db:
                db.execute("INSERT OR REPLACE INTO meta (name, value) VALUES ('probe', ?)",
                           (str(time.time()),))
        except JournalError:
            return False
        return True

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; a failure rolls it back, sets ``broken`` and raises."""
        db = self.db
        assert db is not None
        try:
            db.execute("BEGIN IMMEDIATE")
            yield db
            db.execute("COMMIT")
        except Exception as exc:  # noqa: BLE001 - whatever failed, the transaction must end
            try:
                db.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            self.env_ids.clear()  # ids handed out in the failed transaction are void
            self.env_objects.clear()
            self.broken = _describe(exc, self.state_dir)
            raise JournalError(self.broken) from None
        self.broken = None

    def _env_id(self, db: sqlite3.Connection, env: dict[str, str]) -> int:
        # The daemon hands identical environments over as one shared dict, so most look-ups
        # end here, by identity, without serialising the environment again.
        known = self.env_objects.get(id(env))
        if known is not None and known[0] is env:
            return known[1]
        text = json.dumps(env, sort_keys=True, separators=(",", ":"))
        # Each socket keeps its own rows, so one daemon's clean-up never takes another's.
        digest = hashlib.blake2b(os.fsencode(self.socket_path) + b"\0" + text.encode(),
                                 digest_size=16).hexdigest()
        env_id = self.env_ids.get(digest)
        if env_id is None:
            db.execute("INSERT OR IGNORE INTO envs (digest, env, socket) VALUES (?, ?, ?)",
                       (digest, text, self.socket))
            env_id = db.execute("SELECT id FROM envs WHERE digest = ?", (digest,)).fetchone()[0]
            if len(self.env_ids) >= 4096:
                self.env_ids.clear()
            self.env_ids[digest] = env_id
        if len(self.env_objects) >= 4096:
            self.env_objects.clear()
        self.env_objects[id(env)] = (env, env_id)  # holding env keeps its id from being reused
        return env_id

    def _argv_json(self, argv: list[str]) -> str:
        """Command lines are shared like environments: serialise each list once."""
        known = self.argv_objects.get(id(argv))
        if known is not None and known[0] is argv:
            return known[1]
        text = json.dumps(argv)
        if len(self.argv_objects) >= 4096:
            self.argv_objects.clear()
        self.argv_objects[id(argv)] = (argv, text)  # holding argv keeps its id from reuse
        return text

    def _pending_row(self, db: sqlite3.Connection, inv: Invocation, offset: float
                     ) -> tuple[Any, ...]:
        job = inv.payload
        return (
            self.socket, _t(inv.key), inv.id, self._argv_json(job.argv), _t(job.cwd),
            self._env_id(db, job.env), _options_json(inv.options), inv.received_at + offset,
            inv.due + offset, inv.first_at + offset, inv.coalesced, int(inv.leading_edge),
            inv.state, None, *_covered_columns(inv.covered),
        )

    def _write_run(self, db: sqlite3.Connection, run: Run) -> None:
        job = run.invocation.payload
        # Until it has finished, a run keeps what it needs to run again: after a crash, a run
        # whose process never started is put back as pending (see daemon.startup).
        unfinished = run.state != FINISHED
        env_id = self._env_id(db, job.env) if unfinished else None
        options = _options_json(run.invocation.options) if unfinished else None
        # --collect: the invocations the run stands for, or a run put back would run only
        # the last one's argument.
        batch = run.invocation.batch
        batch_json = json.dumps([p.argv for p in batch]) if unfinished and batch else None
        values = (
            self._argv_json(job.argv), _t(job.cwd), run.coalesced,
            run.started_wall, run.due_wall, run.invocation.id,
            run.finished_wall if run.state == FINISHED else None,
            run.exit_code if run.state == FINISHED else None,
            run.outcome if run.state == FINISHED else None,
            job.pid, job.log_path, env_id, options, batch_json,
            *_covered_columns(run.covered), self.socket, run.id,
        )
        # A run is written when it starts, when its pid is known and when it ends: its row
        # is updated in place after the first (a quarter of the cost of replacing it, which
        # rewrites its entry in the index by key as well).
        if run.id not in self.run_rows or db.execute(_UPDATE_RUN, values).rowcount == 0:
            db.execute(_INSERT_RUN, (*values[-2:], _t(run.key), *values[:-2]))

    # ------------------------------------------------------------------ start-up
    def load(self) -> Restored:
        """Read what the previous daemon on this socket left: pending work and lost runs."""
        try:
            return self._load()
        except (sqlite3.Error, ValueError) as exc:
            raise JournalError(_describe(exc, self.path, reading=True)) from None

    def _load(self) -> Restored:
        db = self.db
        assert db is not None
        pending = []
        columns = ("p.key, p.id, p.argv, p.cwd, e.env, p.options, p.received_at, p.due_at, "
                   "p.first_at, p.coalesced, p.leading_edge, p.state, p.batch, p.covered, "
                   "p.covered_more")
        # The table's rows, then the intake's over them in their order (see the module).
        self.intake_keys, self.intake_rows, self.intake_bytes = set(), 0, 0
        latest = {row[0]: row for row in db.execute(
            f"SELECT {columns} FROM pending p LEFT JOIN envs e ON e.id = p.env_id "
            "WHERE p.socket = ?", (self.socket,))}
        for row in db.execute(
                f"SELECT {columns} FROM intake p LEFT JOIN envs e ON e.id = p.env_id "
                "WHERE p.socket = ? ORDER BY p.seq", (self.socket,)):
            latest[row[0]] = row
            self.intake_keys.add(_s(row[0]))
            self.intake_rows += 1
            self.intake_bytes += _ROW_BYTES + len(row[2] or "") + len(row[13] or "")
        rows = sorted((row for row in latest.values() if row[1] is not None),
                      key=lambda row: row[6])  # by received_at
        batches: dict[str, list[list[str]]] = {}
        for key, argv in db.execute(
                "SELECT key, argv FROM batches WHERE socket = ? ORDER BY key, seq",
                (self.socket,)):
            batches.setdefault(_s(key), []).append(json.loads(argv))
        # Rows of a batch the last daemon left: the first write of their key replaces them
        # all (kept unknown, they outlived their run and came back with the next batch).
        self.batch_rows = {key: ([], 0) for key in batches}
        for row in rows:
            (key, inv_id, argv, cwd, env, options, received, due, first, coalesced, leading,
             state, batch, covered, covered_more) = row
            key = _s(key)
            pending.append(StoredInvocation(
                key=key, id=inv_id, argv=json.loads(argv), cwd=_s(cwd),
                env=json.loads(env) if env is not None else None,
                options=json.loads(options), received_at=received,
                due_at=due, first_at=first, coalesced=coalesced,
                leading_edge=bool(leading), state=state,
                batch=batches.get(key) or (json.loads(batch) if batch is not None else None),
                covered=_covered_of(covered, covered_more),
            ))
        unfinished = [
            UnfinishedRun(
                run_id=r[0], key=_s(r[1]), pid=r[2], invocation=r[3], argv=json.loads(r[4]),
                cwd=_s(r[5]), env=json.loads(r[6]) if r[6] is not None else None,
                options=json.loads(r[7]) if r[7] is not None else None, coalesced=r[8],
                batch=json.loads(r[9]) if r[9] is not None else None,
                covered=_covered_of(r[10], r[11]),
            )
            for r in db.execute(
                "SELECT r.run_id, r.key, r.pid, r.inv_id, r.argv, r.cwd, e.env, r.options, "
                "r.coalesced, r.batch, r.covered, r.covered_more FROM runs r "
                "LEFT JOIN envs e ON e.id = r.env_id "
                "WHERE r.socket = ? AND r.finished_at IS NULL ORDER BY r.run_id",
                (self.socket,),
            )
        ]
        # Invocation ids name --no-defer keys (KEY#ID): never hand out one a run already had.
        max_id = db.execute(
            "SELECT max(m) FROM (SELECT max(id) AS m FROM pending WHERE socket = ? "
            "UNION ALL SELECT max(id) FROM intake WHERE socket = ? "
            "UNION ALL SELECT max(inv_id) FROM cancelled WHERE socket = ? "
            "UNION ALL SELECT max(inv_id) FROM runs WHERE socket = ?)",
            (self.socket, self.socket, self.socket, self.socket),
        ).fetchone()[0]
        max_run = db.execute(
            "SELECT max(run_id) FROM runs WHERE socket = ?", (self.socket,)
        ).fetchone()[0]
        return Restored(pending, unfinished, (max_id or 0) + 1, (max_run or 0) + 1)

    def settle(self, lost: list[int], ended: list[tuple[int, int, float]]) -> None:
        """Record what became of the runs the previous daemon left unfinished: ``lost`` ones
        died with it; ``ended`` ones (run id, exit status, time) exited before it could say so.
        """
        now = time.time()
        with self._transaction() as db:
            done = ("env_id = NULL, options = NULL, batch = NULL "
                    "WHERE socket = ? AND run_id = ?")
            db.executemany(
                f"UPDATE runs SET finished_at = ?, outcome = ?, {done}",
                [(now, LOST, self.socket, run_id) for run_id in lost],
            )
            db.executemany(
                f"UPDATE runs SET finished_at = ?, exit_code = ?, outcome = ?, {done}",
                [(when, code, EXITED, self.socket, run_id) for run_id, code, when in ended],
            )

    def forget_runs(self, run_ids: list[int]) -> None:
        """Runs that never started: their rows go with the next commit, which also holds
        their invocations put back as pending (one transaction, so neither is lost)."""
        self.forgotten_runs.extend(run_ids)

    def prune_envs(self) -> None:
        """Drop environment snapshots no pending invocation refers to any more."""
        with self._transaction() as db:
            self._prune_envs(db)

    def _prune_envs(self, db: sqlite3.Connection) -> None:
        db.execute(
            "DELETE FROM envs WHERE socket = ? AND id NOT IN "
            "(SELECT env_id FROM pending WHERE socket = ?) AND id NOT IN "
            "(SELECT env_id FROM intake WHERE socket = ? AND env_id IS NOT NULL) AND id NOT IN "
            "(SELECT env_id FROM runs WHERE socket = ? AND finished_at IS NULL "
            " AND env_id IS NOT NULL)",
            (self.socket, self.socket, self.socket, self.socket),
        )
        self.env_ids.clear()
        self.env_objects.clear()

    # ------------------------------------------------------------------ reading
    def history(self, key: str | None = None, limit: int = HISTORY_LIMIT) -> list[RunRecord]:
        """Finished runs, newest first."""
        query = _RUN_COLUMNS + " WHERE socket = ? AND finished_at IS NOT NULL"
        args: list[Any] = [self.socket]
        if key is not None:
            query += " AND key = ?"
            args.append(_t(key))
        query += " ORDER BY run_id DESC LIMIT ?"
        args.append(limit)
        return [_run_record(r) for r in self._read(query, args)]

    def finished_run(self, run_id: int | None = None, key: str | None = None
                     ) -> RunRecord | None:
        """One finished run by id, or the latest finished run of a key."""
        base = _RUN_COLUMNS + " WHERE socket = ? AND finished_at IS NOT NULL"
        if run_id is not None:
            rows = self._read(base + " AND run_id = ?", (self.socket, run_id))
        else:
            rows = self._read(base + " AND key = ? ORDER BY run_id DESC LIMIT 1",
                              (self.socket, _t(key or "")))
        return _run_record(rows[0]) if rows else None

    def covering(self, inv_id: int) -> RunRecord | None:
        """The latest finished run that stood for invocation ``inv_id``."""
        rows = self._read(
            _RUN_COLUMNS + " WHERE socket = ? AND finished_at IS NOT NULL AND (inv_id = ? OR ("
            "instr(covered, ?) AND EXISTS (SELECT 1 FROM json_each(covered) WHERE value = ?)))"
            " ORDER BY run_id DESC LIMIT 1",
            (self.socket, inv_id, str(inv_id), inv_id))
        return _run_record(rows[0]) if rows else None

    def was_cancelled(self, inv_id: int) -> str | None:
        """The key of invocation ``inv_id`` if ``debounce cancel`` dropped it."""
        rows = self._read("SELECT key FROM cancelled WHERE socket = ? AND inv_id = ?",
                          (self.socket, inv_id))
        return _s(rows[0][0]) if rows else None

    def _read(self, query: str, args: Any) -> list[tuple[Any, ...]]:
        db = self.db
        assert db is not None
        try:
            return db.execute(query, args).fetchall()
        except sqlite3.Error as exc:
            raise JournalError(_describe(exc, self.path, reading=True)) from None

    # ------------------------------------------------------------------ retention
    def retain(self, keep_logs: int, keep_logs_total: int, keep_history: int,
               prune_envs: bool = False) -> list[str]:
        """Apply the retention limits in one transaction; return the log files to delete.

        Logs beyond ``keep_logs`` per key or ``keep_logs_total`` in all are forgotten, and
        finished runs beyond the newest ``keep_history``; with ``prune_envs``, environments
        no pending invocation uses any more are dropped too.
        """
        with self._transaction() as db:
            if prune_envs:
                self._prune_envs(db)
            old = db.execute(
                "SELECT run_id, log_path FROM ("
                "  SELECT run_id, log_path, "
                "    row_number() OVER (PARTITION BY key ORDER BY run_id DESC) AS per_key, "
                "    row_number() OVER (ORDER BY run_id DESC) AS overall "
                "  FROM runs WHERE socket = ? AND log_path IS NOT NULL "
                "  AND finished_at IS NOT NULL"
                ") WHERE per_key > ? OR overall > ?",
                (self.socket, keep_logs, keep_logs_total),
            ).fetchall()
            if old:
                db.executemany(
                    "UPDATE runs SET log_path = NULL WHERE socket = ? AND run_id = ?",
                    [(self.socket, run_id) for run_id, _ in old],
                )
            files = [path for _, path in old]
            cutoff = db.execute(
                "SELECT run_id FROM runs WHERE socket = ? AND finished_at IS NOT NULL "
                "ORDER BY run_id DESC LIMIT 1 OFFSET ?",
                (self.socket, keep_history),
            ).fetchone()
            if cutoff is not None:
                where = "socket = ? AND finished_at IS NOT NULL AND run_id <= ?"
                files += [r[0] for r in db.execute(
                    f"SELECT log_path FROM runs WHERE {where} AND log_path IS NOT NULL",
                    (self.socket, cutoff[0]),
                )]
                db.execute(f"DELETE FROM runs WHERE {where}", (self.socket, cutoff[0]))
            db.execute(
                "DELETE FROM cancelled WHERE socket = ? AND inv_id <= (SELECT inv_id FROM "
                "cancelled WHERE socket = ? ORDER BY inv_id DESC LIMIT 1 OFFSET ?)",
                (self.socket, self.socket, CANCELLED_KEPT))
        return files


#: A run's row: every column but its socket, id and key (which never change), then those.
_RUN_FIELDS = ("argv", "cwd", "coalesced", "started_at", "due_at", "inv_id", "finished_at",
               "exit_code", "outcome", "pid", "log_path", "env_id", "options", "batch",
               "covered", "covered_more")
_UPDATE_RUN = (f"UPDATE runs SET {', '.join(f'{name} = ?' for name in _RUN_FIELDS)} "
               "WHERE socket = ? AND run_id = ?")
_INSERT_RUN = (f"INSERT OR REPLACE INTO runs (socket, run_id, key, {', '.join(_RUN_FIELDS)}) "
               f"VALUES ({', '.join('?' * (len(_RUN_FIELDS) + 3))})")

#: About what a pending row takes besides its command line and its covered ids.
_ROW_BYTES = 128

#: The columns of a pending invocation's row, in ``pending`` and in ``intake``.
_PENDING_COLUMNS = (
    "(socket, key, id, argv, cwd, env_id, options, received_at, due_at, first_at, coalesced, "
    "leading_edge, state, batch, covered, covered_more) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


@functools.lru_cache(maxsize=4096)
def _options_json(opts: Options) -> str:
    """Options are shared and immutable: each distinct set is serialised once, in the one
    stored form (``Options.stored``)."""
    return json.dumps(opts.stored())


def _covered_columns(covered: Covered | tuple[()]) -> tuple[str | None, int | None]:
    """The ``covered`` and ``covered_more`` columns: the ids kept (the newest) and how many
    older ones were let go."""
    if not covered:
        return None, None
    assert isinstance(covered, Covered)
    kept = covered.kept()
    more = covered.total() - len(kept)
    return _ids_json(kept), more or None


def _ids_json(ids: list[int]) -> str:
    """``json.dumps(ids)`` for a list of ints, through json's C encoder made once (dumps
    makes one per call: half the cost of a commit's covered column, bench "CPU per
    submission" with the journal)."""
    return "".join(_IDS_ENCODER(ids, 0))


_IDS_ENCODER = json.encoder.c_make_encoder(  # type: ignore[attr-defined]
    None, None, json.encoder.encode_basestring_ascii, None, ": ", ", ", False, False, True,
) if json.encoder.c_make_encoder is not None else (  # type: ignore[attr-defined]
    lambda ids, _level: [json.dumps(ids)])


def _covered_of(text: str | None, more: int | None) -> Covered | None:
    if text is None:
        return None
    covered = Covered(json.loads(text))
    covered.dropped = more or 0
    return covered


_RUN_COLUMNS = (
    "SELECT run_id, key, argv, cwd, exit_code, coalesced, started_at, finished_at, "
    "outcome, log_path, due_at, inv_id, covered, covered_more FROM runs"
)


def _run_record(r: tuple[Any, ...]) -> RunRecord:
    """A row selected with ``_RUN_COLUMNS``."""
    covered = _covered_of(r[12], r[13])
    return RunRecord(
        run_id=r[0], key=_s(r[1]), argv=json.loads(r[2]), cwd=_s(r[3]), exit_code=r[4],
        coalesced=r[5], started_at=r[6], finished_at=r[7], outcome=r[8],
        log_path=None if r[9] is None else _s(r[9]), due_at=r[10], invocation=r[11],
        # A row from before runs kept the list knows only its winner for sure.
        covered=covered.shown() if covered is not None else
        ([r[11]] if r[11] is not None and r[5] == 1 else None),
    )


__all__ = ["LOST", "Journal", "JournalError", "Restored", "StoredInvocation", "UnfinishedRun"]
