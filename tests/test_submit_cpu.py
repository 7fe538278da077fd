"""The daemon's CPU per submission (issue 21): what is done once per batch of submissions,
not once per submission, and stays exact while doing so. The figure itself is in bench/
("submit: daemon CPU per submission"), measured against one ``json.loads`` of the request."""

from __future__ import annotations

import asyncio
import json
import os
import socket

from hypothesis import given, settings
from hypothesis import strategies as st
from test_daemon_core import FakeClient, FakeRuns

from debounce_cli import protocol
from debounce_cli.clock import SystemClock
from debounce_cli.daemon import records
from debounce_cli.daemon.config import Config
from debounce_cli.daemon.core import Core
from debounce_cli.daemon.handlers import Context, handle_run
from debounce_cli.journal import Journal
from debounce_cli.scheduler import Scheduler


def request(key: str) -> protocol.RunRequest:
    return protocol.RunRequest(argv=["true"], cwd="/", env={"PATH": "/usr/bin"}, key=key,
                               options={"delay": 3600.0}, wait=False)


def test_submissions_read_in_the_next_pass_of_the_loop_share_one_commit(tmp_path):
    """Four submissions, and four more that arrive (a socket becomes readable) before their
    commit: asyncio runs the commit first thing in its next pass, before that pass's reads, so
    there were two commits (and two rounds of answers); with the journal the commit waits one
    pass more, and one commit holds all eight. Every answer still comes after that commit."""
    loop = asyncio.new_event_loop()
    journal = Journal(str(tmp_path), str(tmp_path / "daemon.sock"))
    journal.open()
    clock = SystemClock()
    core = Core(Config(socket=str(tmp_path / "daemon.sock")), clock, loop,
                Scheduler(clock.monotonic), journal, runs=FakeRuns())
    ctx = Context(core=core, jobs=None, shutdown=lambda: None)
    commits: list[int] = []  # how many keys each commit wrote
    commit = journal.commit

    def counted(*args: object) -> None:
        if journal.dirty:
            commits.append(len(journal.dirty_keys))
        commit(*args)  # type: ignore[arg-type]

    journal.commit = counted  # type: ignore[method-assign]
    clients = [FakeClient() for _ in range(8)]
    everyone = loop.create_future()
    reader, writer = socket.socketpair()

    def submit(index: int) -> None:
        client = clients[index]
        reply = handle_run(ctx, client, request(f"k{index}"))
        assert reply is None
        client.answered = lambda msg, c=client: answered(c, msg)  # type: ignore[method-assign]
        client.accepted = (  # type: ignore[method-assign]
            lambda inv, now, c=client: answered(
                c, protocol.decode(records.accepted_line(inv, now), protocol.REPLIES)))

    def answered(client: FakeClient, msg: protocol.Message) -> None:
        assert commits, "answered before any commit"
        client.got.append(msg)
        if all(c.got for c in clients) and not everyone.done():
            everyone.set_result(None)

    def first() -> None:
        for index in range(4):
            submit(index)
        writer.send(b"x")  # the next four are readable at the loop's next poll

    def readable() -> None:
        reader.recv(1)
        for index in range(4, 8):
            submit(index)

    loop.add_reader(reader.fileno(), readable)
    loop.call_soon(first)
    try:
        loop.run_until_complete(asyncio.wait_for(everyone, 10))
    finally:
        loop.remove_reader(reader.fileno())
        reader.close()
        writer.close()
        loop.close()
        journal.close()
    assert commits == [8]
    assert all(isinstance(c.got[0], protocol.Accepted) for c in clients)
    assert sorted(c.got[0].key for c in clients) == [f"k{i}" for i in range(8)]
    assert os.path.exists(journal.path)


# ------------------------------------------------------------------ the daemon's decoder
# protocol.RequestDecoder reads submissions faster than protocol.decode (a known environment
# is not read again); it must answer every line exactly as protocol.decode does: the same
# message, or the same error word for word. Lines are written as the client writes them
# (compact, type first), which is the only form that takes its own path, then bent.

_TEXT = st.one_of(
    st.text(max_size=6),
    st.binary(max_size=4).map(lambda b: b.decode("utf-8", "surrogateescape")),
    st.text(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1, max_size=2),
    st.sampled_from(["", "}", '"', "\\", '},"key":"', "\\ud800", "\x00"]),
)
_ENVS = [{"PATH": "/usr/bin", "HOME": "/root"}, {"PATH": "/usr/bin"}, {"PATH": "/bin"}, {},
         {"A": "é", "B": "\udce9"},
         {"X": "}", "Y": '","key":"'}]
#: Text without surrogate escapes once encoded (astral characters are sent as a pair of them).
_PLAIN = st.text(st.characters(max_codepoint=0x2FF), max_size=6)
_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.floats(), _TEXT,
                    st.lists(_TEXT, max_size=2), st.dictionaries(_TEXT, _TEXT, max_size=2))


def _request_line(fields: dict[str, object], order: list[str]) -> bytes:
    obj = {"type": "run", **{name: fields[name] for name in order if name in fields}}
    return (json.dumps(obj, separators=(",", ":")) + "\n").encode()


def _mostly(valid: st.SearchStrategy[object]) -> st.SearchStrategy[object]:
    """``valid`` values, and now and then any value at all."""
    return st.integers(0, 9).flatmap(lambda n: valid if n else _VALUES)


_TEXTS = st.lists(st.integers(0, 9).flatmap(lambda n: _PLAIN if n else _TEXT),
                  max_size=3)
