"""Which invocations a fleet key's pending invocation, run or last run stands for.

Each is named fleet-wide as ``HOST:ID`` (the host whose daemon accepted it, and the id that
daemon gave it: what ``run --json`` printed there); ``history --json`` shows them as
``covered`` and ``wait --invocation`` looks them up. A holder that stands only for itself
keeps no list.
"""

from __future__ import annotations

from typing import Protocol

#: Invocations a fleet run lists (``covered``); past this many, the newest are kept and the
#: rest counted. Smaller than a local run's bound: every step writes the key's state whole.
COVERED_MAX = 100


class Holder(Protocol):
    """A pending invocation, a run or a finished run of a fleet key."""

    host: str
    inv: int
    covered: list[str] | None  # None: only itself
    covered_more: int  # older ones let go past COVERED_MAX


def mark(host: str, inv: int) -> str:
    """An invocation fleet-wide: the host whose daemon accepted it, and the id it gave."""
    return f"{host}:{inv}"


def covered_ids(holder: Holder) -> list[str]:
    """The invocations ``holder`` stands for (kept ones), oldest first."""
    return holder.covered if holder.covered is not None else [mark(holder.host, holder.inv)]


def cover(into: Holder, older: Holder | None, newer: list[str], newer_more: int = 0) -> None:
    """``into`` stands for ``older``'s invocations (if any), then ``newer``'s."""
    ids = list(covered_ids(older)) if older is not None else []
    more = (older.covered_more if older is not None else 0) + newer_more
    for invocation in newer:
        if ids[-1:] != [invocation]:  # the same step run again (a lost answer): once
            ids.append(invocation)
    if len(ids) > COVERED_MAX:
        more += len(ids) - COVERED_MAX
        ids = ids[-COVERED_MAX:]
    into.covered, into.covered_more = ids, more


def covers(holder: Holder | None, invocation: str) -> bool:
    return holder is not None and invocation in covered_ids(holder)


__all__ = ["COVERED_MAX", "Holder", "cover", "covered_ids", "covers", "mark"]
