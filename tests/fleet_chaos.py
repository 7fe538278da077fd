"""Jepsen-style checking of the fleet, on fake time (``fleet_sim``): random submissions from
several hosts to a few keys, faults injected (a host killed, a host frozen, the store
paused, a host cut off from the store), then a checker over the history of what ran and what
every caller was told.

Invariants (issue 18):

1. never two runs of one key at once, fleet-wide;
2. nothing runs twice: no run starts twice, no invocation wins two runs that started;
3. every caller whose host lived and whose submission was acknowledged is told an outcome
   once the faults are over (its run's status, cancelled, or lost);
4. a caller told a run's status gets the status that run really ended with;
5. a run recorded ``lost`` really was stopped or never started, or its host died or froze
   while it held it (a live, reachable host's run is never taken for lost).

Run it for longer than the tests do::

    python tests/fleet_chaos.py --seed 7 --rounds 200

It prints each round's faults when a round breaks an invariant, and the verdict.
"""

from __future__ import annotations

import argparse
import random
import sys
from dataclasses import dataclass, field
from typing import Any

from fleet_sim import Caller, Sim, SimHost

from debounce_cli.daemon.fleet.layout import StoreDown

KEYS = ("k1", "k2", "k3")
HOSTS = "abcd"


@dataclass
class Round:
    seed: int
    faults: list[str] = field(default_factory=list)
    callers: list[tuple[str, str, Caller]] = field(default_factory=list)  # host, key, caller


def _options(rnd: random.Random, rich: bool) -> dict[str, Any]:
    """A submission's options: the on-busy mode, and with ``rich`` the rest of them too
    (leading and trailing edges, max-wait, collect, a timeout, no-defer)."""
    options: dict[str, Any] = {"on_busy": rnd.choice(["queue", "queue", "restart", "ignore"])}
    if not rich:
        return options
    if rnd.random() < 0.25:
        options["leading"] = True
        options["trailing"] = rnd.random() < 0.5
    if rnd.random() < 0.2:
        options["max_wait"] = rnd.choice([0.5, 1.5])
    if rnd.random() < 0.2:
        options["collect"] = True
    if rnd.random() < 0.1:
        options["timeout"] = rnd.choice([0.2, 2.0])
    if rnd.random() < 0.1:
        options["defer"] = False
    if rnd.random() < 0.1:
        options["on_busy"] = "signal"
    return options


async def _control(host: SimHost, what: str, key: str) -> None:
    """``debounce flush``, ``cancel`` or ``kill`` on ``key`` from ``host`` (the store may
    refuse it, as it may refuse a client)."""
    try:
        if what == "flush":
            await host.fleet.flush(key)
        elif what == "cancel":
            await host.fleet.cancel(key)
        else:
            await host.fleet.kill(key, None)
    except StoreDown:
        pass


