"""Liveness: this host's heartbeat, and the scan that notices what other hosts left.

Every quarter lease each daemon beats its heart (the store's time, everyone's last heartbeat,
the store's epoch and run counter come back) and scans the keys due: a run whose host went
silent is recorded ``lost`` (it may have run: it is never started twice), a pending
invocation whose host went silent is taken over. A store that lost data (its epoch token is
gone, or its run counter went back) gets this host's pending invocations again.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable

from debounce_cli.daemon.fleet import state as fs
from debounce_cli.daemon.fleet.claims import Claims
from debounce_cli.daemon.fleet.execution import Execution
from debounce_cli.daemon.fleet.following import Following
from debounce_cli.daemon.fleet.layout import FORGET_HOST, Beat, StoreDown
from debounce_cli.daemon.fleet.link import Link


class Liveness:
    """Heartbeat, scan and recovery, over the other rooms of this daemon's fleet."""

    def __init__(self, link: Link, claims: Claims, execution: Execution,
                 following: Following) -> None:
        self.link = link
        self.claims = claims
        self.execution = execution
        self.following = following
        self.beat_at = float("-inf")  # our monotonic time of the last heartbeat
        self.connected_since: float | None = None  # in touch with the store since then
        self.beats: Beat | None = None  # the last heartbeat's view of the fleet
        self.epoch: bytes | None = None  # the store's epoch token, as first seen

    async def recover(self, emptied: bool) -> None:
        """The store lost data (restarted without persistence, or rolled back to an older
        snapshot): submit this host's own pending invocations again, and let the waiters
        here follow whatever is pending for their keys next."""
        print(f"debounce: the fleet store {self.link.store.name} lost data (restarted without "
              "its append-only file?); submitting this host's pending invocations again",
              file=sys.stderr, flush=True)
        self.following.orphan_all(emptied)
        self.claims.resubmit_all()

    async def beat(self) -> None:
        """Every quarter lease: say this host is alive, learn the others' heartbeats, and
        notice a store that lost data. A loop of its own, so a long scan never delays it."""
        while not self.link.closing:
            seen_runs = self.claims.seen_runs  # before asking: a claim meanwhile may raise it
            sent = self.link.clock.monotonic()
            try:
                beat = await self.link.store.heartbeat(self.link.host, self.link.lease)
            except StoreDown as exc:
                self.connected_since = None
                self.link.say_down(exc)
                await asyncio.sleep(self.link.lease / 4)
                continue
            self.link.down_since = None
            self.link.measured(beat.now)
            self.beat_at = self.link.clock.monotonic()
            if sent - self.link.renewed > self.link.lease / 2:
                # Our own heartbeats did not get through for a while (the store paused, or
                # we did): the others' silence over that time says nothing. Judge again
                # only after a whole lease in touch.
                self.connected_since = self.beat_at
            self.link.renewed = sent
            if self.connected_since is None:
                self.connected_since = self.beat_at
            self.beats = beat
            if self.epoch is None or beat.epoch is None:
                first = self.epoch is None
                self.epoch = await self.link.store.claim_epoch(seen_runs)
                if not first:
                    await self.recover(emptied=True)
            elif beat.epoch != self.epoch or beat.runs < seen_runs:
                emptied = beat.epoch != self.epoch
                self.epoch = beat.epoch if emptied else self.epoch
                await self.link.store.claim_epoch(seen_runs)
                await self.recover(emptied=emptied)
            forgotten = [host for host, at in beat.hosts.items()
                         if at < beat.now - max(FORGET_HOST, 100 * self.link.lease)]
            if forgotten:
                await self.link.store.forget_hosts(forgotten)
            await asyncio.sleep(self.link.lease / 4)

    async def scan(self) -> None:
        """Every quarter lease: the keys due, for runs whose host went silent (lost) and
        pending invocations whose host went silent (taken over); and the keys whose stream
        was trimmed past what this host had read (resynced)."""
        while not self.link.closing:
            await asyncio.sleep(self.link.lease / 4)
            if self.beats is None or self.connected_since is None:
                continue
            try:
                await self._scan_once(self.beats)
                await self.following.resync_trimmed()
            except StoreDown as exc:
                self.link.say_down(exc)

    async def _scan_once(self, beat: Beat) -> None:
        now, beats = self.link.store_now(), beat.hosts
        assert self.connected_since is not None
        # Another host's silence means it is gone only once we have been in touch with the
        # store for a whole lease ourselves: after the store was down, every host gets a
        # lease to beat again before anything of its is taken over.
        # And only on a fresh view: a host frozen (SIGSTOP) since its last heartbeat thaws
        # with a view of the others that is as old as the freeze.
        judging = (self.beat_at - self.connected_since >= self.link.lease
                   and self.link.clock.monotonic() - self.beat_at <= self.link.lease / 2)

        def lease_of(host: str) -> float:
            """How long ``host`` must be silent to be gone: its own lease, if longer than
            ours (its runs are stopped at half of its lease, not of ours)."""
            return max(self.link.lease, beat.leases.get(host, 0.0))

        def gone(host: str) -> bool:
            return (judging and host != self.link.host
                    and beats.get(host, float("-inf")) < beat.now - lease_of(host))

        for st in await self.link.store.states(await self.link.store.indexed(upto=now)):
            key = st.key
            if key in self.claims.claiming:
                continue
            r, p = st.running, st.pending
            here = self.execution
            ours_gone = (r is not None and r.host == self.link.host and r.run not in here.local
                         and r.run not in here.reporting)
            if r is not None and (gone(r.host) or ours_gone):
                # Its host went silent (or it is ours from before a restart): lost, if the
                # store agrees that it started over a lease ago (a host that joined after
                # the heartbeats were read is not silent).
                lost, _, _ = await self.link.store.update(
                    key, _losing(r, 0.0 if ours_gone else lease_of(r.host), beat.now),
                    history=self.link.config.keep_history)
                if lost is not None:
                    heard = beats.get(r.host)
                    why = ("this host's daemon restarted" if r.host == self.link.host
                           else f"{r.host} has not been heard from" if heard is None
                           else f"{r.host} has been silent for {beat.now - heard:.1f}s")
                    print(f"debounce: fleet run {r.run} of {key!r}: lost ({why})",
                          file=sys.stderr, flush=True)
                if p is not None:
                    self.claims.claim_soon(key, gone(p.host))
                continue
            if p is not None and p.due <= now and (p.host == self.link.host or gone(p.host)):
                ours = self.claims
                if p.host == self.link.host and (key in ours.timers or key in ours.slot_queue):
                    continue  # our own timer (or a free job slot) will see to it
                self.claims.claim_soon(key, p.host != self.link.host)


def _losing(run: fs.Running, silent: float, seen: float
            ) -> Callable[[fs.KeyState, float], tuple[fs.Last | None, list[fs.Event]]]:
    """The step that records ``run`` lost, if its host has been silent long enough after
    it started, in the view of the heartbeats taken at ``seen`` (the store's time)."""
    def step(st: fs.KeyState, now: float) -> tuple[fs.Last | None, list[fs.Event]]:
        return fs.lose(st, run=run, now=now, silent=silent, seen=seen)
    return step
