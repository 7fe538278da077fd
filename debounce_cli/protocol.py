"""Every message between client and daemon, with framing, a size cap and validation.

The wire format is newline-delimited JSON, one object per line, so a session can be read and
typed by hand with ``socat - UNIX-CONNECT:$sock``. Each object has a ``type``; each type is a
frozen record class below with a docstring saying when it is sent. A connection may carry any
number of one-shot requests, one after the other; a request that waits for a run (``run`` with
``wait``, ``wait``) is its connection's last. (Not dataclasses: creating twenty dataclasses
costs ~15 ms at import, a third of the client's start-up budget; the :class:`Message` base
gives the same keyword construction, immutability and equality.) Every connection starts with
:class:`Hello` from the client and :class:`HelloReply` from the daemon carrying the protocol
version, so a client never talks past a daemon of another version. Rows inside messages
(status rows, finished runs) are :class:`Record` classes, decoded and checked the same way.

Decoding validates field names and types against the class's schema and raises
:class:`ProtocolError` with a message fit to send back to the peer; a malformed message never
raises anything else.
"""

from __future__ import annotations

from itertools import repeat

from debounce_cli import states
from debounce_cli.options import FIELDS, HISTORY_LIMIT

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, ClassVar

    Check = Callable[[Any], bool]

VERSION = 1
#: Largest request the daemon accepts, newline included. A full argv plus environment is far
#: below this (Linux caps both together at 2 MiB).
MAX_MESSAGE = 4 * 1024 * 1024
#: Largest answer a client accepts: status and history grow with the daemon's keys and runs.
MAX_REPLY = 512 * 1024 * 1024


class ProtocolError(ValueError):
    """A message that cannot be accepted; ``str()`` is the reply to send."""


# Type tags for validation, kept as plain strings so no typing introspection runs at start-up.
_STR, _INT, _NUM, _BOOL = "str", "int", "num", "bool"
_OPT_STR, _OPT_NUM, _OPT_INT = "str?", "num?", "int?"
_STRS, _ENV, _ANY, _OBJ, _OBJS = "list[str]", "dict[str,str]", "any", "dict", "list[dict]"
_COVERED = "covered"  # a run's invocations: a list of ids (integers, or host:id strings), a
# count, or null


class Message:
    """An immutable record: fields are the names in ``schema``, defaults the class attributes."""

    type: ClassVar[str] = ""
    schema: ClassVar[dict[str, str]] = {}

    def __init__(self, **values: Any) -> None:
        cls = type(self)
        fields = self.__dict__  # written directly: __setattr__ refuses, that is the point
        given = 0
        for name in cls.schema:  # in schema order, so to_dict() needs no sorting
            if name in values:
                fields[name] = values[name]
                given += 1
            else:
                value = getattr(cls, name)
                fields[name] = value.copy() if isinstance(value, (list, dict)) else value
        if given != len(values):
            unknown = sorted(values.keys() - cls.schema.keys())
            raise TypeError(f"{cls.__name__} has no field {unknown[0]!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Message) and type(other) is type(self) and (
            self.to_dict() == other.to_dict()
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        fields = ", ".join(f"{n}={getattr(self, n)!r}" for n in self.schema)
        return f"{type(self).__name__}({fields})"

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, **self.__dict__}


#: The state of a Pending message to the waiters of a fleet key while its store does not
#: answer: what they wait for cannot move until it does.
STORE_UNREACHABLE = "store-unreachable"


# --------------------------------------------------------------- client to daemon
class Hello(Message):
    """First line of every connection, from the client."""

    type: ClassVar[str] = "hello"
    schema: ClassVar[dict[str, str]] = {"version": _INT, "client": _STR}
    version: int = VERSION
    client: str = ""


class RunRequest(Message):
    """Submit one invocation (``debounce run`` or a stdin line).

    ``key`` is already rendered by the client (templates can read the client's environment);
    ``options`` holds the scheduling options by their field names in ``scheduler.Options``.
    With ``wait`` the daemon keeps the connection and streams the run back; without it the
    daemon answers :class:`Accepted` and reads the next request from the same connection.
    """

    type: ClassVar[str] = "run"
    schema: ClassVar[dict[str, str]] = {
        "argv": _STRS,
        "cwd": _STR,
        "env": _ENV,
        "key": _STR,
        "options": _OBJ,
        "wait": _BOOL,
    }
    argv: list[str] = []
    cwd: str = "/"
    env: dict[str, str] = {}
    key: str = ""
    options: dict[str, Any] = {}
    wait: bool = True


class WaitRequest(Message):
    """Attach to what is pending or running for a key or a run id (``debounce wait``)."""

    type: ClassVar[str] = "wait"
    schema: ClassVar[dict[str, str]] = {"target": _STR, "by": _OPT_STR}
    target: str = ""
    #: How to read it: "key", "run" (an id), "invocation" (an id ``run`` gave), or None:
    #: a key or a run, whichever it is.
    by: str | None = None


class StatusRequest(Message):
    """Ask for every pending and running key (``debounce status``); with ``fleet``, the
    fleet's keys instead of this daemon's."""

    type: ClassVar[str] = "status"
    schema: ClassVar[dict[str, str]] = {"fleet": _BOOL}
    fleet: bool = False