def play(seed: int, lease: float = 2.0, steps: int = 60, rich: bool = False
         ) -> tuple[Sim, Round]:
    """One round: ``steps`` actions a quarter second apart, then every fault healed and a
    minute of quiet so that everything that can end, ends. With ``rich``: every option,
    job slots (``daemon --jobs 1`` on one host), and flush, cancel and kill from any host."""
    rnd = random.Random(seed)
    sim = Sim(lease=lease)
    rec = Round(seed)
    hosts = [sim.host(name, jobs=1 if rich and name == "a" else None) for name in HOSTS]
    sim.run_for(lease * 1.5)
    dead: set[str] = set()
    frozen: dict[str, float] = {}  # host -> when it thaws
    cut: dict[str, float] = {}  # host -> when its link to the store heals
    store_back = 0.0
    for _ in range(steps):
        now = sim.loop.now
        for name, until in list(frozen.items()):
            if now >= until:
                sim.hosts[name].frozen = False
                del frozen[name]
        for name, until in list(cut.items()):
            if now >= until:
                del cut[name]
        if store_back and now >= store_back:
            store_back = 0.0
        for host in hosts:  # who reaches the store now
            if host.name in dead or host.name in frozen or host.name in cut or store_back:
                host.store.pause()
            else:
                host.store.resume()
        live = [h for h in hosts if h.name not in dead and h.name not in frozen]
        roll = rnd.random()
        if roll < 0.6 and live:
            host = rnd.choice(live)
            key = rnd.choice(KEYS)
            seconds = rnd.choice([0.0, 0.3, 1.0, 3.0, 8.0])
            options = _options(rnd, rich)
            caller = host.submit(key, seconds, delay=rnd.choice([0.0, 0.25, 1.0]), **options)
            rec.callers.append((host.name, key, caller))
        elif rich and roll < 0.6 + 0.04 and live:
            host = rnd.choice(live)
            what = rnd.choice(["flush", "cancel", "kill"])
            key = rnd.choice(KEYS)
            sim.loop.create_task(_control(host, what, key))
            rec.faults.append(f"{now:.2f} {what} {key} from {host.name}")
        elif roll < 0.65 and len(live) > 2:
            host = rnd.choice(live)
            dead.add(host.name)
            host.kill9()
            rec.faults.append(f"{now:.2f} kill -9 {host.name}")
        elif roll < 0.72 and live:
            host = rnd.choice(live)
            length = rnd.choice([0.5, lease * 0.8, lease * 1.6])
            host.freeze()
            frozen[host.name] = now + length
            rec.faults.append(f"{now:.2f} freeze {host.name} for {length}s")
        elif roll < 0.77 and not store_back:
            length = rnd.choice([0.5, lease * 0.4, lease * 1.75])
            for host in hosts:
                host.store.pause()
            store_back = now + length
            rec.faults.append(f"{now:.2f} store paused for {length}s")
        elif roll < 0.82 and live:
            host = rnd.choice(live)
            length = rnd.choice([0.5, lease * 1.5, lease * 3])
            host.store.pause()
            cut[host.name] = now + length
            rec.faults.append(f"{now:.2f} {host.name} cut off for {length}s")
        sim.run_for(0.25)
    for name in frozen:
        sim.hosts[name].thaw()
    for host in hosts:
        if host.name not in dead:
            host.store.resume()
    sim.run_for(60.0)
    return sim, rec


def check(sim: Sim, rec: Round) -> list[str]:
    """The invariants that the round broke, in words (empty: none)."""
    broken = []
    overlaps = sim.overlaps()
    if overlaps:
        broken.append(f"two runs of one key at once: {overlaps[:3]}")
    starts = [(host, run) for kind, _, host, _, run in sim.log if kind == "start"]
    if len(starts) != len({run for _, run in starts}):
        broken.append("a run started twice")
    slots = [(key, slot) for key, slot in sim.slots_started]
    if len(slots) != len(set(slots)):
        broken.append("an invocation won two runs that started")
    ended: dict[int, int] = {}
    stopped: set[int] = set()
    for host in sim.hosts.values():
        if host.runs is None:
            continue
        for _, run, code in host.runs.ended:
            ended[run] = code
            if code >= 128:
                stopped.add(run)
    for host_name, _key, caller in rec.callers:
        host = sim.hosts[host_name]
        if host.dead or caller.answer is None:
            continue
        if caller.answer.type == "error":
            continue  # refused: never accepted (the store was unreachable)
        result = caller.result
        if result is None:
            broken.append(f"a caller on {host_name} was never told an outcome")
            continue
        if result.type == "finished" and result.outcome != "lost":
            code = ended.get(result.run_id)
            if code is not None and code != result.exit_code:
                broken.append(f"run {result.run_id} ended {code}, its caller was told "
                              f"{result.exit_code}")
    started = {run for _, run in starts}
    died_or_froze = {h.name for h in sim.hosts.values() if h.dead} | {
        f.split()[2] for f in rec.faults if " freeze " in f} | {
        f.split()[1] for f in rec.faults if " cut off " in f}
    for row in sim.memory.history:
        if row["outcome"] != "lost":
            continue
        run = row["run_id"]
        if run in started and run not in stopped and row["host"] not in died_or_froze:
            broken.append(f"run {run} on {row['host']} was recorded lost while it ran and its "
                          "host was live and reachable")
    return broken


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--rich", action="store_true",
                        help="every option, job slots, and flush, cancel and kill")
    args = parser.parse_args()
    failures = 0
    for n in range(args.rounds):
        seed = args.seed * 100_003 + n
        sim, rec = play(seed, rich=args.rich)
        try:
            broken = check(sim, rec)
        finally:
            sim.close()
        if broken:
            failures += 1
            print(f"round {n} (seed {seed}): " + "; ".join(broken))
            for fault in rec.faults:
                print(f"    {fault}")
    print(f"{args.rounds} rounds, {failures} broke an invariant: "
          + ("FAIL" if failures else "all invariants held"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
