"""``debounce watch``: file changes become submissions. The only module that imports watchfiles.

Every batch of changes that watchfiles reports is submitted at once, keyed by the command, over
one connection, so the daemon's quiet period turns a burst of saves into one run. The run must
see the changed paths of the whole burst, not only of the last batch, so this process keeps the
paths no run has been handed yet and sends them all with every submission: always in a private
file named by ``$DEBOUNCE_CHANGED_PATHS_FILE`` (one path per line), and also in
``$DEBOUNCE_CHANGED_PATHS`` while the list is small enough for an environment (an ``rm -rf`` of
a tree would otherwise make the run fail with "Argument list too long"). A name holding a line
break is quoted in those (:func:`listed`), so that no name can forge a line; the exact names
are in ``$DEBOUNCE_CHANGED_PATHS_FILE0``, each ended by a NUL byte.

One second connection follows the key (``wait``) while anything of ours is pending or running:
it prints the runs' output, and when a run starts it says which submission won, so the paths
that submission carried are dropped, and the lists of the submissions it superseded removed.

Directories are watched recursively; a file named on the command line is watched through its
directory (not recursively), so an editor that saves by writing a temporary file and renaming
it over the original does not end the watch. What counts under a directory is decided here:
watchfiles' default ignores, ``.gitignore`` files (a subset of git's rules, see
:func:`parse_pattern`), ``--ignore`` and ``--filter``. Ctrl-C cancels what this watcher left
pending in the daemon and exits 130.
"""

from __future__ import annotations

import binascii
import itertools
import os
import queue
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Any

from watchfiles import Change, DefaultFilter, watch

from debounce_cli import client, protocol

#: ``$DEBOUNCE_CHANGED_PATHS`` is set only while the list is shorter than this (bytes). Linux
#: refuses any single environment string over 128 KiB (and all of them over about 2 MiB).
ENV_LIMIT = 64 * 1024

#: What ends a line for some reader of a list of paths: ``\n`` for the shell's ``read``,
#: and the rest of what Python's ``str.splitlines`` splits on.
LINE_BREAKS = frozenset("\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029")

#: How often (ms) a watchfiles thread comes back without changes; its first return says that
#: its watches are in place.
_TICK_MS = 200


# ------------------------------------------------------------------ gitignore-style patterns
@dataclass(frozen=True)
class Pattern:
    """One line of a .gitignore file (or one ``--ignore``/``--filter`` glob).

    ``anchored`` patterns (a slash at the start or in the middle) match the path relative to
    ``base``; the others match the name of a file or directory at any depth.
    """

    regex: re.Pattern[str]
    base: str
    negate: bool
    dir_only: bool
    anchored: bool

    def matches(self, path: str, is_dir: bool) -> bool:
        if self.dir_only and not is_dir:
            return False
        if not self.anchored:
            return self.regex.fullmatch(os.path.basename(path)) is not None
        prefix = self.base.rstrip("/") + "/"
        if not path.startswith(prefix):
            return False
        return self.regex.fullmatch(path[len(prefix) :]) is not None


def parse_pattern(line: str, base: str) -> Pattern | None:
    """A gitignore line as a Pattern, ``None`` for a blank line or a comment.

    The subset of gitignore(5) understood: ``#`` comments, blank lines, trailing spaces
    (unless escaped with a backslash), ``!`` negation, a trailing ``/`` for directories only,
    a leading or middle ``/`` anchoring to ``base``, ``*`` and ``?`` (never across ``/``),
    ``[...]`` classes, ``**`` as a whole path segment (any number of directories), and a
    backslash quoting the next character (``\\#``, ``\\!``).
    """
    text = line.rstrip("\r\n")
    while text.endswith(" ") and not text.endswith("\\ "):
        text = text[:-1]
    if not text or text.startswith("#"):
        return None
    negate = text.startswith("!")
    if negate:
        text = text[1:]
    dir_only = text.endswith("/")
    text = text.rstrip("/")
    if not text:
        return None
    anchored = "/" in text
    text = text.lstrip("/")
    return Pattern(_translate(text), base, negate, dir_only, anchored)