class FlushRequest(Message):
    """Run what is pending for ``key`` now (``debounce flush``)."""

    type: ClassVar[str] = "flush"
    schema: ClassVar[dict[str, str]] = {"key": _STR, "by": _OPT_STR}
    key: str = ""
    by: str | None = None  # how to read it: "key", "run" (an id), or None: whichever it is


class CancelRequest(Message):
    """Drop what is pending for ``key`` (``debounce cancel``)."""

    type: ClassVar[str] = "cancel"
    schema: ClassVar[dict[str, str]] = {"key": _STR, "by": _OPT_STR}
    key: str = ""
    by: str | None = None  # how to read it: "key", "run" (an id), or None: whichever it is


class HistoryRequest(Message):
    """Finished runs, newest first, of one key or all (``debounce history``)."""

    type: ClassVar[str] = "history"
    schema: ClassVar[dict[str, str]] = {"key": _OPT_STR, "limit": _INT, "fleet": _BOOL,
                                        "invocation": _OPT_INT}
    key: str | None = None
    limit: int = HISTORY_LIMIT
    fleet: bool = False  # the fleet's runs instead of this daemon's
    invocation: int | None = None  # only the run that stood for this invocation


class LogsRequest(Message):
    """Where the output of a run (or a key's latest run) is (``debounce logs``)."""

    type: ClassVar[str] = "logs"
    schema: ClassVar[dict[str, str]] = {"target": _STR, "by": _OPT_STR}
    target: str = ""
    by: str | None = None  # how to read it: "key", "run" (an id), or None: whichever it is


class KillRequest(Message):
    """Stop a running run (``debounce kill``): TERM then KILL, or ``signal`` once."""

    type: ClassVar[str] = "kill"
    schema: ClassVar[dict[str, str]] = {"target": _STR, "by": _OPT_STR, "signal": _OPT_STR}
    target: str = ""
    by: str | None = None  # how to read target: "key", "run" (an id), or None: whichever
    signal: str | None = None


class MetricsRequest(Message):
    """The daemon's metrics in the Prometheus text format (``debounce metrics``)."""

    type: ClassVar[str] = "metrics"


class StopRequest(Message):
    """Shut the daemon down as SIGTERM would (``debounce stop``)."""

    type: ClassVar[str] = "stop"


# --------------------------------------------------------------- daemon to client
class HelloReply(Message):
    """The daemon's answer to :class:`Hello`."""

    type: ClassVar[str] = "hello"
    schema: ClassVar[dict[str, str]] = {"version": _INT, "pid": _INT}
    version: int = VERSION
    pid: int = 0


class Accepted(Message):
    """The invocation is accepted; ``state`` is where it landed (pending, queued, running...)."""

    type: ClassVar[str] = "accepted"
    schema: ClassVar[dict[str, str]] = {
        "id": _INT,
        "key": _STR,
        "state": _STR,
        "due_in": _OPT_NUM,
        "coalesced": _INT,
    }
    id: int = 0
    key: str = ""
    state: str = ""
    due_in: float | None = None
    coalesced: int = 1


class Pending(Message):
    """What a waiter waits for changed: superseded, rescheduled, queued for a slot; or, with
    ``state`` :data:`STORE_UNREACHABLE`, a fleet key's store stopped answering (the other
    fields mean nothing then; a later Pending or Started says it is back)."""

    type: ClassVar[str] = "pending"
    schema: ClassVar[dict[str, str]] = {
        "key": _STR,
        "state": _STR,
        "due_in": _OPT_NUM,
        "coalesced": _INT,
    }
    key: str = ""
    state: str = ""
    due_in: float | None = None
    coalesced: int = 1


class Started(Message):
    """The run a waiter is attached to started; output follows from its first byte."""

    type: ClassVar[str] = "started"
    schema: ClassVar[dict[str, str]] = {
        "run_id": _INT,
        "invocation": _INT,
        "key": _STR,
        "argv": _STRS,
        "coalesced": _INT,
        "started_at": _NUM,
    }
    run_id: int = 0
    invocation: int = 0  # the id (from Accepted) of the invocation that won
    key: str = ""
    argv: list[str] = []
    coalesced: int = 1
    started_at: float = 0.0


class Output(Message):
    """A chunk of the run's stdout (fd 1) or stderr (fd 2), base64 so any bytes pass."""

    type: ClassVar[str] = "output"
    schema: ClassVar[dict[str, str]] = {"fd": _INT, "data": _STR}
    fd: int = 1
    data: str = ""


class Finished(Message):
    """The run ended; the client exits with ``exit_code``. Fields match ``--json`` output."""

    type: ClassVar[str] = "finished"
    schema: ClassVar[dict[str, str]] = {
        "run_id": _INT,
        "invocation": _INT,
        "key": _STR,
        "argv": _STRS,
        "exit_code": _INT,
        "coalesced": _INT,
        "started_at": _NUM,
        "finished_at": _NUM,
        "outcome": _STR,
    }
    run_id: int = 0
    key: str = ""
    argv: list[str] = []
    exit_code: int = 0
    coalesced: int = 1
    started_at: float = 0.0
    finished_at: float = 0.0
    outcome: str = states.EXITED
    invocation: int = 0  # the id of the invocation that won


class Cancelled(Message):
    """The invocation was dropped by ``debounce cancel`` before it ran."""

    type: ClassVar[str] = "cancelled"
    schema: ClassVar[dict[str, str]] = {"key": _STR}
    key: str = ""


