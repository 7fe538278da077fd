"""The entry point, and the fast path of ``debounce run``: no click on the way.

Every event of a watched tree or a git hook calls ``debounce run``; importing click costs
about as much as starting Python. So ``run`` is parsed here, straight from the option table
(``options.RUN_OPTIONS``), the same table the click command is made from. Anything this
parser does not plainly understand (help, an unknown option, a bad value, a usage error, any
other subcommand, completion) goes to click, so messages and help stay click's; a test
generates command lines and checks that both give the same request or both refuse it.
"""

from __future__ import annotations

import os
import sys

from debounce_cli import options as table

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, NoReturn


class RunArgs:
    """What a ``debounce run`` command line says."""

    _COMPARED = ("as_json", "command", "key_template", "no_wait", "options", "quiet",
                 "socket_path")
    __slots__ = (*_COMPARED, "given")

    def __init__(self, command: list[str], key_template: str | None, options: dict[str, Any],
                 no_wait: bool, quiet: bool, as_json: bool, socket_path: str | None,
                 given: dict[str, Any] | None = None) -> None:
        self.command = command
        self.key_template = key_template
        self.options = options  # a RunRequest's options object
        self.no_wait = no_wait
        self.quiet = quiet
        self.as_json = as_json
        self.socket_path = socket_path
        #: What the command line and the environment said, by field; the config files'
        #: per-key sections apply under it once the key is known.
        self.given = given

    def _fields(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self._COMPARED)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RunArgs) and self._fields() == other._fields()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return "RunArgs(" + ", ".join(f"{n}={getattr(self, n)!r}" for n in self._COMPARED) + ")"


#: The run command's own flags that take no value, by flag, with their RunArgs field.
_SWITCHES = {"--no-wait": "no_wait", "-q": "quiet", "--quiet": "quiet", "--json": "as_json"}
#: Its own options that take a value.
_VALUED = {"--key": "key_template", "--socket": "socket_path"}
_BY_FLAG = {option.flag: option for option in table.RUN_OPTIONS}
#: The flags that say the other thing (--no-leading, --defer): a flag's value False.
_OPPOSITE = {option.opposite: option for option in table.RUN_OPTIONS if option.opposite}
_BY_FLAG.update(_OPPOSITE)


def parse_run(args: list[str]) -> RunArgs | None:
    """``args`` after ``run``, as click would read them; ``None`` for anything else (help, a
    mistake, an unknown option), which click then reads and answers."""
    values: dict[str, Any] = {}
    own: dict[str, Any] = {"no_wait": False, "quiet": False, "as_json": False,
                           "key_template": None, "socket_path": None}
    command: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            command = args[i + 1:]
            break
        if not arg.startswith("-") or arg == "-":
            command = args[i:]  # options stop at COMMAND
            break
        name, eq, inline = arg.partition("=") if arg.startswith("--") else (arg, "", "")
        option = _BY_FLAG.get(name)
        if name in _SWITCHES or (option is not None and option.kind == table.FLAG):
            if eq:
                return None  # a flag given a value: click says what is wrong
            if option is not None:
                values[option.name] = name not in _OPPOSITE
            else:
                own[_SWITCHES[name]] = True
            i += 1
            continue
        if option is None and name not in _VALUED:
            return None
        if eq:
            value = inline
        elif i + 1 < len(args):
            i += 1
            value = args[i]
        else:
            return None  # a missing value
        if option is None:
            own[_VALUED[name]] = value
        else:
            converted = _convert(option, value)
            if converted is None:
                return None
            values[option.name] = converted
        i += 1
    if not command:
        return None
    given = _given(values)
    if given is None:
        return None
    from debounce_cli import settings as config_files

    try:
        files = config_files.load()
    except config_files.ConfigError:
        return None  # click says it, exit 2
    settings = files.run_options(given)
    if table.usage_problems(settings):
        return None
    return RunArgs(command, own["key_template"], settings, own["no_wait"], own["quiet"],
                   own["as_json"], own["socket_path"], given)


def _convert(option: table.RunOption, value: str) -> Any:
    """A value as click's type would make it, or ``None`` when click would refuse it."""
    if option.kind == table.DURATION:
        from debounce_cli.durations import DurationError, parse_duration

        try:
            return parse_duration(value)
        except DurationError:
            return None
    if option.kind == table.CHOICE:
        return value if value in option.choices else None
    return value


def _given(values: dict[str, Any]) -> dict[str, Any] | None:
    """What the command line and the environment say, by field (shorthands expanded); the
    config files and the defaults fill in the rest (``settings.Settings.run_options``)."""
    out: dict[str, Any] = {}
    for option in table.RUN_OPTIONS:
        if option.name in values:
            value = values[option.name]
        elif option.envvar and os.environ.get(option.envvar):
            value = _convert(option, os.environ[option.envvar])
            if value is None:
                return None
        else:
            continue
        out[option.name] = (not value) if option.negated else value
    return table.expand(out)


def run_fast(parsed: RunArgs) -> int:
    """Submit and follow, as the click command would; return the exit status."""
    from debounce_cli.conversation import converse, run_request
    from debounce_cli.paths import socket_path

    request = run_request(parsed.command, parsed.key_template, parsed.options, parsed.no_wait,
                          parsed.given)
    return converse(socket_path(parsed.socket_path), request, request.key, parsed.quiet,
                    parsed.as_json, parsed.no_wait)


def main() -> NoReturn:
    """``debounce``: the fast path for a plain ``debounce run``, click for everything else."""
    args = sys.argv[1:]
    if args[:1] == ["run"]:
        parsed = parse_run(args[1:])
        if parsed is not None:
            sys.exit(_fast(parsed))
    from debounce_cli.cli import main as click_main

    click_main(args)


def _fast(parsed: RunArgs) -> int:
    from debounce_cli.conversation import Failure, UsageProblem, finish_output, say
    from debounce_cli.exits import ExitStatus
    from debounce_cli.paths import PathError

    try:
        return finish_output(run_fast(parsed))
    except (UsageProblem, PathError):
        # click says it its way (the same words, with "see --help")
        from debounce_cli.cli import main as click_main

        click_main(sys.argv[1:])
    except Failure as exc:
        say(f"debounce: {exc}")
        return exc.status
    except KeyboardInterrupt:
        return ExitStatus.INTERRUPTED