def _translate(glob: str) -> re.Pattern[str]:
    """A gitignore glob as a regular expression for ``fullmatch``."""
    out: list[str] = []
    i, n = 0, len(glob)
    while i < n:
        c = glob[i]
        if c == "*":
            j = i
            while j < n and glob[j] == "*":
                j += 1
            whole_segment = (i == 0 or glob[i - 1] == "/") and (j == n or glob[j] == "/")
            if j - i >= 2 and whole_segment:
                if j == n:
                    out.append(".*")  # trailing "**": everything inside
                else:
                    out.append("(?:.*/)?")  # "**/": zero or more directories
                    j += 1
            else:
                out.append("[^/]*")
            i = j
        elif c == "?":
            out.append("[^/]")
            i += 1
        elif c == "[":
            end, klass = _bracket(glob, i)
            if end < 0:
                out.append(re.escape(c))
                i += 1
            else:
                out.append(klass)
                i = end
        elif c == "\\" and i + 1 < n:
            out.append(re.escape(glob[i + 1]))
            i += 2
        else:
            out.append(re.escape(c))
            i += 1
    return re.compile("".join(out), re.DOTALL)


def _bracket(glob: str, start: int) -> tuple[int, str]:
    """``[...]`` at ``start``: (index after it, regex class), or (-1, "") if it is unclosed."""
    j = start + 1
    negate = j < len(glob) and glob[j] in "!^"
    if negate:
        j += 1
    members: list[str] = []
    first = True
    while j < len(glob) and (glob[j] != "]" or first):
        c = glob[j]
        if c == "\\" and j + 1 < len(glob):
            members.append(re.escape(glob[j + 1]))
            j += 2
        else:
            members.append("-" if c == "-" else re.escape(c))
            j += 1
        first = False
    if j >= len(glob):
        return -1, ""
    return j + 1, "(?!/)[" + ("^" if negate else "") + "".join(members) + "]"


class PathFilter:
    """Which changes under the watched directories count.

    A change is dropped when watchfiles' default filter drops it (version control, caches,
    editor droppings), when it or a directory above it (below the watched directory) is
    ignored, or when ``--filter`` is given and neither it nor such a directory matches one.
    Ignore rules are taken in git's order, the last match winning: the repository's
    ``.git/info/exclude``, the ``.gitignore`` files from the repository's top (or the watched
    directory, outside a repository) down to the path, then ``--ignore``. A directory that is
    ignored cannot be re-included by a ``!`` rule for something inside it, as in git.
    """

    def __init__(self, roots: Sequence[str], filters: Sequence[str], ignores: Sequence[str],
                 vcs_ignore: bool, cwd: str):
        self.roots = sorted(roots, key=len, reverse=True)  # innermost first
        self.ignores = [p for p in (parse_pattern(g, cwd) for g in ignores) if p is not None]
        self.filters = [p for p in (parse_pattern(g, cwd) for g in filters) if p is not None]
        self.vcs_ignore = vcs_ignore
        self.defaults = DefaultFilter()
        self.files: dict[str, list[Pattern]] = {}  # ignore file -> its patterns, read once
        self.chains: dict[str, tuple[str, list[str]]] = {}  # root -> (repo top, dirs to root)
        for root in self.roots:
            top = _repository_top(root)
            chain = [root]
            while chain[0] != top:
                chain.insert(0, os.path.dirname(chain[0]))
            self.chains[root] = (top, chain)

    def changed_file(self, path: str) -> None:
        """``path`` changed: if it is an ignore file, read it again when next needed.

        When its directory is gone (``rm -rf``), its rules are kept for the deletions that
        follow it.
        """
        if (os.path.basename(path) == ".gitignore" or path.endswith("/.git/info/exclude")) \
                and os.path.isdir(os.path.dirname(path)):
            self.files.pop(path, None)

    def wanted(self, path: str) -> bool:
        root = next((r for r in self.roots if path.startswith(r.rstrip("/") + "/")), None)
        if root is None:
            return True  # a watched directory itself
        rel = path[len(root.rstrip("/")) + 1 :]
        if not self.defaults(Change.modified, rel):
            return False
        top, chain = self.chains[root]
        dirs = list(chain)  # the directories whose .gitignore applies to what is below
        parts = rel.split("/")
        kept = not self.filters
        here = root.rstrip("/")
        for depth, part in enumerate(parts):
            here = f"{here}/{part}"
            if depth < len(parts) - 1:
                is_dir = True
            else:
                # A path that is gone may have been a directory: a directory-only rule counts
                # it as one, so that `rm -rf build` is ignored with `build/`.
                is_dir = os.path.isdir(here) or not os.path.lexists(here)
            if self._ignored(here, is_dir, top, dirs):
                return False
            if not kept:
                kept = _last_match(self.filters, here, is_dir)
            dirs.append(here)
        return kept

    def _ignored(self, path: str, is_dir: bool, top: str, dirs: list[str]) -> bool:
        layers: list[list[Pattern]] = []
        if self.vcs_ignore:
            layers.append(self._read(os.path.join(top, ".git", "info", "exclude"), top))
            layers.extend(self._read(os.path.join(d, ".gitignore"), d) for d in dirs)
        layers.append(self.ignores)
        return _last_match(itertools.chain.from_iterable(layers), path, is_dir)

    def _read(self, file: str, base: str) -> list[Pattern]:
        patterns = self.files.get(file)
        if patterns is None:
            try:
                with open(file, encoding="utf-8", errors="surrogateescape") as f:
                    text = f.read(1024 * 1024)
            except OSError:
                text = ""
            patterns = [p for p in (parse_pattern(line, base) for line in text.splitlines())
                        if p is not None]
            self.files[file] = patterns
        return patterns