_FIELDS = st.tuples(
    st.fixed_dictionaries(
        {"argv": _mostly(_TEXTS.filter(bool)),
         "cwd": _mostly(_PLAIN.map(lambda t: "/" + t)),
         "env": _mostly(st.sampled_from(_ENVS)),
         "key": _mostly(_PLAIN),
         "options": _mostly(st.sampled_from([{}, {"delay": 1.0}, {"delay": "1s"},
                                             {"bogus": 1}])),
         "wait": _mostly(st.booleans())}),
    st.integers(0, 9).flatmap(lambda n: st.just({}) if n else st.fixed_dictionaries(
        {}, optional={"type": st.sampled_from(["run", "wait", 1]), "extra": _VALUES})),
).map(lambda pair: {**pair[0], **pair[1]})


def _bent(line: bytes, how: int, where: int) -> bytes:
    """``line`` with one thing done to it that the decoder's own path must notice."""
    at = where % len(line)
    if how == 1:
        return line[:at] + b" " + line[at:]  # whitespace somewhere
    if how == 2:
        return line[:-2] + b',"key":"again"}\n'  # a field twice
    if how == 3:
        return line[:-1] + b" x\n"  # something after the object
    if how == 4:
        return line[:at] + line[at + 1:]  # a character missing
    if how == 5:
        return line[:at] + b"\xff" + line[at:]  # not UTF-8
    if how == 6:
        return line[:-1]  # no newline
    if how == 7:
        return line[:-2] + b',"env":{}}\n'  # the environment twice: the last one counts
    if how == 8:
        return line.replace(b',"env":', b'},"env":', 1)  # the object closed before it
    if how == 9:
        return line[:-2] + b',}\n'  # a comma with nothing after it
    return line


def _reads_as_decode(decoder: protocol.RequestDecoder, line: bytes) -> None:
    """``decoder`` gives for ``line`` what protocol.decode gives: the message, or the error
    word for word."""
    try:
        expected: object = protocol.decode(line, protocol.REQUESTS)
    except protocol.ProtocolError as exc:
        expected = str(exc)
    try:
        got: object = decoder.decode(line)
    except protocol.ProtocolError as exc:
        got = str(exc)
    assert got == expected, line


@settings(max_examples=600, deadline=None)
@given(st.lists(st.tuples(_FIELDS, st.permutations(["argv", "cwd", "env", "key", "options",
                                                      "wait", "type", "extra"]),
                          st.integers(0, 12), st.integers(0, 10_000)), min_size=1, max_size=6))
def test_the_daemons_decoder_answers_every_line_as_decode_does(lines):
    decoder = protocol.RequestDecoder()  # one for all the lines, as in the daemon
    for fields, order, how, where in lines:
        line = _bent(_request_line(fields, order), how, where)
        _reads_as_decode(decoder, line)


def test_the_daemons_decoder_reads_a_known_environment_once():
    """Two submissions with the same environment text get one environment object (what the
    speed comes from: neither read nor shared again), equal to what decode reads."""
    decoder = protocol.RequestDecoder()
    env = {"PATH": "/usr/bin", "LANG": "C.UTF-8"}
    lines = [protocol.encode(protocol.RunRequest(argv=["true"], cwd="/", env=dict(env), key=key,
                                                 options={"delay": 1.0}, wait=False))
             for key in ("a", "b")]
    first, second = (decoder.decode(line) for line in lines)
    assert isinstance(first, protocol.RunRequest) and isinstance(second, protocol.RunRequest)
    assert first.env == env and second.env is first.env
    assert second == protocol.decode(lines[1], protocol.REQUESTS)



@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=0, max_value=2**63 - 1), st.text(), st.text(),
       st.none() | st.floats(allow_nan=True, allow_infinity=True) | st.integers(0, 10**6),
       st.integers(min_value=1, max_value=2**63 - 1))
def test_the_accepted_answer_is_made_as_encode_makes_it(inv_id, key, state, due_in, coalesced):
    """Every submission's answer is written straight as bytes (``protocol.accepted_line``):
    the client must read exactly what encoding the message would give, whatever the key."""
    made = protocol.accepted_line(inv_id, key, state, due_in, coalesced)
    assert made == protocol.encode(protocol.Accepted(id=inv_id, key=key, state=state,
                                                     due_in=due_in, coalesced=coalesced))


#: Few command lines, directories and environments, so that lines of one sequence share the
#: text before and at the environment (what the decoder remembers), bent now and then.
_SHARED_FIELDS = st.fixed_dictionaries(
    {"argv": _mostly(st.sampled_from([["true"], ["make", "-C", "docs"], ["é", "\udcff"],
                                      ["\ud83d"]])),  # (a lone surrogate: refused)
     "cwd": _mostly(st.sampled_from(["/", "/srv/app", "/tmp/é", "/\udc00"])),
     "env": _mostly(st.sampled_from(_ENVS[:3])),
     "key": _mostly(_PLAIN),
     "options": _mostly(st.sampled_from([{}, {"delay": 1.0}])),
     "wait": _mostly(st.booleans())})


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(_SHARED_FIELDS, st.integers(0, 14), st.integers(0, 10_000)),
                min_size=2, max_size=10))
def test_lines_sharing_what_the_decoder_remembers_are_read_as_decode_reads_them(lines):
    """The same, with lines in the client's order whose command line, directory and
    environment repeat: a remembered head or environment must never stand for text that
    differs from it, however little."""
    decoder = protocol.RequestDecoder()
    order = ["argv", "cwd", "env", "key", "options", "wait"]
    for fields, how, where in lines:
        line = _bent(_request_line(fields, order), how, where)
        _reads_as_decode(decoder, line)
