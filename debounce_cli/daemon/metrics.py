"""The daemon's metrics, and their Prometheus text format (``debounce metrics``, /metrics).

Counters and histograms are plain numbers the core bumps as things happen (a few attribute
updates on paths that already do far more); gauges (pending, running) are read off the
scheduler when scraped. The text format (version 0.0.4) is written here rather than with
prometheus_client: it is a dozen lines of ``name{label="value"} number``, and the client
library would be a dependency of the daemon and a second registry of what happened.
``tests/test_metrics.py`` parses the output with prometheus_client's own parser.

Per-key counts are kept for the first ``KEY_LIMIT`` keys the daemon sees; later keys are
counted under ``key="(other)"``, so a daemon fed endless distinct keys (``--no-defer``, a
key per file) keeps a bounded set of series.

The HTTP listener (``--metrics-listen``) answers ``GET /metrics`` (and ``HEAD``) with the
same text, one request per connection, and nothing else: 404 for other paths, 405 for
other methods.
"""

from __future__ import annotations

import asyncio
import time
from bisect import bisect_left
from collections.abc import Callable
from typing import Any

from debounce_cli import __version__

#: Keys with counts of their own; the rest share ``key="(other)"``.
KEY_LIMIT = 100
OTHER = "(other)"
#: Seconds: run durations, from a tenth of a second to an hour.
DURATION_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)
#: Seconds: lateness of a start, commit times and store round trips, from 0.1 ms to 10 s.
SHORT_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                 0.25, 0.5, 1.0, 2.5, 10.0)
#: How long an HTTP client may take to send its request.
REQUEST_TIMEOUT = 5.0
MAX_REQUEST = 8192


class Histogram:
    """Cumulative buckets, as Prometheus keeps them."""

    __slots__ = ("bounds", "count", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * len(bounds)
        self.count = 0
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.count += 1
        self.total += value
        i = bisect_left(self.bounds, value)  # the first bound >= value (twice a run: in C)
        if i < len(self.counts):
            self.counts[i] += 1

    def lines(self, name: str, labels: str = "") -> list[str]:
        out, running = [], 0
        sep = "," if labels else ""
        for bound, n in zip(self.bounds, self.counts, strict=True):
            running += n
            out.append(f'{name}_bucket{{{labels}{sep}le="{_num(bound)}"}} {running}')
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.count}')
        wrap = f"{{{labels}}}" if labels else ""
        out.append(f"{name}_sum{wrap} {_num(self.total)}")
        out.append(f"{name}_count{wrap} {self.count}")
        return out


