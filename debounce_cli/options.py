"""The one table of run options and of the daemon's settings, with their defaults.

Everything else derives from these tables: the click options of ``run``, ``daemon`` and
``watch`` (flags, help, defaults shown in ``--help``), the scheduler's ``Options`` defaults,
the protocol's validation of a request's ``options`` object, the fields a ``--stdin`` JSON
line may carry, and so the man pages and completions generated from the click commands. A new
option is one row here plus the rule that uses it.

The client imports this module on every ``debounce run``: plain tuples and constants only.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

# Kinds of values.
DURATION = "duration"  # seconds as a float; written 250ms, 2s, 1m30s or 0.5
FLAG = "flag"  # a boolean switch
CHOICE = "choice"  # one of ``choices``
COUNT = "count"  # a whole number (daemon settings)
STORE = "store"  # a store URL (daemon settings)
ADDRESS = "address"  # HOST:PORT to listen on (daemon settings)

ON_BUSY = ("queue", "restart", "ignore", "signal")
#: Signals --signal may name (without SIG), for --on-busy signal.
SIGNALS = ("HUP", "INT", "QUIT", "USR1", "USR2", "TERM", "ALRM", "CONT", "WINCH", "URG")
#: Signals `debounce kill --signal` may send.
KILL_SIGNALS = (*SIGNALS, "KILL", "STOP")


class RunOption:
    """One scheduling option of an invocation.

    ``name`` is the field of ``scheduler.Options`` and of a run request's ``options`` object.
    ``flag`` is how the command line writes it; a flag that turns a field off (``--no-defer``
    for ``defer``) has ``negated`` set, and the field holds the opposite of the flag. A
    duration whose default is ``None`` is optional: absent means "no limit". ``shorthand``
    marks an option that is no field of its own but sets others (``--throttle D`` is
    ``--leading --delay D --max-wait D``; see :func:`expand`).

    (A plain class, not a NamedTuple: the client imports this table on every ``debounce run``
    and ``typing`` would cost it more than everything else here.)
    """

    __slots__ = ("choices", "default", "envvar", "flag", "help", "kind", "metavar", "name",
                 "negated", "shorthand")

    def __init__(self, name: str, flag: str, kind: str, default: Any, help: str,
                 metavar: str | None = None, choices: tuple[str, ...] = (),
                 negated: bool = False, envvar: str | None = None,
                 shorthand: bool = False) -> None:
        self.name = name
        self.flag = flag
        self.kind = kind
        self.default = default
        self.help = help
        self.metavar = metavar
        self.choices = choices
        self.negated = negated
        self.envvar = envvar
        self.shorthand = shorthand

    @property
    def param(self) -> str:
        """The click parameter name of the flag (``--no-trailing`` -> ``no_trailing``)."""
        return self.flag.lstrip("-").replace("-", "_")

    @property
    def opposite(self) -> str | None:
        """The flag that says the other thing (``--leading`` / ``--no-leading``), so a
        command line can undo what a config file set; ``None`` for options with a value."""
        if self.kind != FLAG:
            return None
        if self.flag.startswith("--no-"):
            return "--" + self.flag[5:]
        return "--no-" + self.flag[2:]

    @property
    def wire(self) -> str:
        """The protocol's type tag for this field (see ``protocol._CHECKS``)."""
        if self.kind == DURATION:
            return "num?" if self.default is None else "num"
        if self.kind == FLAG:
            return "bool"
        return "str"