class StatusReply(Message):
    """Every pending and running key, sorted by key."""

    type: ClassVar[str] = "status"
    schema: ClassVar[dict[str, str]] = {"keys": "list[KeyStatus]", "pid": _INT, "jobs": _OPT_INT}
    keys: list[KeyStatus] = []
    pid: int = 0
    jobs: int | None = None


class HistoryReply(Message):
    """Finished runs, newest first."""

    type: ClassVar[str] = "history"
    schema: ClassVar[dict[str, str]] = {"runs": "list[RunRecord]"}
    runs: list[RunRecord] = []


class LogsReply(Message):
    """The log file of a run; the client reads it itself (same user, see ``logfile``)."""

    type: ClassVar[str] = "logs"
    schema: ClassVar[dict[str, str]] = {
        "run_id": _INT, "key": _STR, "log_path": _OPT_STR, "running": _BOOL,
    }
    run_id: int = 0
    key: str = ""
    log_path: str | None = None
    running: bool = False


class MetricsReply(Message):
    """The metrics, as ``/metrics`` serves them (``daemon/metrics.py``)."""

    type: ClassVar[str] = "metrics"
    schema: ClassVar[dict[str, str]] = {"text": _STR}
    text: str = ""


class Done(Message):
    """A control request was carried out (``ok``) or had nothing to act on."""

    type: ClassVar[str] = "done"
    schema: ClassVar[dict[str, str]] = {"ok": _BOOL, "message": _STR}
    ok: bool = True
    message: str = ""


class Error(Message):
    """The request was refused; ``message`` says what was wrong and how to mend it.

    ``code`` is one of ``states.BAD_REQUEST`` (the client sent something malformed),
    ``states.REFUSED`` (the daemon cannot take it now, e.g. shutting down or a full disk) and
    ``states.NOT_FOUND``.
    """

    type: ClassVar[str] = "error"
    schema: ClassVar[dict[str, str]] = {"message": _STR, "code": _STR}
    message: str = ""
    code: str = states.BAD_REQUEST


# --------------------------------------------------------------- records inside messages
class Record(Message):
    """A typed row inside a message (a status row, a finished run); no ``type`` of its own.

    On the wire it is a plain JSON object; :func:`decode` turns it into its class, checked
    field by field like a message, so nothing reads rows by string keys.
    """

    @classmethod
    def from_dict(cls, obj: dict[str, Any], where: str) -> Record:
        return cls(**_checked(obj, cls.schema, where))

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class RunRecord(Record):
    """One run as history, ``wait`` and ``logs`` know it (the journal's row, or a live run).

    ``exit_code``, ``finished_at`` and ``outcome`` are ``None`` while it runs; ``invocation``
    is the id of the invocation that won.
    """

    schema: ClassVar[dict[str, str]] = {
        "run_id": _INT, "key": _STR, "argv": _STRS, "cwd": _STR, "exit_code": _OPT_INT,
        "coalesced": _INT, "started_at": _NUM, "finished_at": _OPT_NUM, "outcome": _OPT_STR,
        "due_at": _OPT_NUM, "invocation": _OPT_INT, "log_path": _OPT_STR, "host": _OPT_STR,
        "covered": _COVERED,
    }
    run_id: int = 0
    key: str = ""
    argv: list[str] = []
    cwd: str = "/"
    exit_code: int | None = None
    coalesced: int = 1
    started_at: float = 0.0
    finished_at: float | None = None
    outcome: str | None = None
    due_at: float | None = None
    invocation: int | None = None
    log_path: str | None = None
    host: str | None = None  # a fleet run: the host that ran it
    #: The invocations it stood for, oldest first: their ids (a fleet run's as "HOST:ID"),
    #: or their number when they are more than 1,000; None where unknown.
    covered: list[int] | list[str] | int | None = None

    def started(self) -> Started:
        return Started(run_id=self.run_id, invocation=self.invocation or 0, key=self.key,
                       argv=self.argv, coalesced=self.coalesced, started_at=self.started_at)

    def finished(self) -> Finished:
        """The message that ends a waiter's conversation about this (finished) run."""
        return Finished(
            run_id=self.run_id, invocation=self.invocation or 0, key=self.key, argv=self.argv,
            exit_code=-1 if self.exit_code is None else self.exit_code,
            coalesced=self.coalesced, started_at=self.started_at,
            finished_at=self.finished_at if self.finished_at is not None else self.started_at,
            outcome=self.outcome or states.LOST,
        )


class PendingRow(Record):
    """``status``: the invocation pending for a key."""

    schema: ClassVar[dict[str, str]] = {
        "id": _INT, "argv": _STRS, "cwd": _STR, "state": _STR, "due_in": _NUM, "coalesced": _INT,
    }
    id: int = 0
    argv: list[str] = []
    cwd: str = "/"
    state: str = states.PENDING
    due_in: float = 0.0
    coalesced: int = 1


class RunningRow(Record):
    """``status``: the run executing for a key; ``stopping`` says why it is being stopped;
    ``state`` is ``running``, or ``starting`` while its process is not created yet."""

    schema: ClassVar[dict[str, str]] = {
        "run_id": _INT, "argv": _STRS, "started_at": _NUM, "coalesced": _INT,
        "stopping": _OPT_STR, "state": _STR,
    }
    run_id: int = 0
    argv: list[str] = []
    started_at: float = 0.0
    coalesced: int = 1
    stopping: str | None = None
    state: str = states.RUNNING


