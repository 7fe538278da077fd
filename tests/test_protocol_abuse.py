"""Bad input over the socket: the daemon answers with an error line or closes, never crashes,
never runs anything it was not properly asked to, and keeps serving everyone else.

Each test talks to the world's real daemon over raw Unix-socket connections, then checks with
the real CLI that the same daemon (same pid) still runs commands.
"""

from __future__ import annotations

import json
import os
import random
import socket
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import new_world, status_pid

# ----------------------------------------------------------------------------- helpers


def line(obj) -> bytes:
    return json.dumps(obj).encode() + b"\n"


HELLO = line({"type": "hello", "version": 1, "client": "abuse-test"})


def exchange(sock_path: str, payload: bytes, timeout: float = 20.0) -> tuple[list[dict], str]:
    """Send ``payload``, end our side, read to the end.

    Returns the reply lines (each must be a JSON object) and how the daemon ended the
    conversation: "closed" (end of stream) or "reset" (the connection was torn down).
    Fails if the daemon neither answers nor closes within ``timeout``.
    """
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(sock_path)  # blocking, like the CLI
    s.settimeout(timeout)
    data = b""
    ending = "closed"
    try:
        try:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            ending = "reset"  # the daemon stopped reading us: still read what it said
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                ending = "reset"
                break
            except TimeoutError:
                raise AssertionError(f"the daemon neither answered nor closed in {timeout}s; "
                                     f"got {data[:200]!r}") from None
            if not chunk:
                break
            data += chunk
    finally:
        s.close()
    replies = []
    for raw in data.split(b"\n"):
        if raw.strip():
            obj = json.loads(raw)  # every reply line is JSON
            assert isinstance(obj, dict) and "type" in obj, obj
            replies.append(obj)
    if data:
        assert data.endswith(b"\n"), f"a reply line was cut: {data[-100:]!r}"
    return replies, ending


def assert_refused(replies: list[dict], after_hello: bool) -> None:
    """An error reply (with a message) or a close; after a valid hello, the hello reply first."""
    if after_hello and replies:
        assert replies[0]["type"] == "hello", replies
        replies = replies[1:]
    if replies:
        assert [r["type"] for r in replies] == ["error"], replies
        assert isinstance(replies[0].get("message"), str) and replies[0]["message"].strip()


def still_serving(world, pid: int) -> None:
    """The same daemon still runs a normal ``debounce run`` to its end."""
    proc = world.run("run", "--key", "alive", "--delay", "50ms", "--", "sh", "-c",
                     "echo alive; exit 9", timeout=30)
    assert proc.returncode == 9, proc.stderr
    assert proc.stdout == "alive\n"
    assert status_pid(world) == pid, "the daemon was replaced: it must have crashed"


def run_request(world, marker: Path, **changes) -> dict:
    """A valid run request that would create ``marker``, with fields changed or added."""
    req = {
        "type": "run", "argv": ["touch", str(marker)], "cwd": str(world.work),
        "env": {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}, "key": "abuse",
        "options": {"delay": 0.0}, "wait": False,
    }
    req.update(changes)
    return req


# ----------------------------------------------------------------------------- malformed lines


def _cases(world, marker: Path) -> dict[str, tuple[bytes, bool]]:
    """name -> (payload, whether a valid hello comes first)."""
    rnd = random.Random(20240601)
    return {
        "random bytes": (rnd.randbytes(4096) + b"\n", False),
        "invalid utf-8": (b'{"type": "hello", "client": "\xff\xfe\xc3"}\n', False),
        "invalid utf-8 in a run": (HELLO + b'{"type":"run","argv":["\xff"],"key":"k"}\n', True),
        "invalid json": (b'{"type": "hello", "version": 1,\n', False),
        "json array": (b'[{"type": "hello", "version": 1}]\n', False),
        "json string": (b'"hello"\n', False),
        "unknown message type": (line({"type": "launch-missiles"}), False),
        "unknown type after hello": (HELLO + line({"type": "bogus"}), True),
        "a reply type as request": (HELLO + line({"type": "finished", "run_id": 1}), True),
        "argv a string": (HELLO + line(run_request(world, marker, argv=f"touch {marker}")),
                          True),
        "wait an int": (HELLO + line(run_request(world, marker, wait=1)), True),
        "env values not strings": (HELLO + line(run_request(world, marker, env={"A": 1})), True),
        "options not an object": (HELLO + line(run_request(world, marker, options=[0.1])), True),
        "delay a string": (HELLO + line(run_request(world, marker, options={"delay": "1s"})),
                           True),
        "negative delay": (HELLO + line(run_request(world, marker, options={"delay": -5})),
                           True),
        "unknown option": (HELLO + line(run_request(world, marker, options={"sudo": True})),
                           True),
        "unknown field in run": (HELLO + line(run_request(world, marker, shell=True)), True),
        "unknown field in hello": (
            line({"type": "hello", "version": 1, "client": "x", "admin": True})
            + line(run_request(world, marker)), False),
        "relative cwd": (HELLO + line(run_request(world, marker, cwd="work")), True),
        "empty argv": (HELLO + line(run_request(world, marker, argv=[])), True),
        "run before hello": (line(run_request(world, marker)) + HELLO, False),
        "wrong protocol version": (
            line({"type": "hello", "version": 99, "client": "x"})
            + line(run_request(world, marker)), False),
        "version a string": (
            line({"type": "hello", "version": "1", "client": "x"})
            + line(run_request(world, marker)), False),
        "nested too deep": (b"[" * 100000 + b"]" * 100000 + b"\n", False),
        "empty line": (b"\n", False),
        "nul bytes": (b"\0" * 1000 + b"\n", False),
    }


