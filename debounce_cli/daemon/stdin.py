"""``debounce daemon --stdin``: invocations read from standard input, one per line.

A line is a shell-quoted command line or a JSON object whose fields are those of the option
table (``options.RUN_OPTIONS``) plus ``argv``, ``key``, ``cwd`` and ``env``. The runs' output
goes to the daemon's own stdout and stderr; failures are counted for the exit status.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
import threading
from collections.abc import Callable, Iterable
from typing import Any

from debounce_cli import keys, protocol
from debounce_cli.daemon.core import Core
from debounce_cli.daemon.jobs import Job, parse_options
from debounce_cli.durations import DurationError, parse_duration
from debounce_cli.options import BY_NAME, DURATION, RUN_OPTIONS, expand
from debounce_cli.protocol import ProtocolError
from debounce_cli.scheduler import Options

#: JSON field -> (option field, negated). Negated flags are accepted by their flag's name too
#: ("no_defer": true is "defer": false).
_OPTION_FIELDS: dict[str, tuple[str, bool]] = {}
for _option in RUN_OPTIONS:
    _OPTION_FIELDS[_option.name] = (_option.name, False)
    if _option.negated:
        _OPTION_FIELDS[_option.param] = (_option.name, True)
_FIELDS = {"argv", "key", "cwd", "env"} | set(_OPTION_FIELDS)


class StdinWaiter:
    """Waits for the runs of stdin's invocations: their output goes to our stdout/stderr."""

    def __init__(self) -> None:
        self.failures = 0
        self.runs: set[int] = set()  # runs whose output goes to stdout/stderr now

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
            if msg.exit_code != 0:
                self.failures += 1
        elif isinstance(msg, protocol.Cancelled):
            self.failures += 1


class _Line:
    """The submitter of one line: a refusal after the commit is reported with its number."""

    def __init__(self, number: int, waiter: StdinWaiter) -> None:
        self.number = number
        self.waiter = waiter

    def answered(self, msg: protocol.Message) -> None:
        if isinstance(msg, protocol.Error):
            _report(self.number, msg.message)
            self.waiter.failures += 1


class StdinSource:
    """Reads stdin in a thread (pipes, files and terminals alike) and submits each line."""

    def __init__(self, core: Core, defaults: dict[str, Any]) -> None:
        self.core = core
        self.defaults = defaults
        self.waiter = StdinWaiter()
        self.open = True
        self.stopping = False
        self.on_eof: Any = lambda: None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        stream = sys.stdin.buffer

        def reader() -> None:
            number = 0
            try:
                for raw in stream:
                    number += 1
                    loop.call_soon_threadsafe(self.line, number, raw)
            except (OSError, ValueError):
                pass
            loop.call_soon_threadsafe(self._eof)

        threading.Thread(target=reader, name="stdin", daemon=True).start()

    def line(self, number: int, raw: bytes) -> None:
        if self.stopping:
            return
        try:
            parsed = parse_stdin_line(raw, self.defaults)
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
        job = self.core.shared.job(job.argv, job.cwd, job.env)
        self.core.submit(key, options, job, self.waiter, _Line(number, self.waiter))

    def _fail(self, number: int, why: str) -> None:
        _report(number, why)
        self.waiter.failures += 1

    def _eof(self) -> None:
        self.open = False
        self.on_eof()


def _report(number: int, why: str) -> None:
    print(f"debounce: stdin line {number}: {why}", file=sys.stderr, flush=True)


def parse_stdin_line(raw: bytes, defaults: dict[str, Any]) -> tuple[str, Options, Job] | None:
    """One line of ``debounce daemon --stdin``: a shell-quoted command line or a JSON object.

    ``defaults`` are the daemon's own options (``key`` is a template). Returns ``None`` for a
    blank line; raises ``ValueError`` with a one-line reason for anything it cannot use.
    """
    # Bytes that are not UTF-8 (a Latin-1 file name) are kept as they are, as Python keeps
    # them in file names and arguments.
    text = raw.decode("utf-8", "surrogateescape").strip()
    if not text:
        return None
    settings = dict(defaults)
    template = settings.pop("key", None)
    cwd = os.getcwd()
    env = dict(os.environ)
    if text.startswith("{"):
        try:
            obj = protocol.loads(text)
        except ProtocolError as exc:
            raise ValueError(str(exc).replace("message ", "JSON line ", 1)) from None
        if not isinstance(obj, dict):
            raise ValueError("a JSON line must be an object")
        argv, template, cwd = _json_line(obj, settings, template, cwd, env)
    else:
        try:
            argv = shlex.split(text)
        except ValueError as exc:
            raise ValueError(f"cannot split command line: {exc}") from None
    try:
        options = parse_options(expand(settings))
    except ProtocolError as exc:
        raise ValueError(str(exc).removeprefix("run: ")) from None
    try:
        key = keys.compute_key(template, argv, cwd, env)
    except keys.KeyTemplateError as exc:
        raise ValueError(str(exc)) from None
    return key, options, Job(argv, cwd, env)


def _json_line(obj: dict[str, Any], settings: dict[str, Any], template: str | None, cwd: str,
               env: dict[str, str]) -> tuple[list[str], str | None, str]:
    """The fields of a JSON line: argv, key template and cwd; options into ``settings``."""
    unknown = sorted(set(obj) - _FIELDS)
    if unknown:
        known = ", ".join(sorted(_FIELDS))
        raise ValueError(f"unknown field {unknown[0]!r}; known fields: {known}")
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
        env.update(extra)
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
    return argv, template, cwd
