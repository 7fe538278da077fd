"""``debounce watch``: file changes become submissions. The only module that imports watchfiles.

Every batch of changes that watchfiles reports is submitted at once, keyed by the command, so
the daemon's quiet period turns a burst of saves into one run. The run must see the changed
paths of the whole burst, not only of the last batch, so this process keeps the paths that no
run has been handed yet and sends them all with every submission. Each submission's connection
stays open: when the daemon says a run started, the paths that run was given are dropped, and
the first connection to hear of a run prints its output, so each run's output shows once.
"""

from __future__ import annotations

import fnmatch
import os
import sys
import threading
from collections.abc import Sequence
from typing import Any

from watchfiles import Change, DefaultFilter, watch

from debounce_cli import client, protocol


class GlobFilter(DefaultFilter):
    """watchfiles' default ignores (version control, caches, editor droppings) plus globs.

    A glob without a slash matches the file name; one with a slash matches the path relative
    to the current directory. ``--filter`` keeps only matching files; ``--ignore`` drops them.
    """

    def __init__(self, filters: Sequence[str], ignores: Sequence[str]):
        super().__init__()
        self.filters = list(filters)
        self.ignores = list(ignores)
        self.cwd = os.getcwd()

    def _matches(self, globs: list[str], path: str) -> bool:
        name = os.path.basename(path)
        rel = os.path.relpath(path, self.cwd)
        return any(fnmatch.fnmatch(rel if "/" in g else name, g) for g in globs)

    def __call__(self, change: Change, path: str) -> bool:
        if not super().__call__(change, path):
            return False
        if self.ignores and self._matches(self.ignores, path):
            return False
        if self.filters and not self._matches(self.filters, path):
            return False
        return True


class Watcher:
    def __init__(self, sock: str, argv: list[str], key: str, options: dict[str, Any],
                 quiet: bool):
        self.sock = sock
        self.argv = argv
        self.key = key
        self.options = options
        self.quiet = quiet
        self.lock = threading.Lock()
        self.undelivered: list[str] = []  # changed paths no run has been handed yet
        self.dropped = 0  # how many paths from the front of the history are delivered
        self.printed: set[int] = set()  # runs whose output some connection prints
        self.failures = 0

    def submit(self, changed: list[str]) -> None:
        with self.lock:
            for path in changed:
                if path not in self.undelivered:
                    self.undelivered.append(path)
            paths = list(self.undelivered)
            upto = self.dropped + len(paths)
        env = dict(os.environ)
        env["DEBOUNCE_CHANGED_PATHS"] = "\n".join(paths)
        request = protocol.RunRequest(argv=self.argv, cwd=os.getcwd(), env=env, key=self.key,
                                      options=self.options, wait=True)
        try:
            conn = client.connect(self.sock, request)
        except client.ClientError as exc:
            print(f"debounce: {exc}", file=sys.stderr)
            self.failures += 1
            return
        threading.Thread(target=self._follow, args=(conn, upto), daemon=True).start()

    def _follow(self, conn: client.Connection, upto: int) -> None:
        """Follow one submission to its run; print the run's output if nobody else does."""
        printing = False
        try:
            while True:
                msg = conn.recv()
                if msg is None:
                    return
                if isinstance(msg, protocol.Started):
                    with self.lock:
                        if upto > self.dropped:
                            del self.undelivered[: upto - self.dropped]
                            self.dropped = upto
                        printing = msg.run_id not in self.printed
                        self.printed.add(msg.run_id)
                elif isinstance(msg, protocol.Output):
                    if printing and not self.quiet:
                        import binascii

                        client.write_output(msg.fd, binascii.a2b_base64(msg.data))
                elif isinstance(msg, protocol.Finished):
                    if printing and msg.exit_code != 0:
                        print(f"debounce: run {msg.run_id} exited {msg.exit_code}",
                              file=sys.stderr, flush=True)
                    return
                elif isinstance(msg, (protocol.Cancelled, protocol.Error)):
                    if isinstance(msg, protocol.Error):
                        print(f"debounce: {msg.message}", file=sys.stderr, flush=True)
                    return
        except (client.ClientError, OSError):
            return
        finally:
            conn.close()


def run_watch(
    sock: str,
    paths: Sequence[str],
    argv: list[str],
    key: str,
    options: dict[str, Any],
    filters: Sequence[str],
    ignores: Sequence[str],
    quiet: bool,
) -> int:
    """Watch ``paths`` until Ctrl-C, submitting ``argv`` for every batch of changes."""
    import logging

    # watchfiles says "KeyboardInterrupt caught, stopping watch" through logging; Ctrl-C is
    # the normal way to stop here, not something to warn about.
    logging.getLogger("watchfiles").setLevel(logging.ERROR)
    watcher = Watcher(sock, argv, key, options, quiet)
    watch_filter = GlobFilter(filters, ignores)
    print(f"debounce: watching {', '.join(paths)} (Ctrl-C to stop)", file=sys.stderr,
          flush=True)
    try:
        for changes in watch(*paths, watch_filter=watch_filter, raise_interrupt=False,
                             debounce=50, step=20):
            changed = sorted({path for _change, path in changes})
            if changed:
                watcher.submit(changed)
    except KeyboardInterrupt:
        pass
    return 0