class Metrics:
    """What happened since the daemon started."""

    def __init__(self, key_limit: int = KEY_LIMIT) -> None:
        self.started = time.time()
        self.key_limit = key_limit
        self.submitted = 0
        self.coalesced = 0
        self.runs_started = 0
        self.runs_finished: dict[str, int] = {}  # by outcome
        self.runs_failed = 0  # exited with a status other than 0, or by a signal
        #: key -> [submitted, runs started, runs finished]
        self.keys: dict[str, list[int]] = {}
        self.duration = Histogram(DURATION_BUCKETS)
        self.lateness = Histogram(SHORT_BUCKETS)
        self.commit = Histogram(SHORT_BUCKETS)
        self.commit_failures = 0
        #: Fleet: round trips to the store by operation, and takeovers.
        self.store_rtt: dict[str, Histogram] = {}
        self.store_errors = 0
        self.takeovers = 0

    def _key(self, key: str) -> list[int]:
        counts = self.keys.get(key)
        if counts is None:
            if len(self.keys) >= self.key_limit and key != OTHER:
                return self._key(OTHER)
            counts = self.keys[key] = [0, 0, 0]
        return counts

    # -------------------------------------------------------------- what the core tells
    def invocation(self, key: str, coalesced: bool) -> None:
        self.submitted += 1
        if coalesced:
            self.coalesced += 1
        self._key(key)[0] += 1

    def run_started(self, key: str, late: float) -> None:
        self.runs_started += 1
        self._key(key)[1] += 1
        self.lateness.observe(max(0.0, late))

    def run_finished(self, key: str, outcome: str, took: float | None, failed: bool) -> None:
        self.runs_finished[outcome] = self.runs_finished.get(outcome, 0) + 1
        self.runs_failed += failed
        self._key(key)[2] += 1
        if took is not None:
            self.duration.observe(max(0.0, took))

    def committed(self, seconds: float, ok: bool) -> None:
        self.commit.observe(seconds)
        if not ok:
            self.commit_failures += 1

    def store_call(self, op: str, seconds: float, ok: bool) -> None:
        hist = self.store_rtt.get(op)
        if hist is None:
            hist = self.store_rtt[op] = Histogram(SHORT_BUCKETS)
        hist.observe(seconds)
        if not ok:
            self.store_errors += 1

    # -------------------------------------------------------------- the text format
    def render(self, pending: int, running: int, fleet: bool = False) -> str:
        """The Prometheus text format (0.0.4) of everything, gauges as given."""
        out: list[str] = []

        def family(name: str, kind: str, help: str, lines: list[str]) -> None:
            out.append(f"# HELP {name} {help}")
            out.append(f"# TYPE {name} {kind}")
            out.extend(lines)

        family("debounce_info", "gauge", "The daemon's version.",
               [f'debounce_info{{version="{_label(__version__)}"}} 1'])
        family("debounce_start_time_seconds", "gauge",
               "When the daemon started, in seconds since the epoch.",
               [f"debounce_start_time_seconds {_num(self.started)}"])
        family("debounce_invocations_submitted_total", "counter",
               "Invocations submitted (accepted or not).",
               [f"debounce_invocations_submitted_total {self.submitted}"])
        family("debounce_invocations_coalesced_total", "counter",
               "Invocations that replaced a pending one of their key or joined its run.",
               [f"debounce_invocations_coalesced_total {self.coalesced}"])
        family("debounce_runs_started_total", "counter", "Runs started.",
               [f"debounce_runs_started_total {self.runs_started}"])
        family("debounce_runs_finished_total", "counter",
               "Runs ended, by outcome (exited, timed_out, restarted, stopped, killed, ...).",
               [f'debounce_runs_finished_total{{outcome="{_label(o)}"}} {n}'
                for o, n in sorted(self.runs_finished.items())])
        family("debounce_runs_failed_total", "counter",
               "Runs that ended with a status other than 0 (whatever their outcome).",
               [f"debounce_runs_failed_total {self.runs_failed}"])
        family("debounce_pending", "gauge", "Keys with a pending invocation.",
               [f"debounce_pending {pending}"])
        family("debounce_running", "gauge", "Runs executing.", [f"debounce_running {running}"])
        keys = sorted(self.keys.items())
        family("debounce_key_invocations_submitted_total", "counter",
               f"Invocations submitted, per key (the first {self.key_limit} keys; the rest "
               f'as key="{OTHER}").',
               [f'debounce_key_invocations_submitted_total{{key="{_label(k)}"}} {c[0]}'
                for k, c in keys])
        family("debounce_key_runs_started_total", "counter", "Runs started, per key.",
               [f'debounce_key_runs_started_total{{key="{_label(k)}"}} {c[1]}'
                for k, c in keys])
        family("debounce_key_runs_finished_total", "counter", "Runs ended, per key.",
               [f'debounce_key_runs_finished_total{{key="{_label(k)}"}} {c[2]}'
                for k, c in keys])
        family("debounce_run_duration_seconds", "histogram", "How long runs lasted.",
               self.duration.lines("debounce_run_duration_seconds"))
        family("debounce_run_start_lateness_seconds", "histogram",
               "How late runs started: the start of the process minus the due time.",
               self.lateness.lines("debounce_run_start_lateness_seconds"))
        family("debounce_journal_commit_seconds", "histogram",
               "How long each group commit of the journal took.",
               self.commit.lines("debounce_journal_commit_seconds"))
        family("debounce_journal_commit_failures_total", "counter",
               "Group commits that failed (a full disk, a read-only state directory).",
               [f"debounce_journal_commit_failures_total {self.commit_failures}"])
        if fleet:
            rtt: list[str] = []
            for op, hist in sorted(self.store_rtt.items()):
                rtt.extend(hist.lines("debounce_fleet_store_round_trip_seconds",
                                      f'op="{_label(op)}"'))
            family("debounce_fleet_store_round_trip_seconds", "histogram",
                   "Round trips to the fleet's store, by operation.", rtt)
            family("debounce_fleet_store_errors_total", "counter",
                   "Calls to the store that failed (it was down or did not answer).",
                   [f"debounce_fleet_store_errors_total {self.store_errors}"])
            family("debounce_fleet_takeovers_total", "counter",
                   "Runs started here for an invocation another host submitted (its host "
                   "had gone silent for a lease).",
                   [f"debounce_fleet_takeovers_total {self.takeovers}"])
        return "\n".join(out) + "\n"


