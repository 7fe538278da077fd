"""``debounce daemon --stdin``: invocations read from standard input, one per line.

A line is a shell-quoted command line or a JSON object whose fields are those of the option
table (``options.RUN_OPTIONS``) plus ``argv``, ``key``, ``cwd`` and ``env``. The runs' output
goes to the daemon's own stdout and stderr; failures are counted for the exit status.

A line holds at most ``MAX_LINE`` bytes (1 MiB, half of what Linux usually takes for a whole
command line and its environment). A longer one is refused by its number and counts as a
failure; the reader drops its bytes as they come instead of keeping them, and nothing here
copies or parses a line more than a fixed number of times, so no line can hold the event loop
or fill the memory.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

from debounce_cli import keys, protocol
from debounce_cli.daemon import records
from debounce_cli.daemon.core import Core
from debounce_cli.daemon.jobs import Job, check_key, parse_options
from debounce_cli.durations import DurationError, parse_duration
from debounce_cli.options import BY_NAME, DURATION, RUN_OPTIONS, expand
from debounce_cli.protocol import ProtocolError
from debounce_cli.scheduler import Invocation, Options

#: JSON field -> (option field, negated). Negated flags are accepted by their flag's name too
#: ("no_defer": true is "defer": false).
_OPTION_FIELDS: dict[str, tuple[str, bool]] = {}
for _option in RUN_OPTIONS:
    _OPTION_FIELDS[_option.name] = (_option.name, False)
    if _option.negated:
        _OPTION_FIELDS[_option.param] = (_option.name, True)
_FIELDS = ({"argv", "key", "cwd", "env"} | {f + protocol.B64 for f in protocol.BYTES_FIELDS}
           | set(_OPTION_FIELDS))


class StdinWaiter:
    """Waits for the runs of stdin's invocations: their output goes to our stdout/stderr, and
    a run that fails is reported with the line it came from."""

    def __init__(self) -> None:
        self.failures = 0
        self.runs: set[int] = set()  # runs whose output goes to stdout/stderr now
        #: The line of a local run's winning invocation (its Job carries it: a table here
        #: would cost every pending invocation a few hundred bytes).
        self.line_of_run: Callable[[int], int | None] = lambda run_id: None
        #: Fleet keys: key -> (invocation id, line) of its latest line here (a fleet run may
        #: execute on another host, so no Job of ours carries it).
        self.fleet_lines: dict[str, tuple[int, int]] = {}

    def submitted_fleet(self, key: str, invocation: int, number: int) -> None:
        self.fleet_lines[key] = (invocation, number)

    def _line_of(self, msg: protocol.Finished) -> int | None:
        """The line of the invocation that won."""
        latest = self.fleet_lines.get(msg.key)
        if latest is None:
            return self.line_of_run(msg.run_id)
        del self.fleet_lines[msg.key]
        return latest[1] if latest[0] == msg.invocation else None

    def raw(self, line: bytes) -> None:
        pass

    def follows(self, run_id: int) -> bool:
        return run_id in self.runs

    def start(self, run_id: int, line: bytes, log: str | None) -> None:
        self.runs.add(run_id)

    def replay(self, so_far: Callable[[], Iterable[tuple[int, bytes]]]) -> None:
        for fd, data in so_far():
            self.output(fd, data, b"", None)

    def output(self, fd: int, data: bytes, line: bytes, end: int | None) -> None:
        stream = sys.stdout.buffer if fd == 1 else sys.stderr.buffer
        try:
            stream.write(data)
            stream.flush()
        except (OSError, ValueError):
            pass

    def finish(self, msg: protocol.Message) -> None:
        if isinstance(msg, protocol.Finished):
            self.runs.discard(msg.run_id)
            number = self._line_of(msg)
            if msg.exit_code != 0:
                self.failures += 1
                where = (f"line {number}" if number is not None
                         else f"key {protocol.shown(msg.key)}")
                _say(f"debounce: stdin {where}: {protocol.command_line(msg.argv)} exited with "
                     f"status {msg.exit_code} (run {msg.run_id}, {msg.outcome})")
        elif isinstance(msg, protocol.Cancelled):
            self.failures += 1
            latest = self.fleet_lines.pop(msg.key, None)
            where = f"line {latest[1]}" if latest else f"key {protocol.shown(msg.key)}"
            _say(f"debounce: stdin {where}: cancelled before it ran")


class _Line:
    """The submitter of one line: a refusal after the commit is reported with its number."""

    __slots__ = ("number", "waiter")

    def __init__(self, number: int, waiter: StdinWaiter) -> None:
        self.number = number
        self.waiter = waiter

    def answered(self, msg: protocol.Message) -> None:
        if isinstance(msg, protocol.Error):
            _report(self.number, msg.message)
            self.waiter.failures += 1

    def accepted(self, inv: Invocation, now: float) -> None:
        pass  # a line accepted is said by its run's outcome, not here


#: Bytes read from stdin at a time; the lines of each read go to the loop in one callback.
READ_SIZE = 1 << 16
#: Lines submitted per turn of the loop, at most (see StdinSource).
LINES_PER_TURN = 32
#: The longest line taken, in bytes (its end of line not counted).
MAX_LINE = 1 << 20
TOO_LONG = (f"longer than {MAX_LINE >> 20} MiB, the most a stdin line may hold; pass long "
            "data to the command through a file instead")


class StdinSource:
    """Reads stdin in a thread (pipes, files and terminals alike) and submits each line.

    The thread reads the file descriptor itself (``os.read``), not ``sys.stdin``: a thread
    blocked inside a buffered reader at interpreter shutdown (Ctrl-C, SIGTERM) aborts the
    process. The lines of each read reach the loop together, in one callback, and are
    submitted ``LINES_PER_TURN`` a turn, in their order: a read of hundreds of lines due at
    once has its first runs recorded and spawning while the rest are read (one commit of them
    all kept the spawner idle until the last was parsed: bench's 300 lines came 1.32-1.37x
    the floor, 1.21-1.37x this way, five rounds each in turns).
    """

    def __init__(self, core: Core, defaults: dict[str, Any]) -> None:
        self.core = core
        self.defaults = defaults
        self.waiter = StdinWaiter()
        self.waiter.line_of_run = self._line_of_run
        self.open = True
        self.stopping = False
        self.on_eof: Any = lambda: None
        self.fleet: Any = None  # the fleet (daemon.fleet.coordinator.Fleet), with a store
        self.base = Base(os.getcwd(), dict(os.environ))
        self.base_env = core.shared.env(self.base.env)
        #: Lines handed over and not yet submitted, in order; the end of input waits for them.
        self.queue: deque[tuple[int, bytes | None]] = deque()
        self.draining = False
        self.ended = False

    def start(self, loop: asyncio.AbstractEventLoop, fd: int = 0) -> None:
        def hand_over(callback: Callable[..., None], *args: Any) -> bool:
            """To the loop; False once it has closed (a signal ended the daemon meanwhile)."""
            try:
                loop.call_soon_threadsafe(callback, *args)
            except RuntimeError:
                return False
            return True

        def reader() -> None:
            number = 0
            # The line read so far, in pieces (joined once, at its end: never copied per
            # read), and its length; past MAX_LINE its bytes are dropped as they come.
            parts: list[bytes] = []
            size = 0
            while True:
                try:
                    chunk = os.read(fd, READ_SIZE)
                except InterruptedError:
                    continue
                except OSError:
                    chunk = b""
                if not chunk:
                    break
                *ends, last = chunk.split(b"\n")
                batch: list[tuple[int, bytes | None]] = []
                for piece in ends:
                    number += 1
                    if size + len(piece) > MAX_LINE:
                        batch.append((number, None))
                    else:
                        batch.append((number, b"".join(parts) + piece if parts else piece))
                    parts, size = [], 0
                size += len(last)
                if size <= MAX_LINE:
                    parts.append(last)
                else:
                    parts = []
                if batch and not hand_over(self.lines, batch):
                    return
            if size and not hand_over(self.lines, [
                    (number + 1, b"".join(parts) if size <= MAX_LINE else None)]):
                return
            hand_over(self._eof)

        threading.Thread(target=reader, name="stdin", daemon=True).start()

    def lines(self, batch: list[tuple[int, bytes | None]]) -> None:
        self.queue.extend(batch)
        if not self.draining:
            self._drain()

    def _drain(self) -> None:
        """Submit the next ``LINES_PER_TURN`` lines; the rest in the next turns (each turn's
        commit lets those lines' runs start)."""
        queue = self.queue
        for _ in range(min(LINES_PER_TURN, len(queue))):
            self.line(*queue.popleft())
        self.draining = bool(queue)
        if queue:
            asyncio.get_running_loop().call_soon(self._drain)
        elif self.ended:
            self._eof()

    def line(self, number: int, raw: bytes | None) -> None:
        """Submit one line; ``None`` stands for a line longer than ``MAX_LINE``."""
        if self.stopping:
            return
        if raw is None:
            self._fail(number, TOO_LONG)
            return
        try:
            parsed = parse_stdin_line(raw, self.defaults, self.base)
        except ValueError as exc:
            self._fail(number, str(exc))
            return
        if parsed is None:
            return
        refusal = self.core.refusal()
        if refusal:
            self._fail(number, refusal)
            return
        key, options, job = parsed
        options = self.core.shared.same_options(options)
        env = self.base_env if job.env is self.base.env else job.env
        job = self.core.shared.job(job.argv, job.cwd, env)
        if options.fleet:
            from debounce_cli.daemon.handlers import NO_STORE_STDIN

            if self.fleet is None:
                self._fail(number, NO_STORE_STDIN)
                return
            key, inv_id = self.fleet.submit(key, options, job, self.waiter,
                                            _Line(number, self.waiter))
            self.waiter.submitted_fleet(key, inv_id, number)
            return
        job.line = number
        self.core.submit(key, options, job, self.waiter, _Line(number, self.waiter))

    def _line_of_run(self, run_id: int) -> int | None:
        run = self.core.find_run(run_id)
        return None if run is None else records.job_of(run.invocation).line

    def _fail(self, number: int, why: str) -> None:
        _report(number, why)
        self.waiter.failures += 1

    def _eof(self) -> None:
        self.ended = True
        if self.draining:
            return  # once the lines before it are submitted
        self.open = False
        self.on_eof()


class Base(NamedTuple):
    """What a line does not say: the daemon's own directory and environment, read once."""

    cwd: str
    env: dict[str, str]


def _say(text: str) -> None:
    if "\\udc" in text or not text.isascii():  # such bytes as \xNN, not Python escapes
        text = protocol.readable(text)
    print(text, file=sys.stderr, flush=True)


def _report(number: int, why: str) -> None:
    _say(f"debounce: stdin line {number}: {why}")


def parse_stdin_line(raw: bytes, defaults: dict[str, Any], base: Base | None = None
                     ) -> tuple[str, Options, Job] | None:
    """One line of ``debounce daemon --stdin``: a shell-quoted command line or a JSON object.

    ``defaults`` are the daemon's own options (``key`` is a template); ``base`` the directory
    and environment a line runs with unless it says otherwise. Returns ``None`` for a blank
    line or a ``#`` comment; raises ``ValueError`` with a one-line reason for anything it
    cannot use.
    """
    # Bytes that are not UTF-8 (a Latin-1 file name) are kept as they are, as Python keeps
    # them in file names and arguments.
    text = raw.decode("utf-8", "surrogateescape").strip()
    if not text or text.startswith("#"):
        return None
    settings = dict(defaults)
    template = settings.pop("key", None)
    base = base or Base(os.getcwd(), dict(os.environ))
    cwd = base.cwd
    env = base.env
    if text.startswith("{"):
        try:
            obj = protocol.loads(text)
        except ProtocolError as exc:
            raise ValueError(str(exc).replace("message ", "JSON line ", 1)) from None
        if not isinstance(obj, dict):
            raise ValueError("a JSON line must be an object")
        argv, template, cwd, env = _json_line(obj, settings, template, cwd, env)
    else:
        try:
            argv = split_command_line(text)
        except ValueError as exc:
            raise ValueError(f"cannot split command line: {exc}") from None
    try:
        options = parse_options(expand(settings))
    except ProtocolError as exc:
        raise ValueError(str(exc).removeprefix("run: ")) from None
    try:
        key = keys.compute_key(template, argv, cwd, env, collect=options.collect)
    except keys.KeyTemplateError as exc:
        raise ValueError(str(exc)) from None
    check_key(key)  # a --no-defer invocation's key is no line's to take
    return key, options, Job(argv, cwd, env)


#: The pieces of a shell-quoted command line, as ``shlex.split`` reads them (POSIX rules, no
#: comments): blanks between words, '...', "..." (where a backslash escapes only " and \\),
#: a backslash escaping any one character, plain characters, and a quote or backslash that
#: nothing closes or follows.
_PIECE = re.compile(r"""
    (?P<blank>[ \t\r\n]+)
  | '(?P<single>[^']*)'
  | "(?P<double>[^"\\]*(?:\\[\s\S][^"\\]*)*)"
  | \\(?P<escaped>[\s\S])
  | (?P<plain>[^ \t\r\n'"\\]+)
  | (?P<bad>[\s\S])
""", re.VERBOSE)
_ESCAPED_IN_DOUBLE = re.compile(r'\\([\\"])')


def split_command_line(text: str) -> list[str]:
    """``shlex.split(text)``, in time linear in the line's length.

    shlex builds each word a character at a time by string concatenation: one quoted word of
    a megabyte took 20 seconds, and a stdin line is parsed on the event loop. Raises
    ValueError with shlex's words for an unclosed quote or a trailing backslash.
    """
    words: list[str] = []
    word: list[str] = []
    quoted = False  # the word so far has a quoted part: '' is a word of its own
    for match in _PIECE.finditer(text):
        kind = match.lastgroup
        if kind == "blank":
            if word or quoted:
                words.append("".join(word))
            word, quoted = [], False
        elif kind == "single":
            word.append(match.group("single"))
            quoted = True
        elif kind == "double":
            word.append(_ESCAPED_IN_DOUBLE.sub(r"\1", match.group("double")))
            quoted = True
        elif kind == "escaped":
            word.append(match.group("escaped"))
        elif kind == "plain":
            word.append(match.group("plain"))
        else:
            raise ValueError("No escaped character" if match.group("bad") == "\\"
                             else "No closing quotation")
    if word or quoted:
        words.append("".join(word))
    return words


def _json_line(obj: dict[str, Any], settings: dict[str, Any], template: str | None, cwd: str,
               env: dict[str, str]) -> tuple[list[str], str | None, str, dict[str, str]]:
    """The fields of a JSON line: argv, key template, cwd and environment (a new dict when
    the line adds to it); its options go into ``settings``."""
    unknown = sorted(set(obj) - _FIELDS)
    if unknown:
        known = ", ".join(sorted(_FIELDS))
        raise ValueError(f"unknown field {unknown[0]!r}; known fields: {known}")
    obj = protocol.from_b64(obj)  # "argv_b64": the exact bytes, as --json writes them
    argv = obj.get("argv")
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
        raise ValueError('"argv" must be a non-empty list of strings')
    if "key" in obj:
        if not isinstance(obj["key"], str):
            raise ValueError('"key" must be a string (a template like --key)')
        template = obj["key"]
    if "cwd" in obj:
        if not isinstance(obj["cwd"], str):
            raise ValueError('"cwd" must be a string')
        cwd = os.path.abspath(obj["cwd"])
    if "env" in obj:
        extra = obj["env"]
        if not isinstance(extra, dict) or not all(isinstance(v, str) for v in extra.values()):
            raise ValueError('"env" must be an object of string values')
        env = {**env, **extra}
    for name, value in obj.items():
        if name not in _OPTION_FIELDS:
            continue
        field, negated = _OPTION_FIELDS[name]
        if BY_NAME[field].kind == DURATION and isinstance(value, str):
            try:
                value = parse_duration(value)
            except DurationError as exc:
                raise ValueError(f'"{name}": {exc}') from None
        if negated:
            if not isinstance(value, bool):
                raise ValueError(f'"{name}" must be true or false')
            value = not value
        settings[field] = value
    return argv, template, cwd, env
