"""The names that cross layers: invocation states, run outcomes, stop reasons, error codes.

Each is written once here and compared by name everywhere else (scheduler, journal, daemon,
client, render). They are plain strings because they go on the wire and into the journal as
they are; this module is imported by the client, so it holds nothing but constants (and the
one function that makes a --no-defer key).
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Final

# Invocation states (SPEC "Words"). A run is RUNNING or FINISHED.
PENDING: Final = "pending"  # waiting for its quiet period, or due and waiting for its key
QUEUED: Final = "queued"  # due, key free, waiting for a job slot
SUPERSEDED: Final = "superseded"  # replaced by a later invocation of the same key
RUNNING: Final = "running"  # attached to a run that is executing
#: ``status``: a run decided whose process is not created yet (waiting for a place among the
#: runs executing at once, for the spawner, or for the journal to record it).
STARTING: Final = "starting"
FINISHED: Final = "finished"  # attached to a run that has ended
CANCELLED: Final = "cancelled"  # dropped by `debounce cancel`

# Why the daemon asked a run to stop (Run.stop_reason).
STOP_TIMEOUT: Final = "timeout"  # --timeout expired
STOP_RESTART: Final = "restart"  # --on-busy restart: a newer invocation replaces it
STOP_SHUTDOWN: Final = "shutdown"  # the daemon is stopping
STOP_KILL: Final = "kill"  # `debounce kill`

# How a run ended (Run.outcome, history's "outcome", --json's "outcome").
EXITED: Final = "exited"  # its command exited by itself
TIMED_OUT: Final = "timeout"  # stopped by --timeout
RESTARTED: Final = "restarted"  # stopped by --on-busy restart
STOPPED: Final = "stopped"  # stopped because the daemon shut down
KILLED: Final = "killed"  # stopped by `debounce kill`
LOST: Final = "lost"  # it was executing when its daemon died

#: The outcome of a run that was asked to stop for a reason (None: it exited by itself).
OUTCOME_OF_STOP: Final[dict[str | None, str]] = {
    None: EXITED,
    STOP_TIMEOUT: TIMED_OUT,
    STOP_RESTART: RESTARTED,
    STOP_SHUTDOWN: STOPPED,
    STOP_KILL: KILLED,
}

# The keys of --no-defer invocations. Each is filed under a key of its own, made from the
# user's key and an id; that key must never be one a user can submit, or a user's key could
# coalesce with it (issue 23: `--key 'build#1'` took over `--no-defer --key build`). The
# journal's rows, $DEBOUNCE_KEY and every command that names a key take the key's text, so
# the namespace is in the text: U+FFFF, a Unicode noncharacter ("reserved for internal use",
# never interchanged), marks it and is refused in every key submitted (daemon.jobs).
PRIVATE_MARK: Final = "\uffff"


def no_defer_key(key: str, tag: str) -> str:
    """The key a --no-defer invocation is filed under: ``KEY`` U+FFFF ``#TAG``."""
    return f"{key}{PRIVATE_MARK}#{tag}"


# Error codes of the protocol's Error message.
BAD_REQUEST: Final = "bad_request"  # the client sent something malformed or not allowed
REFUSED: Final = "refused"  # the daemon cannot take it now (shutting down, disk full...)
NOT_FOUND: Final = "not_found"  # no such key or run
#: A fleet submission the store may have taken (its answer was lost) and did not confirm in
#: time: it may still run (`debounce wait --invocation ID` tells).
UNKNOWN: Final = "unknown"
