"""Jepsen-style checking of the fleet with real processes: a real redis-server, real host
daemons each reaching it through a proxy of its own (``fleet_proxy``), real clients, and
faults injected at random: a host killed (``kill -9``, then started again), a host frozen
(SIGSTOP), a host cut off from the store, a host whose answers from the store are lost, the
store frozen (SIGSTOP). Every run's command notes its start, its end (or the TERM that
stopped it) and its invocation in one log; a checker reads it with every client's exit
status and output (``fleet_chaos`` does the same on fake time, in milliseconds).

Invariants (issue 18):

1. never two runs of one key at once, fleet-wide (a run whose host was killed counts as
   running until that moment: the process dies with its daemon);
2. nothing runs twice: no invocation is the winner of two runs;
3. a client told "refused" (116) or that no daemon answered (112) never has its
   invocation run;
4. a client that exits with a run's status was told the status of a run of its key that
   really ended so, and saw that run's output.

A long randomised run, printing the faults and the verdict::

    python tests/fleet_jepsen.py --seed 7 --seconds 120
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from conftest import lines, wait_until
from fleet_proxy import Proxy
from fleet_support import Host, Redis

KEYS = ("j1", "j2", "j3")


@dataclass
class Call:
    host: str
    key: str
    tag: str
    proc: subprocess.Popen[str]
    code: int | None = None
    out: str = ""
    err: str = ""


@dataclass
class Verdict:
    seed: int
    faults: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    runs: int = 0
    calls: int = 0
    codes: dict[int, int] = field(default_factory=dict)

    def __str__(self) -> str:
        head = (f"seed {self.seed}: {self.calls} calls, {self.runs} runs, exit statuses "
                f"{dict(sorted(self.codes.items()))}, {len(self.faults)} faults")
        if not self.problems:
            return head + ": every invariant held"
        return "\n".join([head + ": BROKEN", *("  " + p for p in self.problems),
                          "faults:", *("  " + f for f in self.faults)])


def _command(log: Path, tag: str, seconds: float) -> list[str]:
    note = f'echo "$1 $DEBOUNCE_HOST $DEBOUNCE_KEY $DEBOUNCE_RUN_ID {tag} $(date +%s.%N)" >> {log}'
    return ["sh", "-c",
            f"trap '{note.replace('$1', 'stop')}; exit 143' TERM; "
            f"{note.replace('$1', 'start')}; echo ran {tag}; "
            f"sleep {seconds} & wait $!; {note.replace('$1', 'end')}", "sh"]


def play(seed: int, seconds: float, hosts: int = 3) -> Verdict:
    rnd = random.Random(seed)
    verdict = Verdict(seed)
    root = Path(tempfile.mkdtemp(prefix="dbj-", dir="/tmp"))
    log = root / "runs.log"
    redis = Redis(root)
    names = "abcde"[:hosts]
    proxies = {name: Proxy(redis.port) for name in names}
    fleet: dict[str, Host] = {}
    killed: dict[str, list[float]] = {name: [] for name in names}  # when each was kill -9'd
    calls: list[Call] = []
    frozen: dict[str, int] = {}  # host -> the pid of its daemon, stopped
    try:
        for name in names:
            (root / name).mkdir()
            fleet[name] = Host(root / name, name, proxies[name].url)
            fleet[name].start()
        end = time.monotonic() + seconds
        serial = 0
        healing: list[tuple[float, str, str]] = []  # (when, what, host)
        while time.monotonic() < end:
            now = time.monotonic()
            for when, what, name in list(healing):
                if now >= when:
                    healing.remove((when, what, name))
                    _heal(what, name, fleet, proxies, redis, frozen)
            roll = rnd.random()
            name = rnd.choice(names)
            pid = fleet[name].daemon_pid()  # (after a kill -9, a client may start it again)
            if roll < 0.75:
                serial += 1
                key = rnd.choice(KEYS)
                tag = f"t{serial}"
                host = fleet[name]
                if pid is not None:
                    proc = host.popen("run", "--fleet", "--key", key, "--delay",
                                      f"{rnd.choice((0, 0.2, 0.5))}s", "--",
                                      *_command(log, tag, rnd.choice((0.1, 0.5, 2.0))))
                    calls.append(Call(name, key, tag, proc))
            elif pid is not None and not any(n == name for _, _, n in healing):
                what = rnd.choice(("kill", "freeze", "cut", "lose", "store"))
                verdict.faults.append(f"{time.monotonic() - end + seconds:6.2f}s {what} {name}")
                if what == "kill":
                    os.kill(pid, signal.SIGKILL)
                    killed[name].append(time.time())
                    wait_until(lambda name=name, pid=pid: fleet[name].daemon_pid() != pid,
                               timeout=10)
                    healing.append((now + rnd.uniform(0.5, 3.0), "restart", name))
                elif what == "freeze":
                    os.kill(pid, signal.SIGSTOP)
                    frozen[name] = pid
                    healing.append((now + rnd.uniform(0.5, 4.0), "thaw", name))
                elif what == "cut":
                    proxies[name].mode = "dark"
                    healing.append((now + rnd.uniform(0.5, 4.0), "join", name))
                elif what == "lose":
                    proxies[name].mode = "drop_replies"
                    healing.append((now + rnd.uniform(0.5, 4.0), "join", name))
                elif redis.proc is not None:
                    os.kill(redis.proc.pid, signal.SIGSTOP)
                    healing.append((now + rnd.uniform(0.5, 3.0), "store", name))
            time.sleep(rnd.uniform(0.05, 0.3))
        for _, what, name in healing:
            _heal(what, name, fleet, proxies, redis, frozen)
        _collect(calls)
        verdict.calls = len(calls)
        for call in calls:
            verdict.codes[call.code or 0] = verdict.codes.get(call.code or 0, 0) + 1
        _check(verdict, lines(log), calls, killed)
        return verdict
    finally:
        if redis.proc is not None:
            try:
                os.kill(redis.proc.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        for name, host in fleet.items():
            if name in frozen:
                _cont(frozen[name])
            proxies[name].mode = "pass"
            host.cleanup()
        for proxy in proxies.values():
            proxy.close()
        redis.stop()
        shutil.rmtree(root, ignore_errors=True)


def _cont(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:
        pass


def _heal(what: str, name: str, fleet: dict[str, Host], proxies: dict[str, Proxy],
          redis: Redis, frozen: dict[str, int]) -> None:
    if what == "restart":
        if fleet[name].daemon_pid() is None:  # (a client may have started one already)
            fleet[name].start()
    elif what == "thaw":
        _cont(frozen.pop(name))
    elif what == "join":
        proxies[name].mode = "pass"
    elif what == "store" and redis.proc is not None:
        os.kill(redis.proc.pid, signal.SIGCONT)


def _collect(calls: list[Call], timeout: float = 120.0) -> None:
    """Every client's exit status and output (each a thread: their pipes fill otherwise)."""
    def finish(call: Call) -> None:
        try:
            call.out, call.err = call.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            call.proc.kill()
            call.out, call.err = call.proc.communicate()
            call.err += "\n(still waiting when the check began)"
        call.code = call.proc.returncode

    threads = [threading.Thread(target=finish, args=(call,)) for call in calls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def _check(verdict: Verdict, log: list[str], calls: list[Call],
           killed: dict[str, list[float]]) -> None:
    starts: dict[tuple[str, str], tuple[str, str, float]] = {}  # (key, run) -> host, tag, t
    stops: dict[tuple[str, str], tuple[str, float]] = {}  # (key, run) -> "end"/"stop", t
    for line in log:
        kind, host, key, run, tag, when = line.split()
        if kind == "start":
            if (key, run) in starts:
                verdict.problems.append(f"run {run} of {key} started twice")
            starts[(key, run)] = (host, tag, float(when))
        else:
            stops[(key, run)] = (kind, float(when))
    verdict.runs = len(starts)
    winners: dict[str, tuple[str, str]] = {}
    for (key, run), (_host, tag, _) in starts.items():
        if tag in winners:
            verdict.problems.append(f"invocation {tag} won two runs: {winners[tag]} and "
                                    f"{(key, run)}")
        winners[tag] = (key, run)
    # 1. never two runs of one key at once
    for key in KEYS:
        spans = []
        for (k, run), (host, _tag, began) in starts.items():
            if k != key:
                continue
            stop = stops.get((k, run))
            if stop is not None:
                ended = stop[1]
            else:  # no line: it died with its daemon (kill -9), or it is unaccounted for
                after = [t for t in killed.get(host, []) if t >= began]
                ended = min(after) if after else float("inf")
            spans.append((began, ended, run, host))
        spans.sort()
        for (_b1, e1, r1, h1), (b2, _e2, r2, h2) in itertools.pairwise(spans):
            if b2 < e1:
                verdict.problems.append(
                    f"runs {r1} ({h1}) and {r2} ({h2}) of {key} overlapped "
                    f"({'until the end' if e1 == float('inf') else f'{e1 - b2:.3f}s'})")
    # 3. refused or unanswered means never run; 4. a run's status is that run's
    for call in calls:
        ran = winners.get(call.tag)
        if call.code in (112, 116) and ran is not None:
            told = "refused (116)" if call.code == 116 else "that no daemon answered (112)"
            verdict.problems.append(f"{call.tag} on {call.host} was told {told} but ran as "
                                    f"run {ran[1]} of {ran[0]}")
        if call.code in (0,) and "ran t" not in call.out:
            verdict.problems.append(f"{call.tag} on {call.host} exited 0 without a run's "
                                    f"output: {call.err.strip()!r}")
        for word in call.out.split():
            if word.startswith("t") and word[1:].isdigit():
                won = winners.get(word)
                if won is None or won[0] != call.key:
                    verdict.problems.append(f"{call.tag} was shown the output of {word}, "
                                            f"which is no run of {call.key}")
                elif call.code == 0 and stops.get(won, ("", 0.0))[0] != "end":
                    verdict.problems.append(f"{call.tag} exited 0 for run {won[1]} of "
                                            f"{won[0]}, which did not end by itself")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--hosts", type=int, default=3)
    args = parser.parse_args()
    verdict = play(args.seed, args.seconds, args.hosts)
    print(verdict)
    return 1 if verdict.problems else 0


if __name__ == "__main__":
    sys.exit(main())