def _last_match(patterns: Iterable[Pattern], path: str, is_dir: bool) -> bool:
    """Whether the last of ``patterns`` that matches ``path`` is a positive one."""
    result = False
    for pattern in patterns:
        if pattern.matches(path, is_dir):
            result = not pattern.negate
    return result


def _repository_top(root: str) -> str:
    """The top of the git repository holding ``root``, else ``root`` itself."""
    here = root
    while True:
        if os.path.lexists(os.path.join(here, ".git")):
            return here
        parent = os.path.dirname(here)
        if parent == here:
            return root
        here = parent


# ------------------------------------------------------------------ submitting
class Watcher:
    def __init__(self, sock: str, argv: list[str], key: str, options: dict[str, Any],
                 quiet: bool):
        self.sock = sock
        self.argv = argv
        self.key = key
        self.options = options
        self.quiet = quiet
        self.lock = threading.Lock()
        # Changed paths no run has been handed yet, in order, each with whether it was
        # created during the burst (one that is gone again was a temporary file).
        self.undelivered: dict[str, bool] = {}
        self.dropped = 0  # absolute index of undelivered's first among all paths ever kept
        self.upto: dict[int, int] = {}  # submission id -> absolute end of the paths it carried
        self.ours: dict[int, str] = {}  # submission id -> daemon key, while it may yet run
        self.lists: dict[int, tuple[str, str]] = {}  # submission id -> its lists (lines, NUL)
        self.started: dict[str, int] = {}  # key -> the invocation its latest run started with
        self.runs: dict[int, str] = {}  # run id -> key, for runs of ours that started
        self.ended: dict[int, int] = {}  # run id -> exit status, for runs of ours that ended
        self.changed = threading.Condition(self.lock)  # notified when a run of ours ends
        self.tmpdir: str | None = None
        self.written = 0
        self.submitter: client.Connection | None = None
        self.follower: threading.Thread | None = None

    def submit(self, changed: Iterable[tuple[str, bool]], force: bool = False) -> None:
        """Add ``(path, created)`` changes to the burst and submit the whole burst.

        Paths created during the burst that are gone again are left out. When nothing is
        left and nothing of ours waits to run, nothing is submitted (unless ``force``).
        """
        with self.lock:
            for path, created in changed:
                if path not in self.undelivered:
                    self.undelivered[path] = created
            burst = list(self.undelivered.items())
            end = self.dropped + len(burst)
            waiting = bool(self.upto)
        paths = [path for path, created in burst if not created or os.path.lexists(path)]
        if not paths and not waiting and not force:
            return  # only temporary files came and went
        lines = [listed(path) for path in paths]
        try:
            listing, exact = self._write_lists(lines, paths)
        except OSError as exc:
            print(f"debounce: cannot write the list of changed paths: {exc}", file=sys.stderr,
                  flush=True)
            return
        env = dict(os.environ)
        env["DEBOUNCE_CHANGED_PATHS_FILE"] = listing
        env["DEBOUNCE_CHANGED_PATHS_FILE0"] = exact
        text = "\n".join(lines)
        if len(text.encode("utf-8", "surrogateescape")) < ENV_LIMIT:
            env["DEBOUNCE_CHANGED_PATHS"] = text
        else:
            env.pop("DEBOUNCE_CHANGED_PATHS", None)  # the file has them
        request = protocol.RunRequest(argv=self.argv, cwd=os.getcwd(), env=env, key=self.key,
                                      options=self.options, wait=False)
        reply = self._ask(request)
        if isinstance(reply, protocol.Accepted):
            with self.lock:
                self.upto[reply.id] = end
                self.ours[reply.id] = reply.key
                self.lists[reply.id] = (listing, exact)
                if self.follower is None or not self.follower.is_alive():
                    self.follower = threading.Thread(target=self._follow, daemon=True)
                    self.follower.start()
            return
        _remove(listing)
        _remove(exact)
        if reply is not None:
            print(f"debounce: {getattr(reply, 'message', reply.type)}", file=sys.stderr,
                  flush=True)

    def _write_lists(self, lines: list[str], paths: list[str]) -> tuple[str, str]:
        """Two new private files (0600, in a private directory): ``lines``, one a line, and
        ``paths``, each ended by a NUL byte. Neither is left behind if one fails."""
        if self.tmpdir is None:
            self.tmpdir = tempfile.mkdtemp(prefix="debounce-watch-")  # mode 0700
        self.written += 1
        names: list[str] = []
        try:
            # (".0" for the exact list: "changed-1" + "0" was the tenth burst's "changed-10")
            for suffix, items, end in (("", lines, b"\n"), (".0", paths, b"\0")):
                name = os.path.join(self.tmpdir, f"changed-{self.written}{suffix}")
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
                fd = os.open(name, flags, 0o600)
                names.append(name)
                with os.fdopen(fd, "wb") as f:
                    f.write(b"".join(os.fsencode(item) + end for item in items))
        except OSError:
            for name in names:
                _remove(name)
            raise
        return names[0], names[1]

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
                    if isinstance(reply, protocol.Error):  # an error ends the connection
                        self.submitter.close()
                        self.submitter = None
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
                # Always said as a key: a key of digits would else be read as a run id.
                conn = client.connect(self.sock,
                                      protocol.WaitRequest(target=self.key, by="key"))
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
                for path in list(itertools.islice(self.undelivered, end - self.dropped)):
                    del self.undelivered[path]
                self.dropped = end

    def _forget(self, key: str, keep: int | None = None, upto: int | None = None) -> None:
        """Submissions of ``key`` (up to ``upto``) that will not run, or ran: remove their
        lists, all but the one of the run still going (``keep``)."""
        with self.lock:
            gone = [sid for sid, k in self.ours.items()
                    if k == key and sid != keep and (upto is None or sid <= upto)]
            for sid in gone:
                del self.ours[sid]
                for listing in self.lists.pop(sid, ()):
                    _remove(listing)

    def _follow_one(self, conn: client.Connection) -> None:
        while True:
            msg = conn.recv()
            if msg is None:
                return
            if isinstance(msg, protocol.Started):
                self._delivered(msg.invocation)
                with self.lock:
                    self.started[msg.key] = msg.invocation
                    if msg.invocation in self.ours:
                        self.runs[msg.run_id] = msg.key
                # Earlier submissions were superseded: their lists will never be read.
                self._forget(msg.key, keep=msg.invocation, upto=msg.invocation)
            elif isinstance(msg, protocol.Output):
                if not self.quiet:
                    client.write_output(msg.fd, binascii.a2b_base64(msg.data))
            elif isinstance(msg, protocol.Finished):
                self._delivered(msg.invocation)  # (a run that ended before we followed)
                with self.lock:
                    if self.runs.pop(msg.run_id, None) is not None:
                        self.ended[msg.run_id] = _status_of(msg)
                        self.changed.notify_all()
                self._forget(msg.key, upto=msg.invocation)
                if msg.exit_code != 0:
                    print(f"debounce: run {msg.run_id} exited {msg.exit_code}",
                          file=sys.stderr, flush=True)
                return
            elif isinstance(msg, (protocol.Cancelled, protocol.Error)):
                with self.lock:
                    self.upto.clear()  # cancelled (or nothing left): stop following
                if isinstance(msg, protocol.Cancelled):
                    self._forget(msg.key, keep=self.started.get(msg.key))
                return

    def _rows(self) -> list[protocol.KeyStatus] | None:
        """The daemon's rows for keys that hold something of ours (``None``: no answer)."""
        fleet = bool(self.options.get("fleet"))
        host = None
        if fleet:
            import socket

            from debounce_cli.options import HOST_ENV

            host = os.environ.get(HOST_ENV) or socket.gethostname()
        reply = self._ask(protocol.StatusRequest(fleet=fleet))
        if not isinstance(reply, protocol.StatusReply):
            return None
        # Another host's invocation or run of a fleet key is not ours.
        return [row for row in reply.keys if not fleet or row.host in (None, host)]

    def cancel_pending(self) -> list[tuple[int, str]]:
        """Ctrl-C: cancel what we left pending; return the runs of ours still executing, as
        ``(run id, key)``."""
        with self.lock:
            ours = set(self.ours)
            runs = dict(self.runs)
        if not ours and not runs:
            return []
        rows = self._rows()
        if rows is None:
            return []
        running = []
        for row in rows:
            if row.pending is not None and row.pending.id in ours:
                answer = self._ask(protocol.CancelRequest(key=row.key, by="key"))
                if isinstance(answer, protocol.Done):
                    with self.lock:  # what was not handed to a run will never run now
                        for sid, key in self.ours.items():
                            if key == row.key:
                                self.upto.pop(sid, None)
                    print(f"debounce: cancelled what was pending for {row.key}",
                          file=sys.stderr, flush=True)
            if row.running is not None and row.running.run_id in runs:
                running.append((row.running.run_id, row.key))
        return running

    def kill(self, running: list[tuple[int, str]]) -> None:
        """Stop these runs of ours (TERM, then KILL after their stop timeout, as ``debounce
        kill`` does)."""
        fleet = bool(self.options.get("fleet"))
        for run_id, key in running:
            # A fleet run is named by its key (its id is the fleet's, not this daemon's).
            answer = self._ask(protocol.KillRequest(target=key, by="key") if fleet
                               else protocol.KillRequest(target=str(run_id), by="run"))
            if isinstance(answer, protocol.Done):
                print(f"debounce: stopping run {run_id} of {key}", file=sys.stderr,
                      flush=True)

    def wait_runs(self, running: list[tuple[int, str]], interrupted: Callable[[], bool]
                  ) -> int | None:
        """Wait until these runs of ours have ended, their output printed: the first non-zero
        status among them, else 0. ``None`` when ``interrupted()`` comes true first.

        The follower sees each run end; the daemon is asked too, now and then, in case the
        follower is not on that run (its status then comes from the run's record).
        """
        left = {run_id for run_id, _ in running}
        statuses: dict[int, int] = {}
        asked = time.monotonic()
        while left:
            with self.lock:
                for run_id in list(left):
                    if run_id in self.ended:
                        statuses[run_id] = self.ended[run_id]
                        left.discard(run_id)
                if left and not interrupted():
                    self.changed.wait(timeout=0.1)
            if interrupted():
                return None
            if left and time.monotonic() - asked >= 1.0:
                asked = time.monotonic()
                rows = self._rows()
                executing = {row.running.run_id for row in rows or () if row.running}
                for run_id in left - executing if rows is not None else ():
                    statuses[run_id] = self._ended_with(run_id)
                    left.discard(run_id)
        return next((s for s in statuses.values() if s != 0), 0)

    def _ended_with(self, run_id: int) -> int:
        """The exit status of a run of ours that ended while the follower was elsewhere."""
        with self.lock:
            if run_id in self.ended:
                return self.ended[run_id]
        try:  # its record: a run that has ended is answered at once
            reply = client.request(self.sock, protocol.WaitRequest(target=str(run_id), by="run"),
                                   autostart=False)
        except (client.ClientError, client.DaemonLost):
            return 0
        return _status_of(reply) if isinstance(reply, protocol.Finished) else 0

    def close(self) -> None:
        if self.submitter is not None:
            self.submitter.close()
            self.submitter = None
        if self.tmpdir is not None:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            self.tmpdir = None


