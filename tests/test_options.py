"""The option table is the one source of truth: --help, the scheduler, the protocol and stdin
lines all say the same thing about every option and its default."""

from __future__ import annotations

import dataclasses
import json
import re

import click
import pytest

from debounce_cli import options, protocol
from debounce_cli.cli import cli
from debounce_cli.daemon.config import Config
from debounce_cli.daemon.stdin import parse_stdin_line
from debounce_cli.durations import parse_duration
from debounce_cli.scheduler import Options


def _shown_defaults(command: click.Command) -> dict[str, str]:
    """What ``--help`` shows as ``[default: X]`` for each option, by click parameter name."""
    ctx = click.Context(command, info_name=command.name)
    shown = {}
    for param in command.params:
        record = param.get_help_record(ctx)
        if record is None or param.name is None:
            continue
        match = re.search(r"default: ([^;\]]+)", record[1])
        if match:
            shown[param.name] = match.group(1).strip()
    return shown


def _as_value(option_kind: str, text: str) -> object:
    if text == "no limit":
        return None
    if option_kind == options.DURATION:
        return parse_duration(text)
    if option_kind == options.COUNT:
        return int(text)
    return text


@pytest.mark.parametrize("name", ["run", "daemon", "watch"])
def test_every_default_in_help_is_the_schedulers(name):
    shown = _shown_defaults(cli.commands[name])
    scheduler = Options()
    for option in options.FIELDS:
        if option.param in shown:
            assert _as_value(option.kind, shown[option.param]) == getattr(scheduler, option.name)
        else:  # a flag, or an option without a default ("no limit")
            assert option.kind == options.FLAG or option.default is None
            assert getattr(scheduler, option.name) == option.default


def test_daemon_help_defaults_are_the_configs():
    shown = _shown_defaults(cli.commands["daemon"])
    config = Config(socket="/x")
    for option in options.DAEMON_OPTIONS:
        value = getattr(config, option.name)
        if option.name in shown and option.kind != options.FLAG:
            assert _as_value(option.kind, shown[option.name]) == value, option.name
        else:
            assert value == option.default


def test_the_table_names_every_field_of_the_schedulers_options():
    fields = {f.name for f in dataclasses.fields(Options)}
    assert {o.name for o in options.FIELDS} == fields
    assert set(protocol.OPTION_FIELDS) == fields
    assert {o.name for o in options.RUN_OPTIONS if o.shorthand} == {"throttle"}


@pytest.mark.parametrize("name", ["run", "daemon", "watch"])
def test_every_option_of_the_table_is_on_the_command_line(name):
    flags = {opt for param in cli.commands[name].params for opt in param.opts}
    assert {o.flag for o in options.RUN_OPTIONS} <= flags


def test_stdin_lines_take_every_option_by_field_and_negated_flag_name():
    values = {"delay": "250ms", "max_wait": 3, "leading": True, "trailing": False,
              "on_busy": "restart", "stop_timeout": "2s", "timeout": 9, "defer": False}
    line = json.dumps({"argv": ["true"], **values}).encode()
    parsed = parse_stdin_line(line, {})
    assert parsed is not None
    _key, got, _job = parsed
    assert got == Options(delay=0.25, max_wait=3, leading=True, trailing=False,
                          on_busy="restart", stop_timeout=2.0, timeout=9, defer=False)
    negated = json.dumps({"argv": ["true"], "leading": True, "no_trailing": True,
                          "no_defer": True}).encode()
    parsed = parse_stdin_line(negated, {})
    assert parsed is not None
    assert parsed[1].trailing is False and parsed[1].defer is False


def test_throttle_is_shorthand_for_leading_delay_and_max_wait():
    parsed = parse_stdin_line(b'{"argv": ["true"], "throttle": "2s"}', {})
    assert parsed is not None
    assert parsed[1] == Options(leading=True, delay=2.0, max_wait=2.0)


def test_usage_rules_are_the_same_for_the_client_and_the_daemon():
    bad = {"trailing": False}
    assert options.usage_problems(bad) == Options(trailing=False).problems()
    with pytest.raises(ValueError, match="--no-trailing without --leading"):
        parse_stdin_line(b'{"argv": ["true"], "trailing": false}', {})