def _case_names() -> list[str]:
    class _NoWorld:  # the payloads need a world only for paths; their names do not
        work = Path("/nonexistent")

    return list(_cases(_NoWorld(), Path("/nonexistent/marker")))


CASE_NAMES = _case_names()


@pytest.fixture(scope="module")
def one_world():
    """One daemon for every malformed line: each case checks that the very daemon it started
    with still serves (a crash shows in the case that caused it; the next case starts
    afresh), and sparing a daemon's start-up and stop per case saves most of their time."""
    with new_world() as w:
        yield w


@pytest.mark.slow  # (a real daemon, as the world fixture's tests are)
@pytest.mark.parametrize("case", CASE_NAMES)
def test_malformed_input_gets_an_error_or_a_close_and_the_daemon_keeps_serving(one_world, case):
    world = one_world
    marker = world.work / f"must-not-exist-{CASE_NAMES.index(case)}"
    pid = status_pid(world)
    payload, after_hello = _cases(world, marker)[case]
    replies, _ = exchange(world.socket, payload)
    assert_refused(replies, after_hello)
    if case in ("wrong protocol version", "version a string", "run before hello",
                "unknown field in hello"):
        assert replies and replies[-1]["type"] == "error", f"{case}: expected an error reply"
        if case == "wrong protocol version":
            assert "version" in replies[-1]["message"]
    still_serving(world, pid)  # takes longer than the bad run's delay of 0
    assert not marker.exists(), f"{case}: a refused request ran its command"


def test_error_replies_name_the_problem(world):
    """What a person typing at the socket reads: the bad field, the wrong type."""
    marker = world.work / "m"
    status_pid(world)  # the daemon is up
    replies, _ = exchange(world.socket, HELLO + line(run_request(world, marker, argv="touch x")))
    assert replies[-1]["type"] == "error"
    assert "argv" in replies[-1]["message"]
    replies, _ = exchange(world.socket, HELLO + line(run_request(world, marker, color="red")))
    assert "color" in replies[-1]["message"]
    replies, _ = exchange(world.socket, b"\xff\xfe\n")
    assert "utf-8" in replies[-1]["message"].lower()
    replies, _ = exchange(world.socket, b"{nope\n")
    assert "json" in replies[-1]["message"].lower()


# ----------------------------------------------------------------------------- oversized lines


@pytest.mark.parametrize("after_hello", [False, True], ids=["raw line", "run request"])
def test_an_8_mb_line_is_refused_and_the_daemon_keeps_serving(world, after_hello):
    marker = world.work / "huge-ran"
    pid = status_pid(world)
    if after_hello:
        big = run_request(world, marker, argv=["touch", str(marker), "x" * (8 << 20)])
        payload = HELLO + line(big)
    else:
        payload = b"a" * (8 << 20) + b"\n"
    replies, _ = exchange(world.socket, payload, timeout=30)
    assert_refused(replies, after_hello)
    still_serving(world, pid)
    assert not marker.exists()


# ----------------------------------------------------------------------------- silent peers


def test_silent_connections_are_closed_and_do_not_block_others(world):
    pid = status_pid(world)
    conns = {}
    opened = time.monotonic()
    for name, first in (("silent", b""), ("half a line", b'{"type": "hel'),
                        ("hello then silence", HELLO)):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(world.socket)
        if first:
            s.sendall(first)
        conns[name] = s
    closed_at: dict[str, float] = {}

    def watch(name: str, s: socket.socket) -> None:
        s.settimeout(20)
        try:
            while s.recv(65536):
                pass
        except (TimeoutError, OSError):
            return
        closed_at[name] = time.monotonic() - opened

    threads = [threading.Thread(target=watch, args=item, daemon=True) for item in conns.items()]
    for t in threads:
        t.start()
    try:
        # Meanwhile everyone else is served normally, at normal speed.
        began = time.monotonic()
        still_serving(world, pid)
        assert time.monotonic() - began < 5
        assert not closed_at, "the daemon closed the connections too early to be a timeout"

        for t in threads:
            t.join(timeout=20)
        for name in conns:
            assert name in closed_at, f"{name}: the daemon did not close it within 20s"
            assert closed_at[name] < 15, f"{name}: closed only after {closed_at[name]:.1f}s"
    finally:
        for s in conns.values():
            s.close()
    still_serving(world, pid)


