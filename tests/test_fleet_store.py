"""The Redis store's steps against a real redis-server: one round trip a step, computed again
when the host's view of a key or of the store's clock is out of date; the index of pending
keys never missing a key on a Redis Cluster; a reader whose cost follows the events, not the
keys followed; and the in-memory twin offering the same interface.

The rules are not written again here (the script only checks and writes): every decision is
still ``state.py``'s, which test_fleet_state.py and test_differential.py cover.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest

from debounce_cli.daemon.fleet import state as fs
from debounce_cli.daemon.fleet.layout import StoreDown, channel, state_key, tag_of
from debounce_cli.daemon.fleet.memory import MemoryStore
from debounce_cli.daemon.fleet.store import SLACK_BEHIND, Store
from debounce_cli.rules import Options

from fleet_support import Redis, RedisCluster

JOB = {"argv": ["make"], "cwd": "/", "env": {"PATH": "/bin"}}


@pytest.fixture
def redis() -> Iterator[Redis]:
    root = Path(tempfile.mkdtemp(prefix="dbs-", dir="/tmp"))
    server = Redis(root)
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


def submitting(inv: int, host: str = "a", token: str = "") -> Any:
    def step(st: fs.KeyState, now: float) -> Any:
        return fs.submit(st, inv=inv, host=host, job=JOB, options=Options(delay=60.0),
                         now=now, token=token or f"{host}:{inv}")
    return step


class RoundTrips:
    """Counts the round trips to Redis: every send on a connection (a pipeline is one),
    redis-py's or the steps' own (``wire``)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from redis.asyncio.connection import AbstractConnection

        from debounce_cli.daemon.fleet.wire import Wire

        self.count = 0
        send = AbstractConnection.send_packed_command
        write = Wire._write

        async def counted(connection: Any, *args: Any, **kwargs: Any) -> Any:
            self.count += 1
            return await send(connection, *args, **kwargs)

        def written(wire: Any, *args: Any, **kwargs: Any) -> Any:
            self.count += 1
            return write(wire, *args, **kwargs)

        monkeypatch.setattr(AbstractConnection, "send_packed_command", counted)
        monkeypatch.setattr(Wire, "_write", written)


def test_a_submission_on_a_key_this_host_knows_is_one_round_trip(redis, monkeypatch):
    async def main() -> None:
        store = Store(redis.url)
        try:
            await store.update("k", submitting(1))  # learns the store's clock and the key
            trips = RoundTrips(monkeypatch)
            for inv in range(2, 12):
                landed, _, st = await store.update("k", submitting(inv))
                assert isinstance(landed, fs.InSlot) and landed.coalesced == inv
            assert trips.count == 10
            assert st.pending is not None and st.pending.inv == 11
        finally:
            await store.close()

    asyncio.run(main())


def test_a_store_with_a_password_and_a_database_number_is_used_as_its_url_says():
    """redis://:PASSWORD@host:port/3: the steps and the reader of events log in, and the
    keys land in database 3; a wrong password is a store that cannot be reached, named
    without the password."""
    root = Path(tempfile.mkdtemp(prefix="dbs-", dir="/tmp"))
    server = Redis(root, args=("--requirepass", "s3cret"))
    url = f"redis://:s3cret@127.0.0.1:{server.port}/3"

    async def main() -> None:
        store, other = Store(url), Store(url)
        wrong = Store(f"redis://:nope@127.0.0.1:{server.port}/3")
        try:
            store.follow("k", b"0-0")
            assert await store.read(100) == []  # subscribed
            await other.update("k", submitting(1, "b"))
            got = await store.read(5000)
            assert [(event["t"], event["host"]) for _, _, event in got] == [("pending", "b")]
            landed, _, _ = await store.update("k", submitting(2))
            assert isinstance(landed, fs.InSlot) and landed.coalesced == 2
            with pytest.raises(StoreDown) as refused:
                await wrong.update("k", submitting(3))
            assert "***" in str(refused.value) and "nope" not in str(refused.value)
        finally:
            await store.close()
            await other.close()
            await wrong.close()

    try:
        asyncio.run(main())
        cli = ["redis-cli", "-p", str(server.port), "--no-auth-warning", "-a", "s3cret"]
        in_3 = subprocess.run([*cli, "-n", "3", "--scan"], capture_output=True, text=True)
        in_0 = subprocess.run([*cli, "-n", "0", "--scan"], capture_output=True, text=True)
        assert f"{state_key(tag_of('k'))}" in in_3.stdout.split()
        assert in_0.stdout.split() == []
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_hosts_with_stale_views_of_a_key_compute_their_steps_again_and_none_is_lost(redis):
    """Two hosts submit to one key at once, each computing on the state it saw last: the
    store takes a step only on the state it was computed from, so every submission counts
    once (the coalesced count is the number of submissions)."""

    async def main() -> None:
        a, b = Store(redis.url), Store(redis.url)
        try:
            calls = [a.update("k", submitting(i, "a")) for i in range(1, 41)]
            calls += [b.update("k", submitting(i, "b")) for i in range(1, 41)]
            await asyncio.gather(*calls)
            st, _ = await a.snapshot("k")
            assert st.pending is not None and st.pending.coalesced == 80
            events = await a.events("k")
            assert len(events) == 80  # one "pending" event a submission, none twice
        finally:
            await a.close()
            await b.close()

    asyncio.run(main())