def _status_of(msg: protocol.Finished) -> int:
    """What a waiting client would exit with for this run (113 for a run that was lost)."""
    from debounce_cli.exits import ExitStatus
    from debounce_cli.states import LOST

    return ExitStatus.DAEMON_LOST if msg.outcome == LOST else msg.exit_code


def listed(path: str) -> str:
    """``path`` as a line of ``$DEBOUNCE_CHANGED_PATHS(_FILE)``: as it is, unless it holds a
    line break (:data:`LINE_BREAKS`); then quoted as bash's ``$'...'`` (``$'/src/evil\\x0a-rf'``),
    one line that no listed path can be, as those are absolute (they start with ``/``)."""
    if LINE_BREAKS.isdisjoint(path):
        return path
    return protocol.shown(path)


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


# ------------------------------------------------------------------ watching
_TREES, _FILES = "trees", "files"


def _pump(paths: list[str], recursive: bool, tag: str, out: queue.Queue[Any],
          stop: threading.Event) -> None:
    """One watchfiles watch in a thread: ``(tag, None)`` once it is in place, then batches."""
    ready = False
    try:
        for batch in watch(*paths, watch_filter=None, debounce=50, step=20, stop_event=stop,
                           rust_timeout=_TICK_MS, yield_on_timeout=True, raise_interrupt=False,
                           recursive=recursive):
            if not ready:
                ready = True
                out.put((tag, None))
            if batch:
                out.put((tag, batch))
    except Exception as exc:  # noqa: BLE001 - reported by the main thread
        out.put(exc)