# ----------------------------------------------------------------------------- fuzzing

_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30)
_json = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                  max_size=4),
    max_leaves=12,
)
_types = st.sampled_from(["hello", "run", "wait", "status", "flush", "cancel", "history",
                          "logs", "accepted", "error", "", "RUN"])  # never "stop"
_message = st.builds(
    lambda kind, fields: dict(fields, type=kind),
    _types,
    st.dictionaries(
        st.sampled_from(["version", "client", "argv", "cwd", "env", "key", "options", "wait",
                         "target", "limit", "extra"]),
        _json, max_size=6),
)


def _run_line(argv_tail, cwd, env, key, options, wait):
    return {"type": "run", "argv": ["true", *argv_tail], "cwd": cwd, "env": env, "key": key,
            "options": options, "wait": wait}


_near_valid_run = st.builds(
    _run_line,
    st.lists(st.text(max_size=20), max_size=3),
    st.sampled_from(["/", "/tmp", "relative", "", "/no/such/dir"]),
    st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3),
    st.text(max_size=20),
    st.dictionaries(
        st.sampled_from(["delay", "max_wait", "leading", "trailing", "on_busy", "stop_timeout",
                         "timeout", "defer", "bogus"]),
        _scalars, max_size=4),
    st.booleans(),
)


def _encode(obj) -> bytes:
    return json.dumps(obj).encode() + b"\n"


_lines = st.one_of(
    st.binary(max_size=300).map(lambda b: b + b"\n"),
    _json.map(_encode),
    _message.map(_encode),
    _message.map(lambda m: HELLO + _encode(m)),
    _near_valid_run.map(lambda m: HELLO + _encode(m)),
    # Several requests on one connection, the way a connection may carry them.
    st.lists(_message.map(_encode) | _json.map(_encode), min_size=2, max_size=5).map(
        lambda ms: HELLO + b"".join(ms)),
    st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass") + b"\n"),
)


@settings(max_examples=300, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(payload=_lines)
def test_fuzzed_lines_never_break_the_daemon(world, payload):
    if not hasattr(world, "fuzz_pid"):
        world.fuzz_pid = status_pid(world)
    exchange(world.socket, payload, timeout=20)
    # The very same daemon still answers a status request on a fresh connection.
    replies, _ = exchange(world.socket, HELLO + _encode({"type": "status"}))
    assert [r["type"] for r in replies] == ["hello", "status"], replies
    assert replies[1]["pid"] == world.fuzz_pid


def test_concurrent_garbage_and_valid_requests(world):
    """Garbage on many connections at once, mixed with valid requests that must be answered."""
    pid = status_pid(world)
    rnd = random.Random(7)
    payloads = [rnd.randbytes(rnd.randrange(1, 2000)) + b"\n" for _ in range(200)]
    payloads += [HELLO + _encode({"type": "status"})] * 50
    rnd.shuffle(payloads)
    errors: list[BaseException] = []

    def worker(chunk: list[bytes]) -> None:
        try:
            for p in chunk:
                replies, _ = exchange(world.socket, p, timeout=20)
                if p.startswith(HELLO):
                    assert [r["type"] for r in replies] == ["hello", "status"], replies
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(payloads[i::8],)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors[:3]
    still_serving(world, pid)


# ----------------------------------------------------------------------------- huge numbers

_HUGE = "9" * 30  # a run id no SQLite INTEGER can hold


@pytest.mark.parametrize("request_obj", [
    {"type": "wait", "target": _HUGE},
    {"type": "logs", "target": _HUGE},
    {"type": "history", "limit": 2 ** 70},
], ids=["wait", "logs", "history"])
def test_numbers_too_big_for_the_journal_get_a_reply(world, request_obj):
    pid = status_pid(world)
    replies, _ = exchange(world.socket, HELLO + line(request_obj))
    assert [r["type"] for r in replies[:1]] == ["hello"], replies
    assert len(replies) == 2, f"no answer to {request_obj}: {replies}"
    assert replies[1]["type"] in ("error", "history"), replies
    still_serving(world, pid)


@pytest.mark.parametrize("command", ["wait", "logs"])
def test_cli_lookup_of_a_huge_run_id_is_not_found(world, command):
    status_pid(world)
    proc = world.run(command, _HUGE)
    assert proc.returncode == 117, (proc.returncode, proc.stderr)