def test_a_step_computed_too_long_before_it_reached_the_store_is_computed_again(redis):
    """A host frozen between computing a step and sending it (here: its reckoning of the
    store's clock set 5 s behind) has the step computed again at the store's time."""

    async def main() -> None:
        store = Store(redis.url)
        try:
            before = await store.now()
            assert store.offset is not None
            store.offset -= 5.0
            times: list[float] = []

            def step(st: fs.KeyState, now: float) -> Any:
                times.append(now)
                return submitting(1)(st, now)

            landed, _, st = await store.update("k", step)
            assert len(times) == 2 and times[0] < before - 4
            assert st.pending is not None
            assert before <= st.pending.received <= await store.now()
            assert abs(landed.due - 60.0 - st.pending.received) < 1e-6
            assert times[1] == st.pending.received
            assert SLACK_BEHIND < 5.0
        finally:
            await store.close()

    asyncio.run(main())


def test_the_reader_reads_only_the_streams_of_keys_with_news(redis):
    """Following 2,000 keys, an event on one of them is read by naming that key's stream
    alone: the reader's cost follows the events, not the keys it follows."""

    async def main() -> None:
        writer, reader = Store(redis.url), Store(redis.url)
        try:
            keys = [f"k{i}" for i in range(2000)]
            for key in keys:
                reader.follow(key, b"0-0")
            named: list[int] = []
            xread = reader.reader.xread

            async def spy(streams: dict[str, Any], **kwargs: Any) -> Any:
                named.append(len(streams))
                return await xread(streams, **kwargs)

            reader.reader.xread = spy
            assert await reader.read(100) == []  # subscribing; nothing to read
            channels = [channel(tag_of(key)) for key in keys]
            for _ in range(200):  # the store has taken every subscription
                if all(n == 1 for _, n in await writer.redis.pubsub_numsub(*channels)):
                    break
            assert await reader.read(100) == []  # (their answers heard: nothing to read)
            assert sum(named) >= 2000  # each key's stream was read once, as subscribed
            named.clear()
            await writer.update("k1234", submitting(1))
            got = await reader.read(5000)
            assert [(key, event["t"]) for key, _, event in got] == [("k1234", "pending")]
            assert named == [1]
            await writer.update("k1234", submitting(2))
            got = await reader.read(5000)
            assert [event["coalesced"] for _, _, event in got] == [2]
            reader.unfollow("k1234")
            await writer.update("k1234", submitting(3))
            assert await reader.read(300) == []
        finally:
            await writer.close()
            await reader.close()

    asyncio.run(main())


def test_a_hosts_own_events_reach_its_reader_without_reading_them_back(redis):
    """A step of this host's on a key it follows hands its events to the reader at once (no
    read of the stream), once each, in order with what other hosts add."""

    async def main() -> None:
        mine, other = Store(redis.url), Store(redis.url)
        try:
            mine.follow("k", b"0-0")
            assert await mine.read(100) == []  # subscribed
            named: list[int] = []
            xread = mine.reader.xread

            async def spy(streams: dict[str, Any], **kwargs: Any) -> Any:
                named.append(len(streams))
                return await xread(streams, **kwargs)

            mine.reader.xread = spy
            seen: list[int] = []
            for inv in range(1, 4):
                await mine.update("k", submitting(inv))
                seen += [event["coalesced"] for _, _, event in await mine.read(1000)]
            assert seen == [1, 2, 3] and named == []
            await other.update("k", submitting(1, "b"))  # another host: read from the stream
            await mine.update("k", submitting(4))  # (ours, after it: read with it)
            while len(seen) < 5:
                got = await mine.read(1000)
                assert got, "events missing"
                seen += [event["coalesced"] for _, _, event in got]
            assert seen == [1, 2, 3, 4, 5]
            assert await mine.read(200) == []  # nothing twice
        finally:
            await mine.close()
            await other.close()

    asyncio.run(main())


