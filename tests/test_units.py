"""Durations, key templates and the protocol decoder: the pieces the client runs first."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from debounce_cli import protocol
from debounce_cli.durations import DurationError, format_duration, parse_duration
from debounce_cli.keys import KeyTemplateError, compute_key, default_key, render_key


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("250ms", 0.25), ("2s", 2), ("1.5s", 1.5), ("1m30s", 90), ("2h", 7200), ("0.5", 0.5),
     ("0", 0), ("1h2m3s", 3723), (" 3S ", 3), ("1d", 86400)],
)
def test_durations_the_spec_lists_parse(text, seconds):
    """Every form the SPEC promises is accepted."""
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "x", "1x", "-1", "1 s", "30s1m", "1m1m", "nan", "inf", "1e3"])
def test_bad_durations_are_refused_with_an_example(text):
    """A typo gets one message that shows what to write."""
    with pytest.raises(DurationError, match="duration"):
        parse_duration(text)


@given(st.floats(min_value=0, max_value=86400 * 3))
def test_formatted_durations_parse_back_closely(seconds):
    """What status shows can be pasted back into --delay."""
    assert parse_duration(format_duration(seconds)) == pytest.approx(seconds, abs=0.51)


def test_seed_key_template():
    """The seed's defer=lambda u, d, _: f"#{u}:#{d}" is --key '#{1}:#{2}'."""
    assert render_key("#{1}:#{2}", ["notify", "42", "7", "update-1"], "/", {}) == "#42:#7"
    assert render_key("#{1}:#{2}", ["notify", "42", "7", "update-2"], "/", {}) == "#42:#7"


def test_template_fields():
    """{0}, {args}, {cwd}, {env[NAME]} and doubled braces render as documented."""
    out = render_key("{0}|{args}|{cwd}|{env[HOME]}|{{x}}", ["make", "a b", "c"], "/src",
                     {"HOME": "/h"})
    assert out == "make|'a b' c|/src|/h|{x}"


def test_plain_string_is_a_fixed_key():
    assert compute_key("deploy", ["a"], "/", {}) == compute_key("deploy", ["b"], "/x", {})


def test_default_key_is_the_whole_invocation():
    """Only identical commands in the same directory share the default key."""
    assert default_key(["make", "a"], "/x") == default_key(["make", "a"], "/x")
    assert default_key(["make", "a"], "/x") != default_key(["make", "b"], "/x")
    assert default_key(["make", "a"], "/x") != default_key(["make", "a"], "/y")
    assert compute_key(None, ["make", "a"], "/x", {}) == default_key(["make", "a"], "/x")


@pytest.mark.parametrize(
    ("template", "named"),
    [("{0.__class__}", "{0.__class__}"), ("{env.__dict__}", "{env.__dict__}"),
     ("{args[0]}", "{args[0]}"), ("{cwd.upper}", "{cwd.upper}"), ("{1!r}", "{1!r}"),
     ("{1:>9}", "{1:>9}"), ("{nope}", "{nope}"), ("{}", "{}"), ("{env[A][B]}", "{env[A][B]}"),
     ("{5}", "{5}"), ("{env[MISSING]}", "{env[MISSING]}"), ("{", "'{'"), ("}", "'}'")],
)
def test_bad_templates_are_refused_naming_the_field(template, named):
    """Attribute or index tricks, unknown names and missing arguments never render."""
    with pytest.raises(KeyTemplateError) as err:
        render_key(template, ["cmd", "a"], "/", {"A": "x"})
    assert named in str(err.value)


@given(st.text(max_size=40))
def test_any_template_renders_or_is_refused_cleanly(template):
    """No template can raise anything but a KeyTemplateError."""
    try:
        out = render_key(template, ["cmd", "a", "b"], "/w", {"HOME": "/h"})
    except KeyTemplateError:
        return
    assert isinstance(out, str)


def _line(obj) -> bytes:
    return json.dumps(obj).encode() + b"\n"


def test_protocol_round_trip():
    msg = protocol.RunRequest(argv=["make"], cwd="/x", env={"A": "1"}, key="k",
                              options={"delay": 1.0}, wait=True)
    assert protocol.decode(protocol.encode(msg), protocol.REQUESTS) == msg


@pytest.mark.parametrize(
    ("raw", "reason"),
    [(b"\xff\xfe\n", "UTF-8"), (b"{nope\n", "JSON"), (b"[1]\n", "object"),
     (_line({"type": "bogus"}), "unknown message type"),
     (_line({"type": "run", "argv": "make"}), "'argv' must be a list of strings"),
     (_line({"type": "run", "wait": 1}), "'wait' must be true or false"),
     (_line({"type": "run", "extra": 1}), "unknown field 'extra'"),
     (_line({"type": "hello", "version": True}), "'version' must be an integer"),
     (b"x" * (protocol.MAX_MESSAGE + 1), "exceeds the limit")],
)
def test_protocol_refuses_malformed_messages_clearly(raw, reason):
    with pytest.raises(protocol.ProtocolError, match=reason):
        protocol.decode(raw, protocol.REQUESTS)


@settings(max_examples=2000, deadline=None)
@given(st.one_of(
    st.binary(max_size=200),
    st.dictionaries(
        st.sampled_from(["type", "argv", "cwd", "env", "key", "options", "wait", "version",
                         "target", "x"]),
        st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=5),
                  st.lists(st.text(max_size=3), max_size=3),
                  st.sampled_from(["run", "hello", "wait", "status", "stop"])),
    ).map(_line),
))
def test_protocol_decoder_never_raises_anything_else(raw):
    """Fuzzed bytes and objects decode or raise ProtocolError, nothing else."""
    try:
        msg = protocol.decode(raw, protocol.REQUESTS)
    except protocol.ProtocolError:
        return
    assert isinstance(msg, protocol.Message)