def run_watch(
    sock: str,
    paths: Sequence[str],
    argv: list[str],
    key: str,
    options: dict[str, Any],
    filters: Sequence[str],
    ignores: Sequence[str],
    quiet: bool,
    vcs_ignore: bool = True,
    initial: bool = False,
) -> int:
    """Watch ``paths`` until Ctrl-C, submitting ``argv`` for every batch of changes.

    Ctrl-C stops watching and cancels what this watcher left pending; a run of ours that is
    executing is left to end (and its output printed), and the status is then 130, or the
    run's own if it failed. A second Ctrl-C stops that run and returns 130 at once. SIGTERM
    cancels and stops at once (143).
    """
    import logging

    logging.getLogger("watchfiles").setLevel(logging.ERROR)
    cwd = os.getcwd()
    roots: list[str] = []
    named: dict[str, str] = {}  # a path its directory's watch reports -> the named file
    for path in paths:
        full = os.path.abspath(path)
        if os.path.isdir(full):
            roots.append(full)
        else:
            named[full] = full
            named.setdefault(os.path.join(os.path.dirname(os.path.realpath(full)),
                                          os.path.basename(os.path.realpath(full))), full)
    roots = list(dict.fromkeys(roots))
    parents = sorted({os.path.dirname(p) for p in named})
    path_filter = PathFilter(roots, filters, ignores, vcs_ignore, cwd)
    watcher = Watcher(sock, argv, key, options, quiet)

    caught: list[int] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        caught.append(signum)
        if len(caught) > 2:
            raise KeyboardInterrupt  # asked three times: leave now, whatever is under way

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    stop = threading.Event()
    changes: queue.Queue[Any] = queue.Queue()
    sources = [(roots, True, _TREES), (parents, False, _FILES)]
    threads = [threading.Thread(target=_pump, args=(p, r, t, changes, stop), daemon=True)
               for p, r, t in sources if p]
    status = 0
    try:
        for thread in threads:
            thread.start()
        waiting_for = len(threads)
        while not caught:
            try:
                item = changes.get(timeout=0.1)
            except queue.Empty:
                continue
            if isinstance(item, Exception):
                print(f"debounce: cannot watch: {item}", file=sys.stderr, flush=True)
                status = 1
                break
            tag, batch = item
            if batch is None:
                waiting_for -= 1
                if waiting_for == 0:
                    print(f"debounce: watching {', '.join(paths)} (Ctrl-C to stop)",
                          file=sys.stderr, flush=True)
                    if initial:
                        watcher.submit([], force=True)
                continue
            changed = _sift(tag, batch, path_filter, named)
            if changed:
                watcher.submit(changed)
        if caught:
            stop.set()  # no more submissions
            status = 128 + caught[0]
            running = watcher.cancel_pending()
            if running and caught == [signal.SIGINT]:
                for run_id, run_key in running:
                    print(f"debounce: run {run_id} of {run_key} is still running: waiting for "
                          "it to end (Ctrl-C again stops it)", file=sys.stderr, flush=True)
                ended = watcher.wait_runs(running, lambda: len(caught) > 1)
                if ended is not None:
                    running = []
                    status = ended or status
            watcher.kill(running)
    except KeyboardInterrupt:
        status = 128 + signal.SIGINT
    finally:
        stop.set()
        for s, handler in previous.items():
            signal.signal(s, handler)
        watcher.close()
    return status


def _sift(tag: str, batch: set[tuple[Change, str]], path_filter: PathFilter,
          named: dict[str, str]) -> list[tuple[str, bool]]:
    """The changes that count, as ``(path, created)`` in path order."""
    kinds: dict[str, set[Change]] = {}
    for change, path in batch:
        kinds.setdefault(path, set()).add(change)
    for path in kinds:
        path_filter.changed_file(path)
    changed = []
    for path in sorted(kinds):
        created = Change.added in kinds[path]
        if tag == _FILES:
            if path in named:
                changed.append((named[path], created))
        elif path_filter.wanted(path):
            changed.append((path, created))
    return changed
