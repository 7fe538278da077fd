"""What a daemon is told when it starts, and how it says it cannot start."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from debounce_cli.options import DAEMON_DEFAULTS


class DaemonError(Exception):
    """The daemon cannot start; the message says why and what to do."""


class AlreadyRunning(DaemonError):
    """Another daemon holds the socket's lock."""


@dataclass(eq=False)
class Config:
    """The settings of one daemon; defaults are those of ``options.DAEMON_OPTIONS``."""

    socket: str
    state_dir: str = ""
    jobs: int | None = DAEMON_DEFAULTS["jobs"]
    idle_exit: float | None = DAEMON_DEFAULTS["idle_exit"]  # None: never
    stdin: bool = False
    #: Options and "key" (a template) for lines read with --stdin.
    defaults: dict[str, Any] = field(default_factory=dict)
    ready_fd: int | None = None  # written "ready" once listening (auto-start)
    journal: bool = DAEMON_DEFAULTS["journal"]
    keep_logs: int = DAEMON_DEFAULTS["keep_logs"]  # per key
    keep_logs_total: int = DAEMON_DEFAULTS["keep_logs_total"]
    keep_history: int = DAEMON_DEFAULTS["keep_history"]
    listen_fd: int | None = None  # a listening socket handed over (systemd socket activation)
    store: str | None = DAEMON_DEFAULTS["store"]  # the fleet's store URL (--store)
    lease: float = DAEMON_DEFAULTS["lease"]
    host_id: str = ""  # this daemon's host in the fleet ($DEBOUNCE_HOST_ID, or the hostname)
    clock_skew: float = 0.0  # tests: seconds added to this daemon's clocks
    #: [HOST:]PORT where /metrics is served over HTTP (--metrics-listen); None: not served.
    metrics_listen: str | None = DAEMON_DEFAULTS["metrics_listen"]