RUN_OPTIONS: tuple[RunOption, ...] = (
    RunOption(
        "delay", "--delay", DURATION, 1.0,
        "Quiet period: run once no invocation of the key came for this long "
        "(250ms, 2s, 1m30s, 0.5).",
        envvar="DEBOUNCE_DELAY",
    ),
    RunOption(
        "defer", "--no-defer", FLAG, True,
        "Keep the delay but never coalesce: each invocation gets a key of its own (KEY, "
        "U+FFFF, #ID; keys you write may not hold U+FFFF, so none coalesces with it).",
        negated=True,
    ),
    RunOption(
        "max_wait", "--max-wait", DURATION, None,
        "Run no later than this after the burst began or the key's last run started (at "
        "least --delay).",
        metavar="DURATION",
    ),
    RunOption("leading", "--leading", FLAG, False, "Run the first invocation of a burst at once."),
    RunOption(
        "trailing", "--no-trailing", FLAG, True,
        "With --leading: later invocations of the burst start nothing and share the "
        "leading run's result.",
        negated=True,
    ),
    RunOption(
        "throttle", "--throttle", DURATION, None,
        "Shorthand for --leading --delay D --max-wait D: at most one start per D, and the "
        "last call of a burst still runs.",
        metavar="D", shorthand=True,
    ),
    RunOption(
        "on_busy", "--on-busy", CHOICE, "queue",
        "While the key's command runs: queue one more run after it, restart it, join it "
        "(ignore), or send it --signal and join it (signal: every caller that signals then "
        "waits for that run's whole life, so a reload hook should add --no-wait).",
        choices=ON_BUSY,
    ),
    RunOption(
        "signal", "--signal", CHOICE, "HUP",
        "The signal --on-busy signal sends to the running command's process group.",
        choices=SIGNALS,
    ),
    RunOption(
        "collect", "--collect", FLAG, False,
        "Run once for every coalesced invocation: the last argument becomes the distinct "
        "last arguments of all of them, in order of arrival ($DEBOUNCE_BATCH lists them all). "
        "Without --key, the key leaves the last argument out, so calls that differ only in "
        "it coalesce.",
    ),
    RunOption(
        "fleet", "--fleet", FLAG, False,
        "Share the key with every host of the fleet (the daemons on one store, "
        "DEBOUNCE_STORE): one run fleet-wide.",
    ),
    RunOption(
        "stop_timeout", "--stop-timeout", DURATION, 5.0,
        "After SIGTERM, wait this long before SIGKILL.",
    ),
    RunOption(
        "timeout", "--timeout", DURATION, None,
        "Stop a run that lasts longer than this (SIGTERM, then SIGKILL).",
        metavar="DURATION",
    ),
)

#: Option rows by field name.
BY_NAME: dict[str, RunOption] = {option.name: option for option in RUN_OPTIONS}
#: The fields of the scheduler's ``Options`` (shorthands are not fields).
FIELDS: tuple[RunOption, ...] = tuple(option for option in RUN_OPTIONS if not option.shorthand)
#: The default of every run option by field name (the scheduler's ``Options`` uses these).
DEFAULTS: dict[str, Any] = {option.name: option.default for option in FIELDS}


def expand(options: dict[str, Any]) -> dict[str, Any]:
    """Shorthands made into the fields they stand for (``throttle``)."""
    throttle = options.pop("throttle", None)
    if throttle is not None:
        options.update(leading=True, delay=throttle, max_wait=throttle)
    return options


def from_flags(values: dict[str, Any]) -> dict[str, Any]:
    """A request's ``options`` object from click's parameter values (by ``param`` name)."""
    out = {}
    for option in RUN_OPTIONS:
        value = values[option.param]
        out[option.name] = (not value) if option.negated else value
    return expand(out)


def usage_problems(options: dict[str, Any]) -> list[str]:
    """Usage errors of a set of scheduling options, worded for the command line.

    Shared by the client (before it submits) and the daemon (stdin lines, and requests from
    clients that skipped the check), so the rules are written once.
    """
    out = []
    get = options.get
    max_wait, timeout = get("max_wait"), get("timeout")
    if get("delay", DEFAULTS["delay"]) < 0:
        out.append("--delay must not be negative")
    if max_wait is not None and max_wait <= 0:
        out.append("--max-wait must be greater than 0")
    if timeout is not None and timeout <= 0:
        out.append("--timeout must be greater than 0")
    if get("stop_timeout", DEFAULTS["stop_timeout"]) < 0:
        out.append("--stop-timeout must not be negative")
    on_busy = get("on_busy", DEFAULTS["on_busy"])
    if on_busy not in ON_BUSY:
        out.append(f"--on-busy must be one of {', '.join(ON_BUSY)}, not {on_busy!r}")
    sig = get("signal", DEFAULTS["signal"])
    if sig not in SIGNALS:
        out.append(f"--signal must be one of {', '.join(SIGNALS)}, not {sig!r}")
    if not get("trailing", DEFAULTS["trailing"]) and not get("leading", DEFAULTS["leading"]):
        out.append("--no-trailing without --leading would never run anything; add --leading")
    return out