def test_option_objects_are_checked():
    with pytest.raises(protocol.ProtocolError, match="unknown option 'delai'"):
        protocol.check_options({"delai": 1})
    with pytest.raises(protocol.ProtocolError, match="'delay' must be a number"):
        protocol.check_options({"delay": "1s"})
    with pytest.raises(protocol.ProtocolError, match="between 0 and"):
        protocol.check_options({"delay": -1})


_STDIN_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=True),
    st.text(max_size=6), st.lists(st.text(max_size=4), max_size=3),
    st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=2),
    st.sampled_from(["250ms", "1x", "queue", "restart", "{1}", "{0.__class__}", "/tmp"]),
)


@settings(max_examples=2000, deadline=None)
@given(st.one_of(
    st.binary(max_size=80),
    st.text(max_size=80).map(str.encode),
    st.dictionaries(
        st.sampled_from(["argv", "key", "delay", "cwd", "env", "max_wait", "leading",
                         "trailing", "on_busy", "stop_timeout", "timeout", "defer",
                         "no_defer", "bogus"]),
        _STDIN_VALUES,
    ).map(lambda obj: json.dumps(obj).encode()),
))
def test_stdin_line_parser_never_raises_anything_else(raw):
    """Any stdin line is an invocation, a blank, or a ValueError with a one-line reason."""
    from debounce_cli.daemon.stdin import parse_stdin_line

    try:
        parsed = parse_stdin_line(raw, {"delay": 1.0})
    except ValueError as exc:
        assert "\n" not in str(exc) and str(exc)
        return
    if parsed is not None:
        key, options, job = parsed
        assert isinstance(key, str) and job.argv and options.problems() == []


# Strings as they reach the daemon: any text, bytes that are not UTF-8 (as Python carries them
# in file names and arguments: U+DC80..U+DCFF) and lone surrogates that stand for no byte.
_HOSTILE_TEXT = st.one_of(
    st.text(max_size=6),
    st.binary(max_size=6).map(lambda b: b.decode("utf-8", "surrogateescape")),
    st.text(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1, max_size=2),
)


def _escaped_line(obj: dict) -> bytes:
    return (json.dumps(obj) + "\n").encode()  # ensure_ascii: surrogates travel as \\udXXX


@settings(max_examples=1000, deadline=None)
@given(st.one_of(
    st.fixed_dictionaries({
        "type": st.just("run"), "argv": st.lists(_HOSTILE_TEXT, min_size=1, max_size=3),
        "cwd": _HOSTILE_TEXT.map(lambda t: "/" + t), "key": _HOSTILE_TEXT,
        "env": st.dictionaries(_HOSTILE_TEXT, _HOSTILE_TEXT, max_size=3),
    }).map(_escaped_line),
    st.integers(4301, 6000).map(lambda n: b'{"type":"history","limit":' + b"9" * n + b"}\n"),
    st.integers(4301, 6000).map(lambda n: b'{"type":"run","options":{"delay":1'
                                + b"0" * n + b"}}\n"),
))
def test_every_string_the_decoder_lets_through_stands_for_bytes(raw):
    """Lone surrogates and numbers of thousands of digits are refused at the edge."""
    try:
        msg = protocol.decode(raw, protocol.REQUESTS)
    except protocol.ProtocolError as exc:
        assert "\n" not in str(exc)
        return
    assert isinstance(msg, protocol.RunRequest)
    for text in [*msg.argv, msg.cwd, msg.key, *msg.env, *msg.env.values()]:
        text.encode("utf-8", "surrogateescape")  # a name the system can take


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=_HOSTILE_TEXT.filter(bool), argv=st.lists(_HOSTILE_TEXT, min_size=1, max_size=3),
       cwd=_HOSTILE_TEXT, env=st.dictionaries(_HOSTILE_TEXT, _HOSTILE_TEXT, max_size=3))
def test_the_journal_restores_what_it_stored_byte_for_byte(tmp_path, key, argv, cwd, env):
    """Whatever the edge lets through is stored and restored faithfully (or refused there)."""
    from debounce_cli.daemon.jobs import Job
    from debounce_cli.journal import Journal
    from debounce_cli.scheduler import Options, Scheduler

    line = _escaped_line({"type": "run", "argv": argv, "cwd": "/" + cwd, "key": key,
                          "env": env})
    try:
        msg = protocol.decode(line, protocol.REQUESTS)
    except protocol.ProtocolError:
        return  # refused at the edge
    assert isinstance(msg, protocol.RunRequest)
    import tempfile

    state = tempfile.mkdtemp(dir=tmp_path)  # one per example: tmp_path is shared by them
    journal = Journal(state, "/tmp/sock")
    journal.open()
    sched = Scheduler(lambda: 0.0, observer=journal.observe)
    sched.submit(msg.key, Options(delay=5.0), Job(msg.argv, msg.cwd, msg.env))
    journal.commit(sched, 0.0)
    journal.close()
    again = Journal(state, "/tmp/sock")
    again.open()
    (row,) = again.load().pending
    again.close()
    assert (row.key, row.argv, row.cwd, row.env) == (msg.key, msg.argv, msg.cwd, msg.env)