def test_a_hosts_own_events_go_where_it_said_without_waking_its_reader(redis):
    """With a place for them (``hand_own``), a step's own events go there as soon as the
    step is done, and the step's notice does not wake the reader; another host's news does,
    at once."""

    async def main() -> None:
        mine, other = Store(redis.url), Store(redis.url)
        try:
            handed: list[tuple[str, int]] = []
            mine.hand_own(lambda batch: handed.extend(
                (key, event["coalesced"]) for key, _, event in batch))
            mine.follow("k", b"0-0")
            assert await mine.read(100) == []  # subscribed
            wire = mine.notices.pubsub.wire
            pushed = wire.on_push
            notices: list[Any] = []

            def counted(reply: Any) -> None:
                notices.append(reply)
                pushed(reply)

            wire.on_push = counted
            reading = asyncio.ensure_future(mine.read(10_000))
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 5
            for inv in range(1, 4):
                await mine.update("k", submitting(inv))
            while len(notices) < 3:  # the three steps' notices have come in
                assert loop.time() < deadline, "the steps' notices never came"
                await asyncio.sleep(0.005)
            await asyncio.sleep(0)  # (a reader woken by them would be done by now)
            assert handed == [("k", 1), ("k", 2), ("k", 3)]
            assert not reading.done()
            await other.update("k", submitting(1, "b"))
            got = await asyncio.wait_for(reading, 2.0)  # another host's news: read at once
            assert [(event["host"], event["coalesced"]) for _, _, event in got] == [("b", 4)]
        finally:
            await mine.close()
            await other.close()

    asyncio.run(main())


def test_a_reader_whose_connection_was_cut_hears_every_followed_key_again(redis):
    """The reader's connection is cut while it is busy, and then it follows one key more:
    the news of the key it followed before still reaches it (a subscriber connection made
    anew for the one new key would have left the others unheard for good)."""

    async def main() -> None:
        mine, other = Store(redis.url), Store(redis.url)
        try:
            mine.follow("old", b"0-0")
            assert await mine.read(100) == []  # subscribed
            await other.redis.client_kill_filter(_type="pubsub")
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 10
            while mine.notices.pubsub.wire.transport is not None:  # (the cut is heard)
                assert loop.time() < deadline, "the cut connection was never noticed"
                await asyncio.sleep(0.01)
            mine.follow("new", b"0-0")
            await mine.unblock_reader()  # as the daemon does for a key it now follows
            await other.update("old", submitting(1, "b"))
            heard: list[tuple[str, str]] = []
            while ("old", "pending") not in heard:
                assert loop.time() < deadline, f"the old key's news never came: {heard}"
                try:
                    heard += [(key, event["t"]) for key, _, event in await mine.read(500)]
                except StoreDown:
                    pass  # (the cut, said once: the next read subscribes anew)
        finally:
            await mine.close()
            await other.close()

    asyncio.run(main())


