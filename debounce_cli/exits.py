"""Exit statuses of debounce itself, defined once.

A waiting client exits with the exit status of the run it ended up attached to, so debounce's
own failures use numbers that ordinary commands rarely use by accident: above the 0-99 range
most tools stay in, and below the shell's 125-127 and the 128+N of signals.
"""

from __future__ import annotations


class ExitStatus:
    """Exit statuses that debounce reports for itself (the man page and README list them).

    Plain ints, not an ``enum.IntEnum``: the client imports this on every ``debounce run``,
    and ``enum`` alone costs it about 4 ms, half of what starting Python costs.
    """

    SUCCESS = 0
    #: ``debounce daemon`` could not start; with ``--stdin``, a line or a run failed; any
    #: command: its output could not be written (a write error).
    FAILURE = 1
    #: The command line was wrong (unknown option, bad duration, bad key template...).
    USAGE = 2
    #: No daemon answered and none could be started.
    DAEMON_UNREACHABLE = 112
    #: The daemon went away while the client was waiting; ``debounce wait`` reattaches.
    DAEMON_LOST = 113
    #: The invocation was dropped by ``debounce cancel`` before it ran.
    CANCELLED = 114
    #: ``debounce wait --timeout`` ran out before the run finished.
    WAIT_TIMEOUT = 115
    #: The daemon refused the request (for example, it cannot store it).
    REFUSED = 116
    #: ``debounce wait``, ``flush``, ``cancel`` or ``logs`` found nothing by that name.
    NOT_FOUND = 117
    #: A fleet submission's outcome is unknown: the store may have taken it but did not
    #: confirm it in time; ``debounce wait --invocation ID`` finds out.
    OUTCOME_UNKNOWN = 118
    #: Ctrl-C (SIGINT) while waiting: the client stops; the invocation stays with the daemon.
    INTERRUPTED = 130

    @classmethod
    def all(cls) -> dict[str, int]:
        """Every status by name."""
        return {name: value for name, value in vars(cls).items()
                if name.isupper() and isinstance(value, int)}