# ------------------------------------------------------------------ the daemon's settings
class DaemonOption:
    """One setting of ``debounce daemon`` (field of ``daemon.Config``)."""

    __slots__ = ("default", "flag", "help", "kind", "metavar", "minimum", "name")

    def __init__(self, name: str, flag: str, kind: str, default: Any, help: str,
                 metavar: str | None = None, minimum: int | None = None) -> None:
        self.name = name
        self.flag = flag
        self.kind = kind
        self.default = default
        self.help = help
        self.metavar = metavar
        self.minimum = minimum


DAEMON_OPTIONS: tuple[DaemonOption, ...] = (
    DaemonOption("jobs", "--jobs", COUNT, None,
                 "Run at most N commands at once; due invocations queue.  [default: no limit]",
                 metavar="N", minimum=1),
    DaemonOption("idle_exit", "--idle-exit", DURATION, 600.0,
                 "Exit after this long with nothing pending, running or connected (0: never)."),
    DaemonOption("journal", "--journal/--no-journal", FLAG, True,
                 "Keep pending invocations and history in the state directory, so they "
                 "survive a crash; --no-journal keeps them in memory only."),
    DaemonOption("keep_logs", "--keep-logs", COUNT, 10,
                 "Keep the output logs of the last N runs of each key.", metavar="N", minimum=0),
    DaemonOption("keep_logs_total", "--keep-logs-total", COUNT, 1000,
                 "Keep at most N output logs in all.", metavar="N", minimum=0),
    DaemonOption("keep_history", "--keep-history", COUNT, 10000,
                 "Keep the last N finished runs in the history.", metavar="N", minimum=1),
    DaemonOption("store", "--store", STORE, None,
                 "The fleet's store, redis://[user:password@]host:port/db (also rediss:// "
                 "and unix://path): keys submitted with --fleet are shared by every daemon "
                 "on it.", metavar="URL"),
    DaemonOption("lease", "--lease", DURATION, 10.0,
                 "Fleet: a host silent this long is gone; another daemon takes over what it "
                 "was to run."),
    DaemonOption("metrics_listen", "--metrics-listen", ADDRESS, None,
                 "Serve the metrics (Prometheus text format) over HTTP at /metrics on "
                 "[HOST:]PORT; HOST defaults to 127.0.0.1 (loopback): a wildcard such as "
                 "0.0.0.0 only when written.", metavar="ADDR"),
)

DAEMON_DEFAULTS: dict[str, Any] = {option.name: option.default for option in DAEMON_OPTIONS}

#: The environment variable that names the fleet's store (``--store``).
STORE_ENV = "DEBOUNCE_STORE"
#: The environment variable that names a daemon's host in the fleet (default: the hostname).
HOST_ENV = "DEBOUNCE_HOST_ID"

def parse_address(text: str) -> tuple[str, int]:
    """``[HOST:]PORT`` (``[::1]:9100`` for IPv6) as (host, port); no host is loopback.

    Raises:
        ValueError: the message says what to write.
    """
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "", text
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{text!r} is no [HOST:]PORT; write a port such as 9100, or "
                         "127.0.0.1:9100")
    return host or "127.0.0.1", int(port)


#: How many runs ``debounce history`` shows unless told otherwise.
HISTORY_LIMIT = 20
