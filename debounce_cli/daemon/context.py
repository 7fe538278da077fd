"""What a request handler sees of the daemon (:class:`Context`) and of the connection its
request came on (:class:`Client`), and the ways its answer may wait for the fleet's store.
Handlers see nothing else, so their tests need neither sockets nor a loop.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from debounce_cli import protocol
from debounce_cli.daemon.core import Core
from debounce_cli.daemon.waiters import Submitter, Waiter
from debounce_cli.states import NOT_FOUND, REFUSED

TYPE_CHECKING = False
if TYPE_CHECKING:
    from debounce_cli.daemon.fleet.coordinator import Fleet


@dataclass(eq=False)
class Context:
    """What request handlers may use of the daemon."""

    core: Core
    jobs: int | None  # the daemon's --jobs, for status
    shutdown: Callable[[], None]  # SIGTERM's way out (``debounce stop``)
    fleet: Fleet | None = None  # with a store (--store, DEBOUNCE_STORE)


class Client(Waiter, Submitter, Protocol):
    """What handlers may do with the connection a request came on."""

    def owe(self, wait: bool) -> None: ...

    def wait_for_runs(self, acked: bool) -> None: ...

    def send(self, msg: protocol.Message) -> None: ...

    def close(self) -> None: ...


Reply = protocol.Message | None


NO_STORE = ("--fleet needs a store: set DEBOUNCE_STORE=redis://host:port/db (this daemon was "
            "started without one: 'debounce stop' first)")
#: The same for a ``daemon --stdin`` line: that daemon is the user's own foreground process,
#: so the way out is an option of it, not ``debounce stop``.
NO_STORE_STDIN = ('"fleet": true needs a store: start this daemon with --store '
                  "redis://host:port/db (or with DEBOUNCE_STORE set)")


def later(ctx: Context, client: Client, answer: Callable[[], Awaitable[protocol.Message]]
          ) -> Reply:
    """Answer a request once the store has been asked (a fleet key); the connection holds
    its next request until then. The store being down is a refusal (116)."""
    from debounce_cli.daemon.fleet.layout import StoreDown

    async def ask() -> None:
        try:
            reply = await answer()
        except StoreDown as exc:
            reply = protocol.Error(message=str(exc), code=REFUSED)
        client.answered(reply)

    client.owe(wait=False)
    assert ctx.fleet is not None
    ctx.fleet.spawn(ask())
    return None


def follow_in_fleet(ctx: Context, client: Client,
                    ask: Callable[[Fleet], Awaitable[protocol.Message | None]]) -> Reply:
    """A wait on something only the fleet knows: ``ask`` files the client as a waiter there
    (``None``) or answers (a run's result, or an Error that ends the connection); the store
    being down is a refusal (116)."""
    from debounce_cli.daemon.fleet.layout import StoreDown

    fleet = ctx.fleet
    assert fleet is not None
    client.wait_for_runs(acked=True)

    async def follow() -> None:
        try:
            reply = await ask(fleet)
        except StoreDown as exc:
            reply = protocol.Error(message=str(exc), code=REFUSED)
        if isinstance(reply, protocol.Error):
            client.send(reply)
            client.close()
        elif reply is not None:
            client.finish(reply)

    fleet.spawn(follow())
    return None


def in_fleet(ctx: Context, client: Client, command: str,
             answer: Callable[[Fleet], Awaitable[protocol.Message]]) -> Reply:
    """``status --fleet`` and ``history --fleet``: answered from the store, or refused when
    this daemon has none."""
    fleet = ctx.fleet
    if fleet is None:
        return protocol.Error(message=NO_STORE.replace("--fleet", f"{command} --fleet", 1))
    return later(ctx, client, lambda: answer(fleet))


def not_found(reply: object) -> bool:
    return isinstance(reply, protocol.Error) and reply.code == NOT_FOUND
