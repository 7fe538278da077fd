"""The runs' output pipes, read through one epoll of their own (``debounce_cli.outputs``)."""

from __future__ import annotations

import asyncio
import os

from debounce_cli import outputs


def test_many_pipes_are_read_through_one_reader_of_the_loop_until_each_ends():
    async def main() -> tuple[dict[int, bytes], int, bool]:
        loop = asyncio.get_running_loop()
        watched = outputs.pipes(loop)
        got: dict[int, bytes] = {}
        ended: list[int] = []
        done = loop.create_future()
        ends = []

        def readable(fd: int) -> None:
            data = os.read(fd, 7)  # less than a pipe holds: the rest is reported again
            if data:
                got[fd] = got.get(fd, b"") + data
                return
            watched.remove(fd)
            os.close(fd)
            ended.append(fd)
            if len(ended) == len(ends) and not done.done():
                done.set_result(None)

        for i in range(40):
            r, w = os.pipe()
            watched.add(r, readable)
            ends.append((r, w, f"pipe {i} says hello\n".encode() * 3))
        readers = len(loop._selector.get_map())  # type: ignore[attr-defined]
        for _r, w, text in ends:
            os.write(w, text)
            os.close(w)
        await asyncio.wait_for(done, 10)
        assert all(got[r] == text for r, _w, text in ends)
        return got, readers, watched.watched

    got, readers, still = asyncio.run(main())
    assert len(got) == 40
    assert readers <= 2  # the loop's self-pipe and the one epoll: not one reader per pipe
    assert not still  # once no pipe is left, the loop no longer watches the epoll