class LastRun(Record):
    """``status``: the result of a key's latest finished run."""

    schema: ClassVar[dict[str, str]] = {"run_id": _INT, "exit_code": _OPT_INT,
                                        "finished_at": _OPT_NUM}
    run_id: int = 0
    exit_code: int | None = None
    finished_at: float | None = None


class KeyStatus(Record):
    """``status``: one key with what is pending and running for it."""

    schema: ClassVar[dict[str, str]] = {
        "key": _STR, "pending": "PendingRow?", "running": "RunningRow?", "last": "LastRun?",
        "host": _OPT_STR,
    }
    key: str = ""
    pending: PendingRow | None = None
    running: RunningRow | None = None
    last: LastRun | None = None
    #: A fleet key: the host that runs it (running), else the one that would (pending).
    host: str | None = None


REQUESTS: dict[str, type[Message]] = {
    cls.type: cls
    for cls in (Hello, RunRequest, WaitRequest, StatusRequest, FlushRequest, CancelRequest,
                HistoryRequest, LogsRequest, KillRequest, StopRequest, MetricsRequest)
}
REPLIES: dict[str, type[Message]] = {
    cls.type: cls
    for cls in (HelloReply, Accepted, Pending, Started, Output, Finished, Cancelled,
                StatusReply, HistoryReply, LogsReply, MetricsReply, Done, Error)
}


def _plain(obj: Any) -> Any:
    """How the encoder writes what JSON does not know: records inside messages."""
    if isinstance(obj, Record):
        return obj.__dict__  # its fields, in schema order; only read
    raise TypeError(f"{type(obj).__name__} cannot be sent")


# ------------------------------------------------------------------ JSON, through _json
# The json package imports re, and re imports enum: together about 5 ms of every client's
# start, more than half of what starting Python costs. The C scanner and encoder that json
# itself uses are in _json and need neither; json is imported only to word a decoding error.
try:
    import _json
except ImportError:  # not CPython: the json package it is
    _json = None  # type: ignore[assignment]


class _ScanContext:
    """What ``_json.make_scanner`` reads off a decoder: json.JSONDecoder's defaults."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int

    @staticmethod
    def parse_constant(name: str) -> float:
        return {"NaN": float("nan"), "Infinity": float("inf"), "-Infinity": float("-inf")}[name]

    memo: dict[str, Any] = {}


_WHITESPACE = " \t\n\r"


class _Invalid(ValueError):
    """Not JSON (worded as json's own JSONDecodeError would be)."""


def _json_loads(text: str) -> Any:
    if _json is None:
        import json

        return json.loads(text)
    end = len(text)
    i = 0
    while i < end and text[i] in _WHITESPACE:
        i += 1
    try:
        obj, i = _SCAN(text, i)
    except StopIteration as exc:
        raise _Invalid(f"Expecting value: column {exc.value + 1}") from None
    except SystemError:
        # The scanner words its other errors with json.decoder's JSONDecodeError, and fails
        # this way when json was never imported: let json say what is wrong.
        import json

        return json.loads(text)
    while i < end and text[i] in _WHITESPACE:
        i += 1
    if i != end:
        raise _Invalid(f"Extra data: column {i + 1}")
    return obj


if _json is not None:
    _SCAN = _json.make_scanner(_ScanContext())  # type: ignore[arg-type]
    _SCANSTRING = _json.scanstring
    #: One encoder for every message (compact separators; records through _plain).
    _ENCODE = _json.make_encoder(None, _plain, _json.encode_basestring_ascii, None, ":", ",",
                                 False, False, True)
    _QUOTE = _json.encode_basestring_ascii
else:  # pragma: no cover - other Pythons
    import json as _json_module

    _SCAN = _json_module.JSONDecoder().scan_once
    _SCANSTRING = _json_module.decoder.scanstring
    _ENCODE = _json_module.JSONEncoder(separators=(",", ":"), default=_plain).iterencode
    _QUOTE = _json_module.encoder.encode_basestring_ascii


def encode(msg: Message) -> bytes:
    """One line of JSON, newline included."""
    return ("".join(_ENCODE(msg.to_dict(), 0)) + "\n").encode()


def accepted_line(inv_id: int, key: str, state: str, due_in: float | None,
                  coalesced: int) -> bytes:
    """``encode(Accepted(id=inv_id, ...))``, byte for byte, without making the message: every
    submission is answered with one."""
    if due_in is None:
        due = "null"
    elif type(due_in) is float and due_in - due_in == 0.0:  # finite: JSON writes its repr
        due = repr(due_in)
    else:
        return encode(Accepted(id=inv_id, key=key, state=state, due_in=due_in,
                               coalesced=coalesced))
    return (f'{{"type":"accepted","id":{inv_id!r},"key":{_QUOTE(key)},"state":{_QUOTE(state)},'
            f'"due_in":{due},"coalesced":{coalesced!r}}}\n').encode()


def decode(line: bytes, kinds: dict[str, type[Message]], limit: int = MAX_MESSAGE) -> Message:
    """Parse and validate one line into the message class its ``type`` names."""
    if len(line) > limit:
        raise ProtocolError(f"message of {len(line)} bytes exceeds the limit of {limit}")
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"message is not valid UTF-8 (byte {exc.start})") from None
    obj = loads(text)
    if not isinstance(obj, dict):
        raise ProtocolError("message must be a JSON object")
    kind = obj.pop("type", None)
    if not isinstance(kind, str) or kind not in kinds:
        names = ", ".join(sorted(kinds))
        raise ProtocolError(f"unknown message type {kind!r}; expected one of {names}")
    cls = kinds[kind]
    return cls(**_checked(obj, cls.schema, kind))


