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
from collections.abc import Callable
from dataclasses import dataclass, field

from debounce_cli import protocol
from debounce_cli.daemon import records
from debounce_cli.daemon.handlers import HANDLERS, Context
from debounce_cli.protocol import ProtocolError
from debounce_cli.states import BAD_REQUEST, REFUSED

#: A connection must send its hello and request within this many seconds.
READ_TIMEOUT = 10.0
#: At most this many connections at once; more are refused with a clear error.
MAX_CONNECTIONS = 1024
#: Unsent output a waiting client may fall behind by before its copy stops (see output()).
OUTPUT_BACKLOG = 16 * 1024 * 1024


@dataclass(eq=False)
class ServerState:
    """What connections share with the server (uvicorn's ``ServerState``): no more."""

    loop: asyncio.AbstractEventLoop
    connections: int = 0
    stopping: bool = False
    #: Called when a connection opens or closes, for the server's idle check.
    changed: Callable[[], None] = field(default=lambda: None)


class Connection(asyncio.Protocol):
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
        self.timer: asyncio.TimerHandle | None = None
        self.active = 0.0  # loop time of the last request or answer

    # ---------------------------------------------------------------- asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.state.connections += 1
        self.state.changed()
        if not _peer_allowed(transport):
            self.refuse("permission denied: this daemon serves only its owner's uid", REFUSED)
        elif self.state.connections > MAX_CONNECTIONS:
            self.refuse("too many connections; try again", REFUSED)
        else:
            self._arm()

    def data_received(self, data: bytes) -> None:
        if self.closed or self.waiting:
            return  # a waiting client has nothing more to say; only its going away counts
        self.buffer += data
        self._process()

    def eof_received(self) -> bool:
        if self.waiting:
            self._gone()  # the client went away (Ctrl-C): stop waiting, the run goes on
            return False
        self.eof = True  # the client has said all it will; answer what it asked, then close
        if not self.owed:
            self.close()
        return True

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
            self._arm()
            try:
                request = protocol.decode(line, protocol.REQUESTS)
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
        self.owed = False
        if self.waiting:
            if isinstance(msg, protocol.Error):
                self.refuse(msg.message, msg.code)
                self.ctx.core.detach(self)
                return
            self.acked = True
            self.write(msg)
            held, self.held = self.held, []
            for line in held:
                self.raw(line)
            if self.finishing:
                self.close()
            return
        self.write(msg)
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

    def start(self, run_id: int, line: bytes) -> None:
        self.run_id = run_id
        self.raw(line)

    def output(self, fd: int, data: bytes, line: bytes) -> None:
        """A chunk of the run's output, unless this client has fallen too far behind.

        A client that stops reading (a pager, a suspended terminal) must not make the daemon
        hold the whole output in memory: past OUTPUT_BACKLOG unsent bytes its copy stops, it
        is told so at the end, and the full output stays in the run's log.
        """
        transport = self.transport
        if transport is not None and transport.get_write_buffer_size() > OUTPUT_BACKLOG:
            self.output_dropped = True
            return
        self.raw(line)

    def finish(self, msg: protocol.Message) -> None:
        self.finishing = True
        if self.output_dropped and isinstance(msg, protocol.Finished):
            note = (f"debounce: this client read too slowly and missed some of the output; "
                    f"'debounce logs {msg.run_id}' has all of it\n").encode()
            self.raw(records.output_line(2, note))
        self.send(msg)
        if self.acked:
            self.close()

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
            self._disarm()
            if self.transport is not None:
                self.transport.close()  # after what was written has been sent

    def _gone(self) -> None:
        if not self.closed:
            self.closed = True
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