def _num(value: float) -> str:
    return repr(float(value)) if value != int(value) else str(int(value)) + ".0"


def _label(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def text_of(core: Any, fleet: Any = None) -> str:
    """The metrics of a daemon's core (and fleet), gauges read now."""
    scheduler = core.scheduler
    text: str = core.metrics.render(pending=scheduler.pending_count, running=len(scheduler.runs),
                                    fleet=fleet is not None)
    return text


# ------------------------------------------------------------------------------ the fleet
class TimedStore:
    """The fleet's store, each call timed: round trips by operation, and takeovers.

    Wraps the store the fleet is given, so the fleet's own code stays as it is.
    """

    def __init__(self, store: Any, metrics: Metrics, host: str) -> None:
        self._store = store
        self._metrics = metrics
        self._host = host

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._store, name)
        if not asyncio.iscoroutinefunction(attr):
            return attr
        metrics = self._metrics

        async def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            ok = False
            try:
                result = await attr(*args, **kwargs)
                ok = True
                return result
            finally:
                metrics.store_call(name, time.perf_counter() - t0, ok)

        self.__dict__[name] = timed  # (made once: the store's methods do not change)
        return timed

    async def update(self, key: str, step: Callable[..., Any], *args: Any, **kwargs: Any
                     ) -> Any:
        """A transaction on ``key``; a claim that starts another host's invocation here is
        a takeover."""
        from debounce_cli.daemon.fleet.state import Start

        took = [False]
        host = self._host

        def watched(st: Any, now: float) -> Any:
            pending, running = st.pending, st.running
            result = step(st, now)
            decision = result[0]
            took[0] = (isinstance(decision, Start) and pending is not None
                       and pending.host != host
                       and not (running is not None and running.run == decision.running.run))
            return result

        t0 = time.perf_counter()
        ok = False
        try:
            out = await self._store.update(key, watched, *args, **kwargs)
            ok = True
        finally:
            self._metrics.store_call("update", time.perf_counter() - t0, ok)
        if took[0]:
            self._metrics.takeovers += 1
        return out


# ------------------------------------------------------------------------------ HTTP
async def serve_http(host: str, port: int, text: Callable[[], str]) -> asyncio.Server:
    """Serve ``text()`` at ``/metrics`` on ``host:port``."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT)
            except asyncio.LimitOverrunError:
                head = b""
            parts = head.split(b"\r\n", 1)[0].split()
            method, path = (parts[0], parts[1]) if len(parts) == 3 else (b"", b"")
            if not method:
                status, body = "400 Bad Request", "bad request\n"
            elif method not in (b"GET", b"HEAD"):
                status, body = "405 Method Not Allowed", "only GET and HEAD\n"
            elif path.split(b"?", 1)[0] != b"/metrics":
                status, body = "404 Not Found", "the metrics are at /metrics\n"
            else:
                status, body = "200 OK", text()
            data = body.encode()
            ctype = ("text/plain; version=0.0.4; charset=utf-8" if status == "200 OK"
                     else "text/plain; charset=utf-8")
            writer.write(f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
                         f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode())
            if method != b"HEAD":
                writer.write(data)
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(answer, host, port, limit=MAX_REQUEST)
