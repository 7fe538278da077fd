"""What an invocation carries (a :class:`Job`), and how request fields become one.

Validation happens here, at the edge, for the socket and stdin alike; so does sharing: one
copy of each distinct environment, command line and option set.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from debounce_cli import protocol, states
from debounce_cli.scheduler import Options


@dataclass(eq=False, slots=True)
class Job:
    """The scheduler's opaque payload of an invocation: everything needed to run it."""

    argv: list[str]
    cwd: str
    env: dict[str, str]
    pid: int | None = None
    log_path: str | None = None
    line: int | None = None  # the stdin line it came from (debounce daemon --stdin)


class Audience(Protocol):
    """Who hears of a run while it executes: a local run's waiters, a fleet run's key stream."""

    def started(self, log: str | None) -> None:
        """Its process is about to be spawned; ``log`` is its output log, if it has one."""

    def output(self, fd: int, data: bytes, end: int | None) -> None:
        """A chunk of its output (``end``: where its record ends in the log, if any)."""


@dataclass(eq=False, slots=True)
class RunSpec:
    """What ``daemon.runs`` needs to execute one run, local or fleet, and all it knows of it.

    The core builds one from a scheduler run, the fleet from a key's stored run; neither
    builds the other's objects. ``Runs`` notes the pid and the log path on ``job``, and with
    ``--collect`` sets its argv to the batch's first command line (what history shows).
    """

    id: int
    key: str
    job: Job
    options: Options  # --timeout, --stop-timeout and --collect are Runs' to carry out
    audience: Audience
    coalesced: int = 1
    batch: Sequence[Job] = ()  # --collect: the job of every invocation it stands for
    #: Asked immediately before its process is created (a fleet run's fence: its claim must
    #: still hold); False means it never starts.
    may_start: Callable[[], bool] | None = None


def parse_options(raw: dict[str, Any]) -> Options:
    """A request's ``options`` object as scheduler Options; ValueError says what is wrong."""
    protocol.check_options(raw)
    options = Options(**raw)
    problems = options.problems()
    if problems:
        raise ValueError(problems[0])
    return options


def check_job(argv: list[str], cwd: str, key: str) -> None:
    """Refuse what could never run: no command, a relative cwd, an empty key; and a key
    that could be a --no-defer invocation's (:func:`check_key`)."""
    if not argv:
        raise ValueError("run: argv must name a command")
    if not os.path.isabs(cwd):
        raise ValueError(f"run: cwd must be an absolute path, not {cwd!r}")
    if not key:
        raise ValueError("run: key must not be empty")
    try:
        check_key(key)
    except ValueError as exc:
        raise ValueError(f"run: {exc}") from None


def check_key(key: str) -> None:
    """Refuse a key holding U+FFFF, which marks the keys of --no-defer invocations: no key
    submitted may ever be one (states.PRIVATE_MARK)."""
    if states.PRIVATE_MARK in key:
        raise ValueError(f"key {protocol.shown(key)} holds U+FFFF, which debounce keeps "
                         "for the keys of --no-defer invocations; choose a --key without it")


class Shared:
    """One copy of each distinct environment, command line and option set.

    Invocations from one shell session carry the same environment (a few kilobytes) and the
    same options; sharing them keeps a pending invocation to a few hundred bytes. The tables
    are bounded: once full they are cleared, which only ends the sharing for later arrivals.
    """

    LIMIT = 4096

    def __init__(self) -> None:
        self.envs: dict[frozenset[tuple[str, str]], dict[str, str]] = {}
        self.option_sets: dict[tuple[tuple[str, type, Any], ...], Options] = {}
        self.argvs: dict[tuple[str, ...], list[str]] = {}
        self.parsed_options: dict[Options, Options] = {}
        #: The shared copy of the last few environment objects seen, by identity: the
        #: daemon's decoder hands the same object over for the same text
        #: (``protocol.RequestDecoder``), and hashing an environment costs as much as
        #: reading it. Each entry holds its object, so that its id is not reused meanwhile.
        self.recent_envs: dict[int, tuple[dict[str, str], dict[str, str]]] = {}

    #: Environment objects remembered by identity (a few: the decoder keeps a few).
    RECENT = 16

    def env(self, env: dict[str, str]) -> dict[str, str]:
        recent = self.recent_envs.get(id(env))
        if recent is not None and recent[0] is env:
            return recent[1]
        shared = self._env(env)
        if len(self.recent_envs) >= self.RECENT:
            self.recent_envs.clear()
        self.recent_envs[id(env)] = (env, shared)
        return shared

    def _env(self, env: dict[str, str]) -> dict[str, str]:
        key = frozenset(env.items())
        found = self.envs.get(key)
        if found is None:
            if len(self.envs) >= self.LIMIT:
                self.envs.clear()
            found = self.envs[key] = env
        return found

    def argv(self, argv: list[str]) -> list[str]:
        """The same command line from many keys (a template key) is kept once."""
        key = tuple(argv)
        found = self.argvs.get(key)
        if found is None:
            if len(self.argvs) >= self.LIMIT:
                self.argvs.clear()
            found = self.argvs[key] = argv
        return found

    def options(self, raw: dict[str, Any]) -> Options:
        try:
            # The type is part of the key: True == 1, but only 1 is a valid delay.
            key = tuple(sorted((name, type(value), value) for name, value in raw.items()))
            found = self.option_sets.get(key)
        except TypeError:  # unhashable values: let validation say what is wrong
            return parse_options(raw)
        if found is None:
            found = parse_options(raw)
            if len(self.option_sets) >= self.LIMIT:
                self.option_sets.clear()
            self.option_sets[key] = found
        return found

    def same_options(self, options: Options) -> Options:
        """One copy of equal option sets that were parsed apart (stdin lines)."""
        found = self.parsed_options.get(options)
        if found is None:
            if len(self.parsed_options) >= self.LIMIT:
                self.parsed_options.clear()
            found = self.parsed_options[options] = options
        return found

    def job(self, argv: list[str], cwd: str, env: dict[str, str]) -> Job:
        return Job(self.argv(argv), sys.intern(cwd), self.env(env))
