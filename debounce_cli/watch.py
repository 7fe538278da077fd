"""``debounce watch``: file changes become submissions. The only module that imports watchfiles.

Every batch of changes that watchfiles reports is submitted at once, keyed by the command, over
one connection, so the daemon's quiet period turns a burst of saves into one run. The run must
see the changed paths of the whole burst, not only of the last batch, so this process keeps the
paths no run has been handed yet and sends them all with every submission.

One second connection follows the key (``wait``) while anything of ours is pending or running:
it prints the runs' output, and when a run starts it says which submission won, so the paths
that submission carried are dropped.
"""

from __future__ import annotations

import binascii
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
        return not self.filters or self._matches(self.filters, path)


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
        self.dropped = 0  # absolute index of undelivered[0] among all paths ever kept
        self.upto: dict[int, int] = {}  # submission id -> absolute end of the paths it carried
        self.submitter: client.Connection | None = None
        self.follower: threading.Thread | None = None

    def submit(self, changed: list[str]) -> None:
        with self.lock:
            for path in changed:
                if path not in self.undelivered:
                    self.undelivered.append(path)
            paths = list(self.undelivered)
            end = self.dropped + len(paths)
        env = dict(os.environ)
        env["DEBOUNCE_CHANGED_PATHS"] = "\n".join(paths)
        request = protocol.RunRequest(argv=self.argv, cwd=os.getcwd(), env=env, key=self.key,
                                      options=self.options, wait=False)
        reply = self._ask(request)
        if isinstance(reply, protocol.Accepted):
            with self.lock:
                self.upto[reply.id] = end
                if self.follower is None or not self.follower.is_alive():
                    self.follower = threading.Thread(target=self._follow, daemon=True)
                    self.follower.start()
        elif reply is not None:
            print(f"debounce: {getattr(reply, 'message', reply.type)}", file=sys.stderr,
                  flush=True)

    def _ask(self, request: protocol.Message) -> protocol.Message | None:
        """Send over the persistent connection, reconnecting once if the daemon went away."""
        for attempt in (1, 2):
            try:
                if self.submitter is None:
                    self.submitter = client.connect(self.sock, request)
                else:
                    self.submitter.send(request)
                reply = self.submitter.recv(timeout=30)
                if reply is not None:
                    return reply
            except (client.ClientError, OSError, TimeoutError) as exc:
                if attempt == 2:
                    print(f"debounce: {exc}", file=sys.stderr, flush=True)
                    return None
            if self.submitter is not None:
                self.submitter.close()
                self.submitter = None
        return None

    def _follow(self) -> None:
        """Follow the key until nothing of ours is left: print output, drop delivered paths."""
        while True:
            try:
                conn = client.connect(self.sock, protocol.WaitRequest(target=self.key))
            except client.ClientError as exc:
                print(f"debounce: {exc}", file=sys.stderr, flush=True)
                return
            try:
                self._follow_one(conn)
            except (client.ClientError, OSError):
                return
            finally:
                conn.close()
            with self.lock:
                if not self.upto:  # every submission of ours has been handed to a run
                    return

    def _delivered(self, invocation: int) -> None:
        """A run started with ``invocation``: it and every earlier submission are handed over."""
        with self.lock:
            done = [sid for sid in self.upto if sid <= invocation]
            if not done:
                return
            end = max(self.upto.pop(sid) for sid in done)
            if end > self.dropped:
                del self.undelivered[: end - self.dropped]
                self.dropped = end

    def _follow_one(self, conn: client.Connection) -> None:
        while True:
            msg = conn.recv()
            if msg is None:
                return
            if isinstance(msg, protocol.Started):
                self._delivered(msg.invocation)
            elif isinstance(msg, protocol.Output):
                if not self.quiet:
                    client.write_output(msg.fd, binascii.a2b_base64(msg.data))
            elif isinstance(msg, protocol.Finished):
                self._delivered(msg.invocation)  # (a run that ended before we followed)
                if msg.exit_code != 0:
                    print(f"debounce: run {msg.run_id} exited {msg.exit_code}",
                          file=sys.stderr, flush=True)
                return
            elif isinstance(msg, (protocol.Cancelled, protocol.Error)):
                with self.lock:
                    self.upto.clear()  # cancelled (or nothing left): stop following
                return


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
