"""A lean connection to Redis for the fleet's hot path: the steps' script calls and the
reader's notices. Commands are packed here and written straight to the transport; the
replies are parsed in ``data_received`` and handed out in order, with no stream reader, pool,
retry wrapper or per-read timeout in between (redis-py's, which cost a fleet submission
several times what the rules and the script do; ``store`` keeps redis-py for everything
else, and for a Redis Cluster or TLS).

A connection that fails, closes, or leaves a command unanswered for ``timeout`` fails every
command in flight with ``Lost`` (the store may have applied them) and is replaced at the next
command; one that could not be opened fails them with ``Unsent`` (nothing was applied).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Any, NamedTuple

from debounce_cli.daemon.reading import SharedReader

#: A connection unused this long is opened anew before the next command (a NAT or a
#: firewall may have dropped it without a word; redis-py's health check, without its PING).
IDLE_REOPEN = 30.0


class ReplyError(Exception):
    """An error reply (``-ERR ...``, ``-NOSCRIPT ...``): the command failed, the connection
    stands."""


class Lost(ConnectionError):
    """The connection failed with commands in flight: the store may have applied them."""


class Unsent(ConnectionError):
    """No connection could be made: nothing was sent (the message says "connecting to")."""


class Address(NamedTuple):
    host: str | None = None
    port: int = 6379
    path: str | None = None  # a Unix socket
    username: str | None = None
    password: str | None = None
    db: int = 0


def pack(args: tuple[Any, ...] | list[Any]) -> bytes:
    """One command in RESP (strings as UTF-8, numbers as ``str`` writes them)."""
    out = [b"*%d\r\n" % len(args)]
    add = out.append
    for arg in args:
        kind = type(arg)
        data = arg if kind is bytes else arg.encode() if kind is str else str(arg).encode()
        add(b"$%d\r\n" % len(data))
        add(data)
        add(b"\r\n")
    return b"".join(out)


_INCOMPLETE = object()


def parse(buf: bytearray, pos: int) -> tuple[Any, int]:
    """One reply from ``buf`` at ``pos`` and where the next starts; ``_INCOMPLETE`` when
    the buffer does not hold all of it yet. Bulk strings are bytes, integers ints, a nil
    None, an error reply a ``ReplyError`` (RESP2: we never say HELLO 3)."""
    end = buf.find(b"\r\n", pos)
    if end < 0:
        return _INCOMPLETE, pos
    kind = buf[pos]
    if kind == 36:  # $ bulk string
        n = int(buf[pos + 1:end])
        if n < 0:
            return None, end + 2
        stop = end + 2 + n
        if len(buf) < stop + 2:
            return _INCOMPLETE, pos
        return bytes(buf[end + 2:stop]), stop + 2
    if kind == 58:  # : integer
        return int(buf[pos + 1:end]), end + 2
    if kind == 42:  # * array
        n = int(buf[pos + 1:end])
        if n < 0:
            return None, end + 2
        items = []
        at = end + 2
        for _ in range(n):
            item, at = parse(buf, at)
            if item is _INCOMPLETE:
                return _INCOMPLETE, pos
            items.append(item)
        return items, at
    if kind == 43:  # + simple string
        return bytes(buf[pos + 1:end]), end + 2
    if kind == 45:  # - error
        return ReplyError(buf[pos + 1:end].decode(errors="replace")), end + 2
    raise Lost(f"unexpected reply from the store: {bytes(buf[pos:end + 2])[:40]!r}")


class _Protocol(SharedReader):  # (reads into the daemon's one buffer)
    def __init__(self, wire: Wire) -> None:
        self.wire = wire
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        pos = 0
        try:
            while pos < len(buf):
                reply, pos = parse(buf, pos)
                if reply is _INCOMPLETE:
                    break
                self.wire.replied(reply)
        except (ValueError, Lost) as exc:
            self.wire.failed(self, Lost(f"the store's reply could not be read ({exc})"))
            return
        del buf[:pos]

    def connection_lost(self, exc: Exception | None) -> None:
        self.wire.failed(self, Lost(f"the connection to the store was lost ({exc or 'closed'})"))


class _Batch:
    """Commands written together, answered together."""

    __slots__ = ("answer", "count", "replies", "sent")

    def __init__(self, answer: asyncio.Future[list[Any]], count: int, sent: float) -> None:
        self.answer = answer
        self.count = count
        self.replies: list[Any] = []
        self.sent = sent


class Wire:
    """One connection, opened when first needed. ``call`` writes commands and waits for
    their replies, in order; a subscriber connection (``push=True``) instead queues every
    reply for ``message`` (what a subscribed connection gets: confirmations and messages)."""

    def __init__(self, address: Address, name: str, timeout: float = 5.0,
                 connect_timeout: float = 3.0, push: bool = False) -> None:
        self.address = address
        self.name = name
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.push = push
        self.transport: asyncio.Transport | None = None
        self.protocol: _Protocol | None = None
        self.batches: deque[_Batch] = deque()
        self.messages: deque[Any] = deque()
        self.heard: asyncio.Future[None] | None = None  # a reader waiting for a message
        self.opening: asyncio.Future[None] | None = None
        self.watchdog: asyncio.TimerHandle | None = None
        self.used = 0.0
        self.opened = False  # (a connection was made once)
        #: A subscriber's messages go here as they come, rather than to ``message``.
        self.on_push: Callable[[Any], None] | None = None

    # ------------------------------------------------------------------ connection
    async def _open(self) -> asyncio.Transport:
        loop = asyncio.get_running_loop()
        if self.transport is not None and not self.batches and not self.push and (
                loop.time() - self.used > IDLE_REOPEN):
            self._drop(self.transport)  # long unused: a fresh one rather than a dead one
        if self.transport is not None:
            return self.transport
        if self.push and self.opened:
            # A subscriber's connection is never replaced here: a new one would hold only
            # the channels named from now on. Its reader starts a new subscriber instead.
            raise Lost(f"the subscriber's connection to the store {self.name} was lost")
        if self.opening is not None:
            await asyncio.shield(self.opening)
            if self.transport is None:
                raise Unsent(f"Error connecting to {self.name}: the connection failed")
            return self.transport
        self.opening = loop.create_future()
        try:
            transport = await asyncio.wait_for(self._connect(), self.connect_timeout)
        except BaseException as exc:
            self.opening.set_result(None)
            self.opening = None
            if self.protocol is not None:  # (opened, but its AUTH or SELECT did not answer)
                self.failed(self.protocol, Lost("the connection was not set up"))
            if isinstance(exc, (OSError, ReplyError)):
                reason = ("timed out" if isinstance(exc, TimeoutError) else
                          (exc.strerror or str(exc)) if isinstance(exc, OSError) else str(exc))
                raise Unsent(f"Error connecting to {self.name}: {reason}") from exc
            raise
        self.transport = transport
        self.opened = True
        self.opening.set_result(None)
        self.opening = None
        return transport

    async def _connect(self) -> asyncio.Transport:
        loop = asyncio.get_running_loop()
        address = self.address
        protocol = _Protocol(self)
        if address.path is not None:
            transport, _ = await loop.create_unix_connection(lambda: protocol, address.path)
        else:
            transport, _ = await loop.create_connection(
                lambda: protocol, address.host or "localhost", address.port)
        self.protocol = protocol
        hello: list[tuple[Any, ...]] = []
        if address.password is not None:
            hello.append(("AUTH", address.username, address.password) if address.username
                         else ("AUTH", address.password))
        if address.db:
            hello.append(("SELECT", address.db))
        if hello:
            for reply in await self._write(transport, hello):
                if isinstance(reply, ReplyError):
                    raise reply  # (the connection is closed by _open)
        assert isinstance(transport, asyncio.Transport)
        return transport

    def _write(self, transport: asyncio.BaseTransport, commands: list[tuple[Any, ...]]
               ) -> asyncio.Future[list[Any]]:
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[list[Any]] = loop.create_future()
        now = loop.time()
        self.used = now
        if not self.push:
            self.batches.append(_Batch(answer, len(commands), now))
            if self.watchdog is None:
                self.watchdog = loop.call_at(now + self.timeout, self._check)
        else:
            answer.set_result([])
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(b"".join(pack(command) for command in commands))
        return answer

    def _check(self) -> None:
        """A command unanswered for ``timeout``: the connection counts as failed."""
        self.watchdog = None
        if not self.batches or self.transport is None:
            return
        loop = asyncio.get_running_loop()
        due = self.batches[0].sent + self.timeout
        if loop.time() >= due:
            self.failed(self.protocol, Lost(f"the store {self.name} did not answer in "
                                            f"{self.timeout:g}s"), timed_out=True)
        else:
            self.watchdog = loop.call_at(due, self._check)

    def _drop(self, transport: asyncio.BaseTransport) -> None:
        if self.transport is transport:
            self.transport = None
            self.protocol = None
        transport.close()

    # ------------------------------------------------------------------ replies
    def replied(self, reply: Any) -> None:
        if self.push:
            if self.on_push is not None:  # heard as it comes: nothing queued, nobody woken
                self.on_push(reply)
                return
            self.messages.append(reply)
            self.wake()
            return
        if not self.batches:
            return  # (an answer to a command whose batch has failed already)
        batch = self.batches[0]
        batch.replies.append(reply)
        if len(batch.replies) == batch.count:
            self.batches.popleft()
            if not batch.answer.done():
                batch.answer.set_result(batch.replies)

    def failed(self, protocol: _Protocol | None, exc: Exception, timed_out: bool = False
               ) -> None:
        """The connection (of ``protocol``) is done for: every command in flight fails."""
        if protocol is None or protocol is not self.protocol:
            return  # an older connection's last words
        self.transport = None
        self.protocol = None
        if protocol.transport is not None:
            protocol.transport.abort()
        batches, self.batches = self.batches, deque()
        for batch in batches:
            if not batch.answer.done():
                batch.answer.set_exception(TimeoutError(str(exc)) if timed_out else exc)
        if self.heard is not None and not self.heard.done():
            self.heard.set_exception(exc)
        if self.watchdog is not None:
            self.watchdog.cancel()
            self.watchdog = None

    # ------------------------------------------------------------------ the interface
    async def call(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """The replies to ``commands`` (error replies as ``ReplyError`` values), in order."""
        transport = await self._open()
        return await self._write(transport, commands)

    async def send(self, commands: list[tuple[Any, ...]]) -> None:
        """Write ``commands`` to a subscriber connection (their confirmations come as
        messages)."""
        transport = await self._open()
        self._write(transport, commands)

    async def message(self, timeout: float) -> Any:
        """The next reply a subscriber connection got, waiting up to ``timeout`` (None when
        none came)."""
        if not self.messages and timeout > 0:
            await self.wait(timeout)
        return self.messages.popleft() if self.messages else None

    async def wait(self, timeout: float) -> None:
        """Wait up to ``timeout`` for ``wake`` (a subscriber whose messages go to
        ``on_push``); fails if the connection is or gets lost."""
        if self.transport is None:
            raise Lost(f"the connection to the store {self.name} is closed")
        loop = asyncio.get_running_loop()
        heard = self.heard = loop.create_future()
        # (a timer that ends the wait, not wait_for: this runs at every notice)
        timer = loop.call_later(timeout, _wake, heard)
        try:
            await heard
        finally:
            timer.cancel()
            self.heard = None

    def wake(self) -> None:
        """End a ``wait`` or ``message`` under way (if any)."""
        if self.heard is not None and not self.heard.done():
            self.heard.set_result(None)

    def close(self) -> None:
        if self.transport is not None:
            self._drop(self.transport)
        if self.protocol is not None:
            self.protocol = None


def _wake(waiting: asyncio.Future[None]) -> None:
    if not waiting.done():
        waiting.set_result(None)


class Subscriber:
    """A subscriber connection on a ``Wire``, with the calls of redis-py's ``PubSub`` that the
    reader of events makes (``notices``), and its messages as redis-py gives them."""

    def __init__(self, address: Address, name: str,
                 on_message: Callable[[Any], None] | None = None) -> None:
        self.wire = Wire(address, name, push=True)
        self.wire.on_push = on_message

    async def subscribe(self, *channels: str) -> None:
        await self.wire.send([("SUBSCRIBE", *channels)])

    async def unsubscribe(self, *channels: str) -> None:
        await self.wire.send([("UNSUBSCRIBE", *channels)])

    async def get_message(self, timeout: float = 0.0) -> dict[str, Any] | None:
        """The next confirmation or message, waiting up to ``timeout`` (None: none came)."""
        reply = await self.wire.message(timeout)
        if not isinstance(reply, list) or len(reply) != 3:
            return None
        kind, channel, data = reply
        return {"type": kind.decode() if isinstance(kind, bytes) else str(kind),
                "pattern": None, "channel": channel, "data": data}

    async def aclose(self) -> None:
        self.wire.close()
