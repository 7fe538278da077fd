"""--throttle, --on-busy signal and --collect against the real daemon (SPEC rules 5, 7, 10)."""

from __future__ import annotations

import json
import subprocess

from debounce_cli.runner import batches

from conftest import lines, status, wait_until


def history(world) -> list[dict]:
    proc = world.run("history", "--json")
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines()]


def test_throttle_runs_the_first_call_at_once_and_the_last_of_the_burst_later(world):
    out = world.work / "out"
    status(world)
    for n in range(3):
        proc = world.run("run", "--no-wait", "--throttle", "600ms", "--key", "t", "--",
                         "sh", "-c", f"echo {n} >> {out}")
        assert proc.returncode == 0, proc.stderr
    wait_until(lambda: lines(out) == ["0", "2"], timeout=10)
    rows = history(world)
    assert [r["coalesced"] for r in reversed(rows)] == [1, 2]


def test_on_busy_signal_sends_the_signal_and_joins_the_running_run(world):
    log, done = world.work / "log", world.work / "done"
    # A server that keeps running through its reloads until told it is done (or 30 s).
    server = (f'trap "echo reload >> {log}" HUP; echo start >> {log}; '
              f"i=0; while [ ! -e {done} ] && [ $i -lt 600 ]; do sleep 0.05; i=$((i+1)); done")
    first = world.popen("run", "--delay", "0", "--key", "srv", "--on-busy", "signal",
                        "--", "sh", "-c", server)
    wait_until(lambda: lines(log) == ["start"], timeout=10)
    second = world.run("run", "--no-wait", "--delay", "100ms", "--key", "srv",
                       "--on-busy", "signal", "--", "sh", "-c", server)
    assert second.returncode == 0, second.stderr
    wait_until(lambda: lines(log) == ["start", "reload"], timeout=10)
    done.touch()
    first.communicate(timeout=30)
    assert first.returncode == 0
    (run,) = history(world)
    assert run["coalesced"] == 2 and run["outcome"] == "exited"


def test_collect_runs_once_with_the_distinct_last_arguments_in_order(world):
    out, batch = world.work / "out", world.work / "batch"
    script = f'printf "%s\\n" "$@" > {out}; cat "$DEBOUNCE_BATCH" > {batch}'
    for name in ("a.js", "b.js", "a.js"):
        proc = world.run("run", "--no-wait", "--collect", "--key", "fmt", "--delay", "300ms",
                         "--", "sh", "-c", script, "sh", name)
        assert proc.returncode == 0, proc.stderr
    wait_until(lambda: lines(out) == ["a.js", "b.js"], timeout=10)
    wait_until(lambda: len(lines(batch)) == 3, timeout=5)
    assert [json.loads(line)[-1] for line in lines(batch)] == ["a.js", "b.js", "a.js"]
    (run,) = history(world)
    assert run["coalesced"] == 3 and run["argv"][-2:] == ["a.js", "b.js"]


def test_collect_splits_a_batch_past_the_argument_limit_into_consecutive_commands(world):
    counts = world.work / "counts"
    script = f'echo $# >> {counts}; [ "$1" != bad ] || exit 3'
    names = [f"{n:05d}" + "x" * 2000 for n in range(1500)]  # about 3 MB of arguments
    lines_in = "".join(json.dumps({"argv": ["sh", "-c", script, "sh", name]}) + "\n"
                       for name in ["bad", *names])
    proc = subprocess.run(world.argv("daemon", "--stdin", "--no-journal", "--collect", "--key",
                                     "fmt", "--delay", "500ms"), input=lines_in.encode(),
                          capture_output=True, cwd=world.work, env=world.env, timeout=120)
    assert proc.returncode == 1, proc.stderr  # the first command line failed: exit 3
    got = [int(n) for n in lines(counts)]
    assert len(got) >= 2 and sum(got) == 1501, got


def test_batches_keep_order_and_fit_the_limit():
    argvs = [["fmt", "-w", name] for name in ["a", "b", "a", "c"]]
    assert batches(argvs, {}) == [["fmt", "-w", "a", "b", "c"]]
    big = [["fmt", str(n) * 10000] for n in range(10)] * 60
    lines_out = batches(big, {"PATH": "/bin"})
    assert [a for line in lines_out for a in line[1:]] == [str(n) * 10000 for n in range(10)]
    assert batches([["true"]], {}) == [["true"]]