class RequestDecoder:
    """Requests as :func:`decode` reads them (``decode(line, REQUESTS)``), a submission in a
    fraction of the time: the daemon's decoder, one for all its connections.

    A ``run`` request is mostly its environment (kilobytes of it), and a shell session sends
    the same one, byte for byte, with every submission. So the environments of the last few
    accepted requests are kept with their text: a request holding the same text at the
    ``env`` field takes the same (already checked) dictionary without reading it again, and
    without the cost of sharing it anew (``daemon.jobs.Shared``). The rest of the request
    is read by the same C scanner as :func:`loads`: the fields on either side of a known
    environment in one call each, a request with a new one a field at a time.

    Only a request written as the client writes it (``{"type":"run",`` first, no
    whitespace, no field twice, no ``\\ud`` escape outside a known environment) takes this
    path, and only when every field passes; anything else, valid or not, goes through
    :func:`decode`, which gives the same message or the same error, word for word.
    """

    #: Environments remembered (most recent first), and the longest text kept.
    KEPT = 8
    LONGEST = 64 * 1024

    def __init__(self) -> None:
        self.envs: list[tuple[str, dict[str, str]]] = []
        #: The fields before a known environment (the command line and its directory, as
        #: the client writes them), by their text, checked: a script sends the same ones.
        self.heads: list[tuple[str, dict[str, Any]]] = []

    def decode(self, line: bytes) -> Message:
        if line.startswith(_RUN_START) and len(line) <= MAX_MESSAGE:
            try:
                msg = self._run(line.decode("utf-8"))
            except UnicodeDecodeError:
                msg = None
            if msg is not None:
                return msg
        return decode(line, REQUESTS)

    def _run(self, text: str) -> RunRequest | None:
        """``text`` as a RunRequest, or None: let :func:`decode` say what it is."""
        if self.envs:
            known = self._known_env(text)
            if known is not None:
                return known
        return self._fields(text)

    def _known_env(self, text: str) -> RunRequest | None:
        """A request with a known environment (``"env":`` right after a comma, then its
        text): the fields before the environment (:meth:`_head`) and those after it, each
        read as an object of its own. Both end where they must, or it is not taken: then
        the environment is a member of the request's own object (the fields before it parse
        as whole members), and the scanner would have read exactly its text."""
        at = text.find('"env":{', len(_RUN_START))
        if at < 0 or text[at - 1] != ",":
            return None
        start = at + 6
        envs = self.envs
        for index, (env_text, env) in enumerate(envs):  # noqa: B007 - used after break
            if text.startswith(env_text, start):
                break
        else:
            return None
        head = self._head(text, at - 1)
        if head is None:
            return None
        end = start + len(env_text)
        more: dict[str, Any] = {}
        try:
            char = text[end]
            if char == ",":
                if text[end + 1] != '"':
                    return None
                tail = "{" + text[end + 1:]
                more, after = _SCAN(tail, 0)
                if tail[after:].strip(_WHITESPACE) or "env" in more or "type" in more:
                    return None
            elif char != "}" or text[end + 1:].strip(_WHITESPACE):
                return None
        except Exception:  # noqa: BLE001 - whatever it is, decode() words it
            return None
        if _has_surrogate_escape(text, end, len(text)):
            return None
        try:
            _checked(more, RunRequest.schema, "run")
        except ProtocolError:
            return None
        if index:
            envs.insert(0, envs.pop(index))
        return RunRequest(**head, **more, env=env) if not more.keys() & head.keys() else (
            RunRequest(**{**head, **more, "env": env}))  # a field twice: the last one counts

    def _head(self, text: str, cut: int) -> dict[str, Any] | None:
        """The fields of ``text[:cut]`` (the request up to the comma before its ``env``),
        checked, without ``type``; or None: let :func:`decode` say what it is. Remembered
        by their text (the last ``KEPT``), so a head seen before is not read again."""
        heads = self.heads
        for index, (head_text, known) in enumerate(heads):
            if len(head_text) == cut and text.startswith(head_text):
                if index:
                    heads.insert(0, heads.pop(index))
                return known
        try:
            scanned, after = _SCAN(text[:cut] + "}", 0)
        except Exception:  # noqa: BLE001 - whatever it is, decode() words it
            return None
        fields: dict[str, Any] = scanned  # an object: the text begins with "{"
        if after != cut + 1 or fields.pop("type", None) != "run" or "env" in fields:
            return None
        if _has_surrogate_escape(text, 0, cut):
            return None
        try:
            _checked(fields, RunRequest.schema, "run")
        except ProtocolError:
            return None
        heads.insert(0, (text[:cut], fields))
        del heads[self.KEPT:]
        return fields

    def _fields(self, text: str) -> RunRequest | None:
        """``text`` read a field at a time; a new environment's text is remembered."""
        scan, scanstring, envs = _SCAN, _SCANSTRING, self.envs
        fields: dict[str, Any] = {}
        known: dict[str, str] | None = None  # the environment, when its text is known
        env_at = env_end = -1
        i = len(_RUN_START) - 1  # at the quote of the second field's name
        try:
            while True:
                if text[i] != '"':
                    return None
                name, i = scanstring(text, i + 1, True)
                if text[i] != ":" or name in fields:
                    return None
                i += 1
                if name == "env":
                    env_at = i
                    for index, (env_text, env) in enumerate(envs):
                        if text.startswith(env_text, i):
                            # A JSON object ends at its closing brace: the scanner would read
                            # exactly these characters, into an equal dictionary.
                            known = fields[name] = env
                            i += len(env_text)
                            if index:
                                envs.insert(0, envs.pop(index))
                            break
                    else:
                        fields[name], i = scan(text, i)
                    env_end = i
                else:
                    fields[name], i = scan(text, i)
                char = text[i]
                i += 1
                if char == "}":
                    break
                if char != ",":
                    return None
        except Exception:  # noqa: BLE001 - whatever it is, decode() words it
            return None
        if i != len(text) and text[i:].strip(_WHITESPACE):
            return None
        if known is not None:
            # The known environment's text was checked when it was first read.
            if _has_surrogate_escape(text, 0, env_at) or _has_surrogate_escape(
                    text, env_end, len(text)):
                return None
        elif _has_surrogate_escape(text, 0, len(text)):
            return None
        if "type" in fields:
            return None
        if known is not None:
            del fields["env"]
        try:
            _checked(fields, RunRequest.schema, "run")
        except ProtocolError:
            return None
        if known is not None:
            fields["env"] = known
        elif env_at >= 0 and env_end - env_at <= self.LONGEST:
            envs.insert(0, (text[env_at:env_end], fields["env"]))
            del envs[self.KEPT:]
        return RunRequest(**fields)


