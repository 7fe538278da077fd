"""The fast path of `debounce run` reads a command line exactly as click does, or leaves it to
click: generated command lines give the same request both ways, or a usage error from click."""

from __future__ import annotations

import click
from hypothesis import given, settings
from hypothesis import strategies as st

from debounce_cli.cli import _options, cli
from debounce_cli.fast import RunArgs, parse_run

_TOKENS = st.sampled_from([
    "--delay", "--delay=250ms", "2s", "0", "banana", "-1", "1m30s", "--max-wait", "--leading",
    "--no-trailing", "--throttle", "--on-busy", "queue", "restart", "ignore", "signal", "nope",
    "--signal", "HUP", "USR1", "KILL", "--collect", "--stop-timeout", "--timeout", "--no-defer",
    "--key", "{1}", "fixed", "{bogus}", "--no-wait", "-q", "--quiet", "--json", "--json=1",
    "--socket", "/tmp/s.sock", "--", "make", "-j4", "true", "--unknown", "-x", "-", "",
])


def _click_reads(args: list[str]) -> RunArgs | None:
    """What the click command makes of ``run ARGS``, or None when it refuses them."""
    command = cli.commands["run"]
    try:
        ctx = command.make_context("run", list(args), parent=click.Context(cli))
    except click.ClickException:
        return None
    params = dict(ctx.params)
    if not params["command"]:
        return None
    own = {name: params.pop(name) for name in ("command", "key_template", "no_wait", "quiet",
                                               "as_json", "socket_path")}
    try:
        settings = _options(**params)
    except click.UsageError:
        return None
    return RunArgs(list(own["command"]), own["key_template"], settings, own["no_wait"],
                   own["quiet"], own["as_json"], own["socket_path"])


@settings(max_examples=3000, deadline=None)
@given(st.lists(_TOKENS, max_size=8))
def test_the_fast_parser_and_click_agree(args):
    fast = parse_run(args)
    if fast is None:
        return  # left to click, which answers (help, or its own usage error)
    assert fast == _click_reads(args), args


@settings(max_examples=300, deadline=None)
@given(st.lists(_TOKENS, max_size=6), st.sampled_from(["", "2s", "banana", "0"]))
def test_the_delay_from_the_environment_is_read_as_click_reads_it(args, value):
    import os

    old = os.environ.get("DEBOUNCE_DELAY")
    os.environ["DEBOUNCE_DELAY"] = value
    try:
        fast = parse_run(args)
        if fast is not None:
            assert fast == _click_reads(args), (args, value)
    finally:
        if old is None:
            os.environ.pop("DEBOUNCE_DELAY", None)
        else:
            os.environ["DEBOUNCE_DELAY"] = old


def test_plain_command_lines_take_the_fast_path():
    parsed = parse_run(["--delay", "2s", "--key", "k", "--no-wait", "--", "make", "-j4"])
    assert parsed is not None and parsed.command == ["make", "-j4"]
    assert parsed.options["delay"] == 2.0 and parsed.key_template == "k" and parsed.no_wait
    assert parse_run(["--help"]) is None and parse_run([]) is None
