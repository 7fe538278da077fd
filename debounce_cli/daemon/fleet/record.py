"""A fleet key's record as the store keeps it: the rules' per-key record, its pending
invocation (one slot), its run and its latest finished run, and their stored form (JSON, with
fields of a newer version kept rather than dropped).

The steps taken on a record are in :mod:`debounce_cli.daemon.fleet.state`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from typing import Any

from debounce_cli import rules
from debounce_cli.daemon.fleet.covering import covered_ids
from debounce_cli.rules import Options

Event = dict[str, Any]


@dataclass(slots=True)
class Pending:
    """The latest invocation of a key, waiting in ``slot``."""

    slot: int
    inv: int  # the id its own daemon gave it (Accepted.id there)
    host: str
    job: dict[str, Any]  # argv, cwd, env
    options: Options
    due: float
    coalesced: int
    lead: bool = False  # due at once: a leading edge (or a max-wait run) not started yet
    received: float = 0.0
    #: Unique to this submission (its daemon's instance and invocation id): a transaction
    #: retried after its EXEC's answer was lost recognises its own work.
    token: str = ""
    #: Due, but its host's job slots are all taken (daemon --jobs): it keeps its place, and a
    #: later invocation that replaces it does not wait through a delay again (rule 4).
    queued: bool = False
    #: --collect: the argv of every invocation it stands for, oldest first.
    batch: list[list[str]] | None = None
    #: The invocations it stands for, oldest first, as "HOST:ID" (None: only itself), and
    #: how many older ones were let go past COVERED_MAX.
    covered: list[str] | None = None
    covered_more: int = 0


@dataclass(slots=True)
class Running:
    """The run executing for a key, on ``host``, under fencing token ``fence``."""

    run: int
    slot: int
    inv: int
    host: str
    fence: int
    job: dict[str, Any]
    options: Options
    coalesced: int
    due: float
    started_at: float
    stopping: str | None = None  # states.STOP_*: asked to stop from some host
    batch: list[list[str]] | None = None  # --collect: every coalesced invocation's argv
    covered: list[str] | None = None  # as Pending's
    covered_more: int = 0
    signalled: list[str] = field(default_factory=list)  # what `kill --signal` sent it


@dataclass(slots=True)
class Last:
    """A key's latest finished run."""

    run: int
    host: str
    argv: list[str]
    cwd: str
    exit_code: int | None
    outcome: str
    coalesced: int
    started_at: float
    finished_at: float
    due: float
    inv: int
    slot: int = 0  # the slot its invocation waited in (a reader that missed events resyncs)
    covered: list[str] | None = None  # as Pending's
    covered_more: int = 0

    def record(self, key: str) -> dict[str, Any]:
        """As ``protocol.RunRecord`` fields (history and ``wait`` show it)."""
        covered = covered_ids(self)
        return {"run_id": self.run, "key": key, "argv": self.argv, "cwd": self.cwd,
                "exit_code": self.exit_code, "coalesced": self.coalesced,
                "started_at": self.started_at, "finished_at": self.finished_at,
                "outcome": self.outcome, "due_at": self.due, "invocation": self.inv,
                "host": self.host,
                "covered": covered if not self.covered_more else
                len(covered) + self.covered_more}