def test_news_from_another_host_during_a_step_of_ours_reaches_the_reader_at_once(redis):
    """A notice heard while a step of ours on the key is in flight is held back (it is most
    likely of that step's own events); when it names more, the reader is woken for it, not
    left until its read times out."""

    async def main() -> None:
        mine, other = Store(redis.url), Store(redis.url)
        try:
            mine.follow("k", b"0-0")
            assert await mine.read(100) == []  # subscribed
            gate = asyncio.Event()
            pipeline = mine._pipeline

            async def held(calls: Any, sha: bool) -> Any:
                answers = await pipeline(calls, sha)
                await gate.wait()  # our step is applied; its answer is late
                return answers

            mine._pipeline = held  # type: ignore[method-assign]
            stepping = asyncio.ensure_future(mine.update("k", submitting(1)))
            reading = asyncio.ensure_future(mine.read(5000))
            for _ in range(2000):  # our step is in the store (its answer held back)
                if (await other.snapshot("k"))[0].pending is not None:
                    break
                await asyncio.sleep(0.001)
            await other.update("k", submitting(1, "b"))
            for _ in range(2000):  # the reader hears of it while our step is in flight
                if "k" in mine.notices.deferred:
                    break
                await asyncio.sleep(0.001)
            assert "k" in mine.notices.deferred and not reading.done()
            loop = asyncio.get_running_loop()
            started = loop.time()
            gate.set()
            await stepping
            got = await reading
            assert loop.time() - started < 2.5  # woken, not at the end of its 5 s
            seen = [(event["host"], event["coalesced"]) for _, _, event in got]
            while len(seen) < 2:
                seen += [(e["host"], e["coalesced"]) for _, _, e in await mine.read(1000)]
            assert seen == [("a", 1), ("b", 2)]
        finally:
            await mine.close()
            await other.close()

    asyncio.run(main())


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_on_a_cluster_a_finish_racing_a_submission_leaves_the_key_in_the_index():
    """Host a records the end of a key's run while host b submits to the key. The key's
    index of pending keys must hold it afterwards, whatever the interleaving: here a's
    every round trip after its first write waits until b's submission is done (before, the
    index was written in a second transaction, which then removed the key b had just
    added: nothing would ever have started b's invocation)."""
    root = Path(tempfile.mkdtemp(prefix="dbc-", dir="/tmp"))
    cluster = RedisCluster(root)

    async def main() -> None:
        a, b = Store(cluster.url), Store(cluster.url)
        try:
            key = "raced"
            await a.update(key, submitting(1, "a"))
            run_id = await a.next_run_id()
            claim, _, _ = await a.update(key, lambda st, now: fs.claim(
                st, host="a", now=now + 120, run_id=run_id, may_take_over=False))
            assert isinstance(claim, fs.Start)
            tag = tag_of(key)
            assert tag in await b.indexed()

            written, go = asyncio.Event(), asyncio.Event()
            pipeline = a.redis.pipeline

            def held(*args: Any, **kwargs: Any) -> Any:
                pipe = pipeline(*args, **kwargs)
                execute = pipe.execute

                async def run(*x: Any, **y: Any) -> Any:
                    if written.is_set():
                        await go.wait()  # a's next round trip: after b's submission
                    result = await execute(*x, **y)
                    written.set()
                    return result

                pipe.execute = run
                return pipe

            a.redis.pipeline = held
            finishing = asyncio.ensure_future(a.update(key, lambda st, now: fs.finish(
                st, run=claim.running, exit_code=0, outcome="finished", now=now)))
            await asyncio.wait_for(written.wait(), 30)
            landed, _, _ = await b.update(key, submitting(2, "b"))
            assert isinstance(landed, fs.InSlot)
            go.set()
            await asyncio.wait_for(finishing, 30)
            st, _ = await b.snapshot(key)
            assert st.pending is not None and st.pending.host == "b" and st.running is None
            assert tag in await b.indexed(), "the pending key fell out of the index"
        finally:
            await a.close()
            await b.close()

    try:
        asyncio.run(main())
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_the_in_memory_store_offers_every_call_of_the_redis_store():
    """The fleet's tests on fake time use the in-memory store in the Redis store's place:
    every public call of one is a call of the other, with the same parameters."""
    for name, call in inspect.getmembers(Store, inspect.isfunction):
        if name.startswith("_") or name == "down":  # (there a switch the tests set)
            continue
        twin = getattr(MemoryStore, name, None)
        assert twin is not None, f"MemoryStore has no {name}"
        assert (list(inspect.signature(twin).parameters)
                == list(inspect.signature(call).parameters)), name
        assert inspect.iscoroutinefunction(twin) == inspect.iscoroutinefunction(call), name


def test_a_states_json_is_that_of_its_fields_as_before():
    """``KeyState.dumps`` (which no longer deep-copies a job's environment) writes what
    ``dataclasses.asdict`` gave: states stored by an earlier version compare equal."""
    st = fs.KeyState("k")
    env = {f"V{i}": "x" * i for i in range(50)}
    fs.submit(st, inv=1, host="a", job={"argv": ["a"], "cwd": "/", "env": env},
              options=Options(delay=1.0, collect=True), now=100.0, token="t")
    fs.submit(st, inv=2, host="b", job={"argv": ["b"], "cwd": "/", "env": env},
              options=Options(delay=1.0, collect=True), now=100.5, token="u")
    fs.claim(st, host="b", now=102.0, run_id=7, may_take_over=False)
    fs.submit(st, inv=3, host="a", job=JOB, options=Options(), now=102.5)
    fs.finish(st, run=st.running, exit_code=3, outcome="finished", now=103.0)
    fs.submit(st, inv=4, host="a", job=JOB, options=Options(), now=103.5)
    for state in (fs.KeyState("empty"), st):
        obj = asdict(state)
        extra = obj.pop("extra")
        for name in ("quiet_at", "timer_first", "edge_at", "lead_after"):
            if obj[name] == float("-inf"):
                obj[name] = None
        assert state.dumps() == json.dumps({**extra, **obj}, separators=(",", ":"))
        assert fs.KeyState.loads(state.key, state.dumps()).dumps() == state.dumps()
