"""`debounce daemon --stdin` edges a new user meets in the first hour (issue 11, items 3 and 9)."""

from __future__ import annotations

import signal
import subprocess

import pytest

from conftest import wait_until


def _stdin_daemon(world, *args: str) -> subprocess.Popen:
    return subprocess.Popen(world.argv("daemon", "--stdin", "--no-journal", *args),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=world.work, env=world.env)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_input_is_open_ends_cleanly(world, sig):
    """It used to abort with "Fatal Python error: _enter_buffered_busy" (exit 134)."""
    proc = _stdin_daemon(world, "--delay", "0", "--socket", world.socket)
    assert proc.stdin is not None
    proc.stdin.write(b"true\n")
    proc.stdin.flush()
    # The run's end, not a file its command makes: `touch` has made its file a moment
    # before it exits, and a signal in that moment rightly stops a run (exit 143; CI saw it).
    wait_until(lambda: world.daemon_pid() == proc.pid, timeout=30)
    ended = world.run("wait", "--run", "1", "--socket", world.socket)
    assert ended.returncode == 0, ended.stderr
    proc.send_signal(sig)
    _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert b"Fatal" not in err and b"Traceback" not in err


def test_comments_are_skipped_and_a_failing_run_names_its_line(world):
    lines_in = b"# rebuild the docs\n  # indented comment\ntrue\nsh -c 'exit 3'\n"
    proc = subprocess.run(world.argv("daemon", "--stdin", "--no-journal", "--delay", "0"),
                          input=lines_in, capture_output=True, cwd=world.work, env=world.env,
                          timeout=30)
    assert proc.returncode == 1
    err = proc.stderr.decode().strip().splitlines()
    assert err == ["debounce: stdin line 4: sh -c 'exit 3' exited with status 3 (run 2, exited)"]


def test_a_read_of_many_lines_is_submitted_in_turns_in_order_and_then_its_end():
    """A read of hundreds of lines due at once: LINES_PER_TURN lines a turn of the loop, so
    each turn's commit lets their runs start while the rest are parsed; every line in its
    order, and the end of input only after the last of them."""
    import asyncio

    from debounce_cli.daemon import stdin
    from debounce_cli.daemon.jobs import Shared

    turn = [0]
    submitted: list[tuple[int, str]] = []
    events: list[str] = []

    class Core:
        shared = Shared()

        def refusal(self) -> None:
            return None

        def submit(self, key, options, job, waiter, submitter) -> None:
            submitted.append((turn[0], job.argv[-1]))

    async def main() -> None:
        source = stdin.StdinSource(Core(), {})  # type: ignore[arg-type]
        source.on_eof = lambda: events.append(f"eof after {len(submitted)}")
        loop = asyncio.get_running_loop()

        def tick() -> None:  # counts turns while lines are being submitted
            turn[0] += 1
            if len(submitted) < 300:
                loop.call_soon(tick)

        loop.call_soon(tick)
        source.lines([(n, f"echo {n}".encode()) for n in range(1, 201)])
        await asyncio.sleep(0)
        source.lines([(n, f"echo {n}".encode()) for n in range(201, 301)])  # the next read
        source._eof()
        while not events:
            await asyncio.sleep(0)

    asyncio.run(main())
    assert [argv for _turn, argv in submitted] == [str(n) for n in range(1, 301)]
    per_turn: dict[int, int] = {}
    for at, _argv in submitted:
        per_turn[at] = per_turn.get(at, 0) + 1
    assert max(per_turn.values()) <= stdin.LINES_PER_TURN and len(per_turn) >= 300 // 32
    assert events == ["eof after 300"]
