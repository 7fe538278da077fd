"""How the steps' script calls reach the store: one batch in flight at a time, and the steps
that come meanwhile together in the next; on the steps' own connection (``wire.Wire``), or
through redis-py's pipeline on a Redis Cluster or over TLS. ``Store`` is built on it.
"""

from __future__ import annotations

import asyncio
from typing import Any, NamedTuple

from redis.asyncio.connection import UnixDomainSocketConnection, parse_url
from redis.exceptions import NoScriptError, ResponseError

from debounce_cli.daemon.fleet.layout import STEP, STEP_SHA
from debounce_cli.daemon.fleet.wire import Address, ReplyError, Wire

#: Steps sent in one pipeline, at most.
BATCH = 256


class _Call(NamedTuple):
    """One step's script call, waiting for the next pipeline."""

    keys: list[str]
    args: list[Any]
    answer: asyncio.Future[Any]


class Pipeline:
    """The steps' calls waiting to go (``calls``), the batch in flight, and the connection
    they go on (``wire``, or ``redis`` where the wire cannot go)."""

    redis: Any

    def __init__(self) -> None:
        self.wire: Wire | None = None
        self.calls: list[_Call] = []  # steps waiting for the batch in flight
        self.sending = False
        self.sender: asyncio.Future[None] | None = None

    def _wire_for(self, url: str, name: str, cluster: bool) -> None:
        """The steps' own connection, once the store is known not to be a cluster (the
        first of the steps that learnt it at once makes it)."""
        address = None if cluster else _address(url)
        if self.wire is None and address is not None:
            self.wire = Wire(address, name)

    def _measured(self, sec: Any, usec: Any) -> float:
        raise NotImplementedError

    def _call(self, keys: list[str], args: list[Any]) -> asyncio.Future[Any]:
        """The step's script call, in the next pipeline (one at a time is in flight; the
        steps that come meanwhile go together in the next)."""
        answer: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.calls.append(_Call(keys, args, answer))
        if not self.sending:
            self.sending = True
            self.sender = asyncio.ensure_future(self._send())
        return answer

    async def _send(self) -> None:
        calls: list[_Call] = []
        try:
            while self.calls:
                calls, self.calls = self.calls[:BATCH], self.calls[BATCH:]
                try:
                    replies = await self._pipeline(calls, sha=True)
                    again = [i for i, r in enumerate(replies) if isinstance(r, NoScriptError)]
                    if again:  # a store that restarted has forgotten the script
                        redone = await self._pipeline([calls[i] for i in again], sha=False)
                        for i, reply in zip(again, redone, strict=True):
                            replies[i] = reply
                except Exception as exc:  # noqa: BLE001 - each step hears it
                    for call in calls:
                        if not call.answer.done():
                            call.answer.set_exception(exc)
                    continue
                for call, reply in zip(calls, replies, strict=True):
                    if call.answer.done():
                        continue
                    if isinstance(reply, Exception):
                        call.answer.set_exception(reply)
                    else:
                        self._measured(reply[1], reply[2])
                        call.answer.set_result(reply)
                calls = []
        finally:
            self.sending = False
            for call in calls + self.calls:  # cancelled (the daemon stops)
                call.answer.cancel()
            self.calls = []

    async def _pipeline(self, calls: list[_Call], sha: bool) -> list[Any]:
        if self.wire is not None:
            replies = await self.wire.call([
                ("EVALSHA" if sha else "EVAL", STEP_SHA if sha else STEP, len(call.keys),
                 *call.keys, *call.args) for call in calls])
            return [_error(r) if isinstance(r, ReplyError) else r for r in replies]
        async with self.redis.pipeline(transaction=False) as pipe:
            for call in calls:
                if sha:
                    pipe.evalsha(STEP_SHA, len(call.keys), *call.keys, *call.args)
                else:
                    pipe.eval(STEP, len(call.keys), *call.keys, *call.args)
            return list(await pipe.execute(raise_on_error=False))


def _address(url: str) -> Address | None:
    """Where the steps' own connection goes (None: a URL with more than it understands, such
    as TLS; redis-py serves it)."""
    found: dict[str, Any] = dict(parse_url(url))
    kind = found.pop("connection_class", None)
    if kind not in (None, UnixDomainSocketConnection) or not set(found) <= set(Address._fields):
        return None
    return Address(**found)


def _error(reply: ReplyError) -> Exception:
    text = str(reply)
    return NoScriptError(text) if text.startswith("NOSCRIPT") else ResponseError(text)