#: How the client writes a submission (``encode``): the type first, compact.
_RUN_START = b'{"type":"run","'


def _has_surrogate_escape(text: str, start: int, end: int) -> bool:
    """Could ``text[start:end]`` hold a surrogate? Only a ``\\uD...`` escape can carry one
    into a message (:func:`loads`)."""
    return text.find("\\ud", start, end) >= 0 or text.find("\\uD", start, end) >= 0


def loads(text: str) -> Any:
    """JSON that the daemon can keep: every string stands for bytes, every number is usable.

    Raises ProtocolError for invalid JSON, an integer of thousands of digits, or a string
    holding a lone surrogate (a ``\\ud800`` escape): such a string is no file name, argument
    or environment value, and could not be stored. Surrogates that stand for bytes which are
    not UTF-8 (U+DC80 to U+DCFF, as Python reads such file names and arguments) are kept.
    """
    try:
        obj = _json_loads(text)
    except (_Invalid, RecursionError) as exc:
        raise ProtocolError(f"message is not valid JSON: {exc}") from None
    except ValueError as exc:
        if hasattr(exc, "pos"):  # json's JSONDecodeError, from the C scanner
            raise ProtocolError(f"message is not valid JSON: {exc}") from None
        # An integer past int_max_str_digits.
        raise ProtocolError("message has a number of thousands of digits; numbers must fit "
                            "in 64 bits") from None
    if "\\ud" in text or "\\uD" in text:  # only an escape can carry a surrogate here
        _check_strings(obj, "message")
    return obj


def _check_strings(value: Any, where: str) -> None:
    if type(value) is str:
        try:
            value.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError as exc:
            char = value[exc.start]
            raise ProtocolError(
                f"{where} holds a lone surrogate (U+{ord(char):04X}), which stands for no "
                "byte of a name, argument or environment value; send the bytes instead"
            ) from None
    elif type(value) is list:
        for item in value:
            _check_strings(item, where)
    elif type(value) is dict:
        for name, item in value.items():
            _check_strings(name, where)
            _check_strings(item, f"field {name!r}" if where == "message" else where)


def _checked(obj: dict[str, Any], schema: dict[str, str], where: str) -> dict[str, Any]:
    """``obj``'s fields checked against ``schema``, with records made into their classes."""
    compiled = _COMPILED.get(id(schema))
    if compiled is None:
        compiled = _compile(schema)
    checks, records = compiled
    for name, value in obj.items():
        check = checks.get(name)
        if check is None:
            raise ProtocolError(f"{where}: unknown field {name!r}")
        # A plain type is checked inline (most fields are strings): no call per field.
        if not (type(value) is check if type(check) is type else check(value)):
            raise ProtocolError(f"{where}: field {name!r} must be {_DESCRIBE[schema[name]]}")
    for name, cls, shape in records:
        if name in obj:
            obj[name] = _record_field(cls, shape, obj[name], where, name)
    return obj


#: Per schema (by identity; schemas are class attributes): each field's check, and the fields
#: holding records with their class and shape. Built on first use.
_COMPILED: dict[int, tuple[dict[str, Any], list[tuple[str, type[Record], str]]]] = {}
#: Tags that a value passes exactly when its type is this one.
_EXACT: dict[str, type] = {_STR: str, _BOOL: bool}


