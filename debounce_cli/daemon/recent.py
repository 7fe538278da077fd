"""What the daemon remembers in memory of what has ended: its latest finished runs (for
``wait`` and ``status``'s last result, and for a journal-less daemon's history) and the
invocations ``cancel`` dropped (for ``wait --invocation``), both bounded.
"""

from __future__ import annotations

from debounce_cli.scheduler import Run

#: Finished runs kept in memory for `debounce wait` and `status` ("last result").
RECENT_RUNS = 1000
#: Cancelled invocations remembered in memory for `debounce wait --invocation`.
RECENT_CANCELLED = 10_000


class RecentRuns:
    """Finished runs by id, oldest first, and the latest of each key, bounded."""

    def __init__(self, limit: int = RECENT_RUNS) -> None:
        self.limit = limit
        self.by_id: dict[int, Run] = {}
        self.last_by_key: dict[str, Run] = {}
        self.cancelled: dict[int, str] = {}  # invocation id -> key, oldest first

    def cancel(self, key: str, ids: list[int]) -> None:
        for inv_id in ids:
            self.cancelled[inv_id] = key
        while len(self.cancelled) > RECENT_CANCELLED:
            del self.cancelled[next(iter(self.cancelled))]

    def remember(self, run: Run) -> None:
        if run.id in self.by_id:
            return
        self.by_id[run.id] = run
        self.last_by_key[run.key] = run
        while len(self.by_id) > self.limit:
            old = self.by_id.pop(next(iter(self.by_id)))
            if self.last_by_key.get(old.key) is old:
                del self.last_by_key[old.key]

    def covering(self, inv_id: int) -> Run | None:
        """The latest remembered run that stood for invocation ``inv_id``."""
        for run in reversed(self.by_id.values()):
            if run.invocation.id == inv_id or inv_id in run.covered:
                return run
        return None