@dataclass(eq=False, slots=True)
class KeyState(rules.KeyRecord):
    """All the store knows of one fleet key: the rules' record (``burst_run`` is a run id
    here), and its slots, runs and hosts."""

    seq: int = 0
    pending: Pending | None = None
    running: Running | None = None
    last: Last | None = None
    #: The invocations the latest ``debounce cancel`` dropped ("HOST:ID"), for ``wait
    #: --invocation``.
    cancelled: list[str] = field(default_factory=list)
    #: The tokens of the latest submissions (TOKENS_KEPT), so that one retried after its
    #: answer was lost is recognised however far its key has moved on since.
    tokens: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # fields of a newer version, kept

    # ------------------------------------------------------------------ storage
    def dumps(self) -> str:
        obj = _plain(self)
        extra = obj.pop("extra")
        for name in _TIMES:
            if math.isinf(obj[name]):
                obj[name] = None
        return json.dumps({**extra, **obj}, separators=(",", ":"))

    @classmethod
    def loads(cls, key: str, raw: bytes | str | None) -> KeyState:
        if raw is None:
            return cls(key)
        obj = json.loads(raw)
        pending = obj.pop("pending", None)
        running = obj.pop("running", None)
        last = obj.pop("last", None)
        cancelled = obj.pop("cancelled", None) or []
        tokens = obj.pop("tokens", None) or []
        known = {name: obj.pop(name) for name in list(obj) if name in _SCALARS}
        for name in _TIMES:
            if known.get(name) is None:
                known.pop(name, None)
        known["key"] = key
        st = cls(**known,
                 pending=_known(Pending, pending), running=_known(Running, running),
                 last=_known(Last, last), cancelled=cancelled, tokens=tokens, extra=obj)
        old_leader = obj.pop("burst_leader", None)  # written by an earlier version: a slot
        if old_leader is not None and st.pending is not None:
            st.leader = st.pending.slot == old_leader
        return st

    def copy(self) -> KeyState:
        """A copy a step may change without changing this one (the store keeps the states
        of its busiest keys as objects, and steps on copies: a copy costs a fraction of
        ``loads``). What steps never change in place is shared: a job's argv and
        environment, the options, a newer version's fields."""
        return _copied(self)  # type: ignore[no-any-return]

    def idle(self) -> bool:
        return self.pending is None and self.running is None

    def index_score(self) -> float | None:
        """Where the key sits in the fleet's index: when something of it next needs doing
        (``None``: nothing pending or running, it leaves the index)."""
        if self.running is not None:
            return self.running.started_at
        if self.pending is not None:
            return self.pending.due
        return None


def _plain(obj: Any) -> dict[str, Any]:
    """``dataclasses.asdict`` without its deep copies (a job's environment is large, and
    ``dumps`` runs at every step): the dataclasses become dicts, their values are shared.
    Only the record's own dataclasses are looked into (a value of any other type is taken
    as it is, without a look at each: this runs at every step)."""
    out = {}
    for name in _FIELDS[type(obj)]:
        value = getattr(obj, name)
        if type(value) in _FIELDS:
            value = _plain(value)
        out[name] = value
    return out


_new = object.__new__
_set = object.__setattr__


def _copied(obj: Any) -> Any:
    """``obj`` (a record's dataclass) with its dataclasses copied, and a copy of each of
    their lists and dicts (one level: their items are shared)."""
    cls = type(obj)
    new = _new(cls)
    for name in _FIELDS[cls]:
        value = getattr(obj, name)
        kind = type(value)
        if kind is list:
            value = value[:]
        elif kind is dict:
            value = value.copy()
        elif kind in _COPIED:
            value = _copied(value)
        _set(new, name, value)
    return new


def _known(cls: Any, fields: dict[str, Any] | None) -> Any:
    """``cls`` from the stored fields it knows (a newer version's extra fields are left)."""
    if not fields:
        return None
    names = cls.__dataclass_fields__
    known = {name: value for name, value in fields.items() if name in names}
    if "options" in known:
        known["options"] = Options.from_stored(known["options"])
    return cls(**known)


#: The fields of the dataclasses a record is made of, in order.
_FIELDS: dict[type, tuple[str, ...]] = {
    cls: tuple(f.name for f in fields(cls)) for cls in (KeyState, Pending, Running, Last, Options)}
#: The dataclasses a copy of a record copies (``Options`` is frozen: shared).
_COPIED = frozenset((KeyState, Pending, Running, Last))
_TIMES = ("quiet_at", "timer_first", "edge_at", "lead_after")  # -inf is stored as null
_SCALARS = ("key", "quiet_at", "max_from", "timer_first", "edge_at", "lead_after", "leader",
            "seq", "burst_run")