def _compile(schema: dict[str, str]
             ) -> tuple[dict[str, Any], list[tuple[str, type[Record], str]]]:
    checks: dict[str, Any] = {}
    records = []
    for name, tag in schema.items():
        check = _EXACT.get(tag) or _CHECKS.get(tag)
        if check is None:  # a record: Name, Name? or list[Name]; checked while converted
            if tag.startswith("list["):
                records.append((name, _RECORDS[tag[5:-1]], "list"))
            elif tag.endswith("?"):
                records.append((name, _RECORDS[tag[:-1]], "optional"))
            else:
                records.append((name, _RECORDS[tag], "one"))
            check = _CHECKS[_ANY]
        checks[name] = check
    _COMPILED[id(schema)] = (checks, records)
    return checks, records


def _record_field(cls: type[Record], shape: str, value: Any, where: str, name: str) -> Any:
    """A field holding a record (``shape`` "one"), maybe none ("optional"), or a list."""
    if value is None and shape == "optional":
        return None
    here = f"{where}.{name}"
    if shape == "list":
        if type(value) is not list:
            raise ProtocolError(f"{here} must be a list of objects")
        return [_record(cls, item, here) for item in value]
    return _record(cls, value, here)


def _record(cls: type[Record], value: Any, where: str) -> Record:
    if isinstance(value, cls):
        return value
    if type(value) is not dict:
        raise ProtocolError(f"{where} must be an object")
    return cls(**_checked(value, cls.schema, where))


_RECORDS: dict[str, type[Record]] = {
    cls.__name__: cls for cls in (RunRecord, PendingRow, RunningRow, LastRun, KeyStatus)
}


_DESCRIBE = {
    _STR: "a string",
    _INT: "an integer of at most 64 bits",
    _NUM: "a number",
    _BOOL: "true or false",
    _OPT_STR: "a string or null",
    _OPT_NUM: "a number or null",
    _OPT_INT: "an integer or null",
    _STRS: "a list of strings",
    _ENV: "an object of string values",
    _ANY: "any value",
    _OBJ: "an object",
    _OBJS: "a list of objects",
    _COVERED: "a list of invocation ids, a number or null",
}


def _is_int(value: Any) -> bool:  # the journal stores integers in 64 bits
    return type(value) is int and -(2**63) <= value < 2**63


def _is_num(value: Any) -> bool:
    return type(value) is float or _is_int(value)


def _maybe(check: Check) -> Check:
    return lambda value: value is None or check(value)


#: One check per type tag. map() keeps the per-item checks in C: an environment has many items.
_CHECKS: dict[str, Check] = {
    _STR: lambda value: type(value) is str,
    _INT: _is_int,
    _NUM: _is_num,
    _BOOL: lambda value: type(value) is bool,
    _STRS: lambda value: type(value) is list and all(map(isinstance, value, repeat(str))),
    _ENV: lambda value: (
        type(value) is dict and all(map(isinstance, value.values(), repeat(str)))
    ),
    _ANY: lambda value: True,
    _OBJ: lambda value: type(value) is dict,
    _OBJS: lambda value: type(value) is list and all(map(isinstance, value, repeat(dict))),
    _COVERED: lambda value: value is None or _is_int(value) or (
        type(value) is list and all(_is_int(v) or type(v) is str for v in value)),
}
_CHECKS.update({tag + "?": _maybe(_CHECKS[tag]) for tag in (_STR, _INT, _NUM)})


def _valid(tag: str, value: Any) -> bool:
    return _CHECKS[tag](value)


# ------------------------------------------------------------- scheduling options
#: Option fields a RunRequest (or a stdin JSON line) may carry, with their types.
OPTION_FIELDS: dict[str, str] = {option.name: option.wire for option in FIELDS}


def check_options(options: dict[str, Any]) -> dict[str, Any]:
    """Validate a RunRequest's ``options`` object field by field."""
    for name, value in options.items():
        tag = OPTION_FIELDS.get(name)
        if tag is None:
            raise ProtocolError(f"run: unknown option {name!r}")
        if not _valid(tag, value):
            raise ProtocolError(f"run: option {name!r} must be {_DESCRIBE[tag]}")
        if tag in (_NUM, _OPT_NUM) and value is not None and not (0 <= value < 1e9):
            raise ProtocolError(f"run: option {name!r} must be between 0 and 1e9 seconds")
    return options


# ------------------------------------------------------------------ strings that are bytes
# Arguments, paths and keys are bytes; Python holds a byte that is not UTF-8 as a lone
# surrogate (U+DC80 to U+DCFF, "surrogateescape"). No JSON reader takes those, so what we
# print as JSON carries them another way, and messages show them as a shell would.
#: The suffix of the field that holds the exact bytes of a field that is not UTF-8.
B64 = "_b64"
#: The fields of a ``daemon --stdin`` JSON line that may come as bytes (``argv_b64``...).
BYTES_FIELDS = ("argv", "key", "cwd")


def _not_utf8(text: str) -> bool:
    if text.isascii():
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _b64(text: str) -> str:
    from binascii import b2a_base64

    return b2a_base64(text.encode("utf-8", "surrogateescape"), newline=False).decode("ascii")


