"""The daemon's CPU per submission (issue 21): what is done once per batch of submissions,
not once per submission, and stays exact while doing so. The figure itself is in bench/
("submit: daemon CPU per submission"), measured against one ``json.loads`` of the request."""

from __future__ import annotations

import asyncio
import os
import socket

from test_daemon_core import FakeClient, FakeRuns

from debounce_cli import protocol
from debounce_cli.clock import SystemClock
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
