"""One client connection: framing, the hello, timeouts, the peer check, answers in order.

A connection carries one-shot requests one after the other, each dispatched through the
handler table (``handlers.HANDLERS``). A request whose answer waits for the journal commit
holds back the lines after it, so answers never overtake each other. A request that waits for
a run (``run`` with ``wait``, ``wait``) makes the connection a waiter of that run, and its last
request: the scheduler moves it along the chain of replacements like any waiter, and the run's
events go down the socket. Until the client has been told its invocation was accepted, those
events are held back, so the client always reads ``accepted`` first.

A connection that says nothing for ``READ_TIMEOUT`` seconds between requests is closed. An
Error answer ends the connection.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import BinaryIO

from debounce_cli import protocol
from debounce_cli.daemon import records
from debounce_cli.daemon.handlers import HANDLERS, Context
from debounce_cli.daemon.reading import SharedReader
from debounce_cli.logfile import HEADER_SIZE, NOTE, read_records
from debounce_cli.protocol import ProtocolError
from debounce_cli.scheduler import Invocation
from debounce_cli.states import BAD_REQUEST, REFUSED

#: A connection must send its hello and request within this many seconds.
READ_TIMEOUT = 10.0
#: At most this many connections at once (fewer when file descriptors are scarce, see
#: ServerState.max_connections); more are refused with a clear error.
MAX_CONNECTIONS = 1024
#: Bytes of unparsed requests held for all connections together; a connection that would
#: take more is refused (a request is at most protocol.MAX_MESSAGE).
MAX_BUFFERED = 64 * 1024 * 1024
#: Unsent output a waiting client may fall behind by before its copy stops, for a run that
#: keeps no log (see output()); with a log it catches up from the log instead.
OUTPUT_BACKLOG = 16 * 1024 * 1024
#: Unsent bytes past which a waiter stops getting live output and reads the log instead, and
#: below which it is sent more again (the transport's write buffer limits).
CATCHUP_HIGH = 1024 * 1024
CATCHUP_LOW = 256 * 1024


@dataclass(eq=False)
class ServerState:
    """What connections share with the server (uvicorn's ``ServerState``): no more."""

    loop: asyncio.AbstractEventLoop
    connections: int = 0
    max_connections: int = MAX_CONNECTIONS
    buffered: int = 0  # bytes of unparsed input held for all connections
    #: Reads every connection's requests (it remembers the last environments sent).
    decoder: protocol.RequestDecoder = field(default_factory=protocol.RequestDecoder)
    stopping: bool = False
    #: Called when a connection opens or closes, for the server's idle check.
    changed: Callable[[], None] = field(default=lambda: None)


class Connection(SharedReader):
    """A client on the socket; a :class:`~debounce_cli.daemon.waiters.Waiter` once it waits."""

    def __init__(self, state: ServerState, ctx: Context) -> None:
        self.state = state
        self.ctx = ctx
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.greeted = False
        self.owed = False  # an answer waits for the commit; later lines wait for it
        self.waiting = False  # waits for a run: no more requests on this connection
        self.acked = True
        self.held: list[bytes] = []
        self.closed = False
        self.finishing = False  # the waiter's last message is out (or held): close after it
        self.eof = False
        self.output_dropped = False
        self.run_id: int | None = None  # the run whose output this waiter gets
        self.log: str | None = None  # that run's output log
        self.paused = False  # the transport holds more than CATCHUP_HIGH unsent bytes
        self.catchup: BinaryIO | None = None  # reading the log instead of live output
        #: Output that came while catching up after the log stopped (a full disk): sent when
        #: the log is exhausted, up to OUTPUT_BACKLOG bytes; past that it is lost, and said.
        self.tail: list[bytes] = []
        self.tail_size = 0
        self.log_stopped: str | None = None  # the run's log stopped early: why, if known
        self.last: protocol.Message | None = None  # the end, held until caught up
        self.timer: asyncio.TimerHandle | None = None
        self.active = 0.0  # loop time of the last request or answer

    # ---------------------------------------------------------------- asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=CATCHUP_HIGH, low=CATCHUP_LOW)
        self.state.connections += 1
        self.state.changed()
        if not _peer_allowed(transport):
            self.refuse("permission denied: this daemon serves only its owner's uid", REFUSED)
        elif self.state.connections > self.state.max_connections:
            self.refuse(f"too many connections (at most {self.state.max_connections}); "
                        "retry in a moment", REFUSED)
        else:
            self._arm()

    def data_received(self, data: bytes) -> None:
        if self.closed or self.waiting:
            return  # a waiting client has nothing more to say; only its going away counts
        state = self.state
        if state.buffered + len(data) > MAX_BUFFERED:
            self.refuse("the daemon holds too much unfinished input from other clients; "
                        "retry in a moment", REFUSED)
            return
        self.buffer += data
        state.buffered += len(data)
        self._process()

    def eof_received(self) -> bool:
        if self.waiting:
            self._gone()  # the client went away (Ctrl-C): stop waiting, the run goes on
            return False
        self.eof = True  # the client has said all it will; answer what it asked, then close
        if not self.owed:
            self.close()
        return True

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self.catchup is not None:
            self._pump()

    def connection_lost(self, exc: Exception | None) -> None:
        self._gone()
        self._disarm()
        self.state.connections -= 1
        self.state.changed()

    # ---------------------------------------------------------------- requests
    def _process(self) -> None:
        while not (self.owed or self.waiting or self.closed):
            newline = self.buffer.find(b"\n")
            if newline < 0:
                if len(self.buffer) > protocol.MAX_MESSAGE:
                    self.refuse(f"message exceeds the limit of {protocol.MAX_MESSAGE} bytes")
                return
            line = bytes(self.buffer[: newline + 1])
            del self.buffer[: newline + 1]
            self.state.buffered -= newline + 1
            self._arm()
            try:
                request = self.state.decoder.decode(line)
            except ProtocolError as exc:
                self.refuse(str(exc))
                return
            try:
                self._request(request)
            except Exception as exc:  # noqa: BLE001 - one bad request must not end the daemon
                import traceback

                traceback.print_exc()
                self.refuse(f"internal error: {type(exc).__name__}: {exc}", REFUSED)
                return

    def _request(self, request: protocol.Message) -> None:
        if not self.greeted:
            self._hello(request)
            return
        if self.state.stopping:
            self.refuse("the daemon is shutting down; retry", REFUSED)
            return
        handler = HANDLERS.get(type(request))
        if handler is None:
            self.refuse(f"{request.type} is not a request")
            return
        reply = handler(self.ctx, self, request)
        if isinstance(reply, protocol.Error):
            self.refuse(reply.message, reply.code)
        elif reply is not None:
            self.write(reply)

    def _hello(self, request: protocol.Message) -> None:
        if not isinstance(request, protocol.Hello):
            self.refuse("expected a hello message first")
        elif request.version != protocol.VERSION:
            self.refuse(
                f"protocol version {request.version} is not supported by this daemon "
                f"(version {protocol.VERSION}); run 'debounce stop' and retry",
                REFUSED,
            )
        else:
            self.greeted = True
            self.write(protocol.HelloReply(pid=os.getpid()))

    # ---------------------------------------------------------------- what handlers ask
    def owe(self, wait: bool) -> None:
        """The answer comes after the commit; with ``wait`` this connection then waits."""
        self.owed = True
        if wait:
            self.wait_for_runs(acked=False)

    def wait_for_runs(self, acked: bool) -> None:
        """From now on this connection is a waiter; it stops reading requests."""
        self.waiting = True
        self.acked = acked
        self._disarm()

    def answered(self, msg: protocol.Message) -> None:
        """The answer owed after the commit: send it, then go on with the lines held back."""
        if self.waiting and isinstance(msg, protocol.Error):
            self.owed = False
            self.refuse(msg.message, msg.code)
            self.ctx.core.detach(self)
            return
        self._answer(protocol.encode(msg))

    def accepted(self, inv: Invocation, now: float) -> None:
        """The submission is accepted (the answer of most requests, made straight as bytes)."""
        self._answer(records.accepted_line(inv, now))

    def _answer(self, line: bytes) -> None:
        self.owed = False
        if not self.closed and self.transport is not None:
            self.transport.write(line)
        if self.waiting:
            self.acked = True
            held, self.held = self.held, []
            for event in held:
                self.raw(event)
            if self.finishing:
                self.close()
            return
        self._arm()
        self._process()
        if self.eof and not self.owed:
            self.close()

    # ---------------------------------------------------------------- waiter interface
    def send(self, msg: protocol.Message) -> None:
        self.raw(protocol.encode(msg))

    def raw(self, line: bytes) -> None:
        if self.closed:
            return
        if not self.acked:
            self.held.append(line)
            return
        assert self.transport is not None
        self.transport.write(line)

    def follows(self, run_id: int) -> bool:
        return self.run_id == run_id

    def start(self, run_id: int, line: bytes, log: str | None) -> None:
        self.run_id = run_id
        self.log = log
        self.raw(line)

    def replay(self, so_far: Callable[[], Iterable[tuple[int, bytes]]]) -> None:
        """Output from before this waiter joined: read from the log at its pace, else sent."""
        if self.log is not None:
            self._catch_up_from(0)
            return
        for fd, data in so_far():
            self.output(fd, data, records.output_line(fd, data), None)

    def output(self, fd: int, data: bytes, line: bytes, end: int | None) -> None:
        """A chunk of the run's output, sent at once unless this client has fallen behind.

        A client that falls behind (a slow pipe, a pager) must not make the daemon hold the
        output in memory, and must not lose any of it: once more than CATCHUP_HIGH bytes wait
        to be sent, live output stops and the client is fed from the run's log as fast as it
        reads, back to live output when it has caught up. For a run without a log, past
        OUTPUT_BACKLOG unsent bytes its copy stops, and it is told so at the end.
        """
        if end is None and self.log is not None and self.log_stopped is None:
            self.log_stopped = ""  # the log keeps no more of the run's output
        if self.catchup is not None:
            if end is None:  # not in the log: it follows what the catch-up reads from there
                if self.tail_size + len(line) > OUTPUT_BACKLOG:
                    self.output_dropped = True
                else:
                    self.tail.append(line)
                    self.tail_size += len(line)
            return  # in the log: the catch-up reads it in turn
        transport = self.transport
        if transport is None:
            return
        if self.paused and end is not None and self.log is not None:
            self._catch_up_from(end - HEADER_SIZE - len(data))
            return
        if transport.get_write_buffer_size() > OUTPUT_BACKLOG:
            self.output_dropped = True
            return
        self.raw(line)

    def finish(self, msg: protocol.Message) -> None:
        if self.catchup is not None:
            self.last = msg  # after the output it has not had yet
            return
        self.finishing = True
        if self.output_dropped and isinstance(msg, protocol.Finished):
            if self.log_stopped is not None:
                why = self.log_stopped or "the run's log could not keep it"
                note = (f"debounce: some of the output of run {msg.run_id} was lost: this "
                        f"client read too slowly and {why}\n")
            else:
                note = (f"debounce: this client read too slowly and missed some of the "
                        f"output; 'debounce logs {msg.run_id}' has all of it\n")
            self.raw(records.output_line(2, note.encode("utf-8", "backslashreplace")))
        self.send(msg)
        if self.acked:
            self.close()

    def _catch_up_from(self, offset: int) -> None:
        assert self.log is not None
        try:
            f = open(self.log, "rb")  # noqa: SIM115 - closed when caught up or gone
            f.seek(offset)
        except OSError:
            self.output_dropped = True  # the log is gone: say so at the end
            return
        self.catchup = f
        if not self.paused:
            self._pump()

    def _pump(self) -> None:
        """Send from the log until the transport is full again, or the log's end is reached."""
        f = self.catchup
        assert f is not None
        while not self.paused and not self.closed:
            chunks = read_records(f, CATCHUP_LOW)
            if not chunks:  # all that was written so far is sent: live output from here
                self._end_catchup()
                tail, self.tail, self.tail_size = self.tail, [], 0
                for line in tail:  # what came after the log stopped
                    self.raw(line)
                if self.last is not None:
                    last, self.last = self.last, None
                    self.finish(last)
                return
            for fd, data, _end in chunks:
                if fd == NOTE:  # where and why the log stops: not the run's output
                    self.log_stopped = _reason(data)
                    continue
                self.raw(records.output_line(fd, data))

    def _end_catchup(self) -> None:
        if self.catchup is not None:
            self.catchup.close()
            self.catchup = None

    # ---------------------------------------------------------------- helpers
    def write(self, msg: protocol.Message) -> None:
        if not self.closed and self.transport is not None:
            self.transport.write(protocol.encode(msg))

    def refuse(self, message: str, code: str = BAD_REQUEST) -> None:
        """Answer with an error and close: used for anything malformed or not allowed."""
        self.write(protocol.Error(message=message, code=code))
        self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._drop_buffer()
            self._disarm()
            if self.transport is not None:
                self.transport.close()  # after what was written has been sent

    def _drop_buffer(self) -> None:
        self.state.buffered -= len(self.buffer)
        self.buffer = bytearray()
        self._end_catchup()

    def _gone(self) -> None:
        if not self.closed:
            self.closed = True
            self._drop_buffer()
            if self.waiting:
                self.ctx.core.detach(self)  # Ctrl-C: the invocation stays

    def _arm(self) -> None:
        """Note activity. One timer per connection checks it, so requests never touch timers."""
        loop = self.state.loop
        self.active = loop.time()
        if self.timer is None and not (self.waiting or self.closed):
            self.timer = loop.call_at(self.active + READ_TIMEOUT, self._timed_out)

    def _disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _timed_out(self) -> None:
        self.timer = None
        if self.owed or self.waiting or self.closed:
            return
        loop = self.state.loop
        if loop.time() - self.active >= READ_TIMEOUT:
            self.refuse(f"no request within {READ_TIMEOUT:g}s; closing")
        else:
            self.timer = loop.call_at(self.active + READ_TIMEOUT, self._timed_out)


def _reason(note: bytes) -> str:
    """Why a log stopped, from its NOTE record, worded to follow "this client read too
    slowly and"."""
    text = note.decode("utf-8", "replace").strip()
    why = text.partition("stops here: ")[2].partition("; later output")[0]
    return f"the run's log stopped: {why}" if why else "the run's log could not keep it"


def _peer_allowed(transport: asyncio.BaseTransport) -> bool:
    """The kernel's word on who connected (SO_PEERCRED): only our own uid gets in."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return False
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return False
    _pid, uid, _gid = struct.unpack("3i", creds)
    return bool(uid == os.getuid())


__all__ = ["MAX_CONNECTIONS", "READ_TIMEOUT", "Connection", "ServerState"]