def json_safe(value: Any) -> Any:
    """``value`` made fit for JSON output: valid UTF-8 and lossless.

    A string holding bytes that are not UTF-8 shows each such byte as U+FFFD (so it reads as
    text), and the object that holds it gets a sibling field ``NAME_b64`` with the exact
    bytes in base64 (for a list of strings, such as ``argv``: every item, in order). A string
    that is valid UTF-8 is left alone and has no sibling.
    """
    if type(value) is dict:
        out: dict[str, Any] = {}
        for name, item in value.items():
            out[name] = json_safe(item)
            if type(item) is str and _not_utf8(item):
                out[name + B64] = _b64(item)
            elif type(item) is list and any(type(x) is str and _not_utf8(x) for x in item):
                out[name + B64] = [_b64(x) if type(x) is str else x for x in item]
        return out
    if type(value) is list:
        return [json_safe(item) for item in value]
    if type(value) is str and _not_utf8(value):
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return value


def from_b64(obj: dict[str, Any], names: tuple[str, ...] = BYTES_FIELDS) -> dict[str, Any]:
    """``obj`` with each ``NAME_b64`` field (the exact bytes, as :func:`json_safe` writes
    them) put back as ``NAME``, the bytes held as Python holds them; it wins over a ``NAME``
    given too (which then is only for people). Raises ValueError naming a bad field."""
    from binascii import Error as Base64Error
    from binascii import a2b_base64

    def decoded(name: str, text: Any) -> str:
        if type(text) is not str:
            raise ValueError(f'"{name}{B64}" must hold base64 strings')
        try:
            return a2b_base64(text, strict_mode=True).decode("utf-8", "surrogateescape")
        except (Base64Error, ValueError):
            raise ValueError(f'"{name}{B64}" is not base64: {shown(text[:40])}') from None

    if not any(name + B64 in obj for name in names):
        return obj
    obj = dict(obj)
    for name in names:
        if name + B64 not in obj:
            continue
        value = obj.pop(name + B64)
        if type(value) is list:
            obj[name] = [decoded(name, item) for item in value]
        else:
            obj[name] = decoded(name, value)
    return obj


def shown(text: str) -> str:
    """``text`` quoted for a message, as ``repr`` does for plain text (``'make docs'``); one
    holding bytes that are not UTF-8 or control characters is written as bash's ``$'...'``
    (``$'k\\xe9y'``), which a shell turns back into the same bytes."""
    if text.isprintable() and not _not_utf8(text):
        return repr(text)
    out = []
    for char in text:
        code = ord(char)
        if 0xDC80 <= code <= 0xDCFF:
            out.append(f"\\x{code - 0xDC00:02x}")
        elif char in "\\'":
            out.append("\\" + char)
        elif not char.isprintable() or 0xD800 <= code <= 0xDFFF:
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"
                       if code < 0x10000 else f"\\U{code:08x}")
        else:
            out.append(char)
    return "$'" + "".join(out) + "'"


def shell_word(text: str) -> str:
    """``text`` as one shell word (``shlex.quote``), or as ``$'...'`` when it holds bytes
    that are not UTF-8 or control characters, for the commands that messages suggest."""
    quoted = shown(text)
    if quoted.startswith("$"):
        return quoted
    import shlex

    return shlex.quote(text)


#: The most of a command line a one-line message shows (it is elided past this).
MESSAGE_COMMAND = 200


def command_line(argv: list[str], limit: int | None = MESSAGE_COMMAND) -> str:
    """``argv`` as a shell command line for a message (:func:`shell_word` each), elided past
    ``limit`` characters: the start, then how much is left out (``echo xxx… [5,242,000
    more characters, 3 more arguments]``), so a line of megabytes stays one short line."""
    if limit is None or sum(len(arg) + 1 for arg in argv) <= limit // 2:
        return " ".join(shell_word(arg) for arg in argv)
    words: list[str] = []
    size = 0
    for index, arg in enumerate(argv):
        word = shell_word(arg[: limit + 1])
        if size + len(word) <= limit:
            words.append(word)
            size += len(word) + 1
            continue
        cut = word[: max(0, limit - size)]
        if cut:
            words.append(cut)
        hidden = sum(len(a) for a in argv[index + 1:]) + max(0, len(arg) - len(cut))
        left = len(argv) - index - 1
        more = f"{hidden:,} more characters"
        if left:
            more += f", {left:,} more argument{'s' if left != 1 else ''}"
        return " ".join(words) + f"… [{more}]"
    return " ".join(words)


#: A Python ``repr`` of a string holding a byte that is not UTF-8 (``'k\udce9y'``).
_REPR_WITH_BYTES = (r"""'(?:[^'\\]|\\.)*\\udc[89a-fA-F][0-9a-fA-F](?:[^'\\]|\\.)*'"""
                    r'''|"(?:[^"\\]|\\.)*\\udc[89a-fA-F][0-9a-fA-F](?:[^"\\]|\\.)*"''')


def readable(line: str) -> str:
    """A message as people should read it: a name that some layer wrote with ``repr``
    (``'k\\udce9y'``) is shown as bash quotes it (``$'k\\xe9y'``), and any other byte that
    is not UTF-8 as ``\\xNN``, never as a Python escape."""
    import ast
    import re

    def unrepr(match: re.Match[str]) -> str:
        try:
            return shown(ast.literal_eval(match.group(0)))
        except (ValueError, SyntaxError):
            return match.group(0)

    line = re.sub(_REPR_WITH_BYTES, unrepr, line)
    return "".join(f"\\x{ord(c) - 0xDC00:02x}" if 0xDC80 <= ord(c) <= 0xDCFF else c
                   for c in line)
