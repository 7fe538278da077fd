"""debounce's benchmarks: ``python -m bench`` (full) or ``python -m bench --quick``.

Prints one table of figures and the machine they were measured on. Every figure that is
compared with another is measured in the same run, so ratios hold on a noisy shared machine;
nothing here asserts a timing (tests/test_bench.py only checks that the quick mode runs).

Figures:
  client     round trip of `debounce run --no-wait` and of a waiting `debounce run --delay 0`
             against a warm daemon, with the floors `python -c pass` and
             `python -c "import click"` (and tsp/nq when installed)
  hook       cost a git post-commit hook running `debounce run --no-wait` adds to a commit
  submit     submissions per second over 8 persistent connections, journal on and off, and
             the daemon's CPU per submission against one json.loads of the same request, and
             against the transport's floor (an asyncio server that only answers, same load)
  lateness   start minus due time, p50/p99, of probe runs among many pending keys
  memory     daemon memory per pending invocation
  scaling    cost of one submission with 1k, 10k, 100k keys already pending
  burst      1,000 runs falling due at once: time to start them all, and client latency
  idle       CPU time an idle daemon uses in 10 s
  stdin      `debounce daemon --stdin`: lines taken in per second, journal on and off, memory
             per pending invocation, and lateness as the commands themselves see it, one line
             at a time and 300 at once, the latter against its floor (the same commands
             started at once by subprocess, no debounce) as p50 and p99 ratios
  socket     1,000 socket keys falling due at the same moment: the commands' lateness
             against the same floor, as ratios
  slope      memory per pending invocation with the journal on, socket and stdin, as the
             slope of the daemon's RSS between two sizes (20,000 and 100,000 pending)
  fleet      three daemons on one redis-server: --fleet submissions per second against
             redis-benchmark on the same server, the cost of a submission with 40 and 10,000
             keys pending, due-to-start and start-to-remote-waiter latency (bench/fleet.py)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.fleet import bench_fleet  # noqa: E402
from debounce_cli import protocol  # noqa: E402

BIN = Path(sys.executable).parent
DEBOUNCE = str(BIN / "debounce") if (BIN / "debounce").exists() else None


class Daemon:
    """A daemon of our own on a private socket and state dir, for one measurement."""

    def __init__(self, *args: str, feed: bool = False, env: dict[str, str] | None = None):
        self.root = Path(tempfile.mkdtemp(prefix="dbb-", dir="/tmp"))
        self.socket = str(self.root / "s" / "daemon.sock")
        self.env = dict(os.environ, DEBOUNCE_SOCKET=self.socket,
                        DEBOUNCE_STATE_DIR=str(self.root / "state"), **(env or {}))
        self.env.pop("DEBOUNCE_DELAY", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "debounce_cli", "daemon", "--idle-exit", "0", *args],
            env=self.env, cwd=ROOT, stdin=subprocess.PIPE if feed else subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                self.session().close()
                return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError("the daemon did not start")

    def session(self) -> Session:
        return Session(self.socket)

    def rss_kib(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0

    def cpu_seconds(self) -> float:
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def page_faults(self) -> int:
        """Minor page faults so far: memory the kernel had to map in for the process."""
        with open(f"/proc/{self.proc.pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[7])

    def feed(self, data: bytes) -> None:
        """Write to the daemon's stdin (``--stdin`` daemons, started with ``feed=True``)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def close(self) -> None:
        if self.proc.stdin is not None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.root, ignore_errors=True)


class Session:
    """A persistent protocol connection: hello once, then any number of one-shot requests."""

    def __init__(self, path: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.file = self.sock.makefile("rb")
        self.sock.sendall(protocol.encode(protocol.Hello(client="bench")))
        self.recv()

    def recv(self) -> protocol.Message:
        return protocol.decode(self.file.readline(), protocol.REPLIES)

    def ask(self, msg: protocol.Message) -> protocol.Message:
        self.sock.sendall(protocol.encode(msg))
        return self.recv()

    def submit(self, key: str, argv: list[str], delay: float, env: dict[str, str]) -> None:
        reply = self.ask(protocol.RunRequest(argv=argv, cwd="/", env=env, key=key,
                                             options={"delay": delay}, wait=False))
        if not isinstance(reply, protocol.Accepted):
            raise RuntimeError(f"submission refused: {reply}")

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def timed(argv: list[str], runs: int, env: dict[str, str] | None = None) -> list[float]:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, check=False)
        times.append((time.perf_counter() - start) * 1000)
    return times


# ----------------------------------------------------------------------------- measurements
def git_repo(env: dict[str, str]) -> tuple[Path, dict[str, str]]:
    """A fresh git repository with one commit, its user set in the repository itself, and an
    environment that keeps the user's and the system's git configuration (and hooks) out."""
    repo = Path(tempfile.mkdtemp(prefix="dbb-git-", dir="/tmp"))
    env = dict(env, GIT_CONFIG_GLOBAL=os.devnull, GIT_CONFIG_NOSYSTEM="1")
    for argv in (["git", "init", "-q"], ["git", "config", "user.name", "bench"],
                 ["git", "config", "user.email", "bench@example.invalid"],
                 ["git", "commit", "--allow-empty", "-q", "-m", "start"]):
        subprocess.run(argv, cwd=repo, env=env, check=True, stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL)
    return repo, env


def bench_client(rows: list[tuple[str, str, str]], runs: int) -> None:
    # An installed package has its bytecode compiled (pip does it at install time); a source
    # checkout under PYTHONDONTWRITEBYTECODE=1 would recompile ours on every start while
    # click's stays compiled, and the comparison would measure the compiler.
    import compileall

    compileall.compile_dir(str(ROOT / "debounce_cli"), quiet=1)
    daemon = Daemon()
    repo: Path | None = None
    try:
        client = [DEBOUNCE] if DEBOUNCE else [sys.executable, "-m", "debounce_cli"]
        cases = {
            "python -c pass": [sys.executable, "-c", "pass"],
            'python -c "import click"': [sys.executable, "-c", "import click"],
            "debounce run --no-wait": [*client, "run", "--no-wait", "--delay", "1h", "--key",
                                                "bench", "--", "true"],
            "debounce run --delay 0 -- true": [*client, "run", "--delay", "0", "--key",
                                               "bench-wait", "--", "true"],
        }
        if shutil.which("tsp"):
            cases["tsp true"] = ["tsp", "true"]
        if shutil.which("nq"):
            cases["nq true"] = ["nq", "true"]
        # The hook: a post-commit hook submitting to this daemon, put in place and taken away
        # again by a rename, so commits with and without it take turns.
        repo, git_env = git_repo(daemon.env)
        hook = repo / ".git" / "hooks" / "post-commit"
        hook_off = hook.with_name("post-commit.off")
        hook_off.write_text("#!/bin/sh\nexec "
                            f"{shlex.join(client)} run --no-wait --key hook --delay 5s -- true\n")
        hook_off.chmod(0o755)
        commit = ["git", "commit", "--allow-empty", "-q", "-m", "x"]

        def commits(with_hook: bool, n: int) -> list[float]:
            if with_hook != hook.exists():
                os.replace(*((hook_off, hook) if with_hook else (hook, hook_off)))
            times = []
            for _ in range(n):
                start = time.perf_counter()
                subprocess.run(commit, cwd=repo, env=git_env, check=True,
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
                times.append((time.perf_counter() - start) * 1000)
            return times

        results: dict[str, list[float]] = {name: [] for name in cases}
        hooked: dict[bool, list[float]] = {False: [], True: []}
        for argv in cases.values():  # warm the page cache
            timed(argv, 2, daemon.env)
        commits(False, 2)
        commits(True, 2)
        for _ in range(runs):  # interleaved, so a noisy moment hits every case alike
            for name, argv in cases.items():
                results[name] += timed(argv, 1, daemon.env)
            for with_hook in (False, True):
                hooked[with_hook] += commits(with_hook, 1)
        click_median = statistics.median(results['python -c "import click"'])
        pass_median = statistics.median(results["python -c pass"])
        for name, times in results.items():
            median = statistics.median(times)
            note = f"{median / click_median:.2f}x import click"
            if name != "python -c pass":
                note += f", {median / pass_median:.2f}x python -c pass"
            rows.append((f"client: {name}",
                         f"median {median:.1f} ms, p95 {percentile(times, 95):.1f} ms", note))
        bare, with_hook = (statistics.median(hooked[h]) for h in (False, True))
        rows.append(("hook: git post-commit, debounce run --no-wait",
                     f"{with_hook - bare:+.1f} ms per commit",
                     f"{(with_hook - bare) / pass_median:.2f}x python -c pass; median commit "
                     f"{bare:.1f} ms bare, {with_hook:.1f} ms hooked"))
    finally:
        daemon.close()
        if repo is not None:
            shutil.rmtree(repo, ignore_errors=True)


def loads_floor(line: bytes) -> float:
    """CPU seconds one ``json.loads`` of ``line`` takes here: the floor the daemon's CPU per
    submission is compared with, measured in the same run. CPU time (not wall time), the
    best of many short rounds, so that other processes on a busy machine count as little
    as they can in either figure."""
    import timeit

    text = line.decode()
    number = 500
    return min(timeit.repeat(lambda: json.loads(text), number=number, repeat=20,
                             timer=time.process_time)) / number


def journal_commits(daemon: Daemon) -> int:
    """How many group commits the daemon's journal has made (its metrics)."""
    session = daemon.session()
    try:
        reply = session.ask(protocol.MetricsRequest())
    finally:
        session.close()
    assert isinstance(reply, protocol.MetricsReply)
    for line in reply.text.splitlines():
        if line.startswith("debounce_journal_commit_seconds_count"):
            return int(float(line.split()[-1]))
    return 0


#: The floors of the submission figures. With "canned", an asyncio server that answers every
#: line with the same canned line, reading nothing of it (no decoding, no scheduling, no
#: journal): what the event loop, the transport and the kernel cost per request. With
#: "decode", the same server reads each line with the daemon's own decoder and answers it with
#: the daemon's own accepted line: what a daemon costs that only reads and answers.
_ANSWERING_SERVER = """
import asyncio, sys
REPLY = b'{"type":"accepted","id":1,"key":"k","state":"pending","due_in":1.0,"coalesced":1}\\n'
# Read as the daemon reads (daemon/reading.py): into one buffer, not a fresh one per read.
BUFFER = memoryview(bytearray(256 * 1024))
if sys.argv[2] == "decode":
    from debounce_cli import protocol
    DECODER = protocol.RequestDecoder()

    def answer(line):
        msg = DECODER.decode(line)
        if isinstance(msg, protocol.RunRequest):
            return protocol.accepted_line(1, msg.key, "pending", 1.0, 1)
        return REPLY
else:
    def answer(line):
        return REPLY

class Answer(asyncio.BufferedProtocol):
    def connection_made(self, transport):
        self.transport, self.buffer = transport, b""

    def get_buffer(self, sizehint):
        return BUFFER

    def buffer_updated(self, nbytes):
        self.buffer += BUFFER[:nbytes]
        end = self.buffer.rfind(b"\\n") + 1
        if end:
            lines = self.buffer[:end].splitlines(keepends=True)
            self.buffer = self.buffer[end:]
            self.transport.write(b"".join(map(answer, lines)))

async def main():
    await asyncio.get_running_loop().create_unix_server(Answer, sys.argv[1])
    print("ready", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


class AnsweringServer(Daemon):
    """:data:`_ANSWERING_SERVER` on a socket of its own, driven as a daemon is."""

    def __init__(self, mode: str = "canned") -> None:
        # Not Daemon.__init__: no state directory, and the hello gets the canned line too.
        self.root = Path(tempfile.mkdtemp(prefix="dbb-", dir="/tmp"))
        self.socket = str(self.root / "echo.sock")
        self.proc = subprocess.Popen([sys.executable, "-c", _ANSWERING_SERVER, self.socket,
                                      mode], cwd=ROOT, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert self.proc.stdout is not None
        if self.proc.stdout.readline() != b"ready\n":
            raise RuntimeError("the answering server did not start")


def bench_submissions(rows: list[tuple[str, str, str]], seconds: float) -> None:
    env = dict(os.environ)
    sample = protocol.encode(protocol.RunRequest(argv=["true"], cwd="/", env=env, key="s0-0",
                                                 options={"delay": 3600.0}, wait=False))
    floor = loads_floor(sample)
    measured = []
    for journal in ("--journal", "--no-journal", "floor", "reading"):
        daemon = (AnsweringServer() if journal == "floor" else AnsweringServer("decode")
                  if journal == "reading" else Daemon(journal))
        try:
            counts = [0] * 8
            stop = time.monotonic() + seconds

            def sender(daemon: Daemon, stop: float, counts: list[int], index: int) -> None:
                # Requests are encoded up front and answers only checked, so the figure is the
                # daemon's rate rather than this client's JSON work.
                session = daemon.session()
                lines = [protocol.encode(protocol.RunRequest(
                    argv=["true"], cwd="/", env=env, key=f"s{index}-{k}",
                    options={"delay": 3600.0}, wait=False)) for k in range(200)]
                i = 0
                while time.monotonic() < stop:
                    session.sock.sendall(lines[i % 200])
                    if not session.file.readline().startswith(b'{"type":"accepted"'):
                        raise RuntimeError("submission refused")
                    i += 1
                counts[index] = i
                session.close()

            threads = [threading.Thread(target=sender, args=(daemon, stop, counts, i))
                       for i in range(8)]
            cpu_before = daemon.cpu_seconds()
            faults_before = daemon.page_faults()
            start = time.monotonic()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            elapsed = time.monotonic() - start
            rate = sum(counts) / elapsed
            used = daemon.cpu_seconds() - cpu_before
            faults = (daemon.page_faults() - faults_before) / max(1, sum(counts))
            per = used / max(1, sum(counts))
            name = journal.lstrip("-")
            batch = ""
            if journal == "--journal":
                commits = journal_commits(daemon)
                batch = f", {sum(counts) / max(1, commits):.1f} submissions per commit"
            if journal not in ("floor", "reading"):
                rows.append((f"submit: 8 connections, {name}", f"{rate:,.0f} submissions/s",
                             f"daemon CPU {used / elapsed:.0%}{batch}, {faults:.2f} page "
                             "faults per submission"))
            measured.append((name, per))
        finally:
            daemon.close()
    floor = min(floor, loads_floor(sample))  # again after: the quieter of the two moments
    transport = dict(measured)["floor"]
    for name, per in measured:
        if name == "floor":
            rows.append(("submit: the transport's floor, CPU per request",
                         f"{per * 1e6:.1f} µs, {per / floor:.2f}x json.loads",
                         "an asyncio server answering each line with a canned line, reading "
                         "none of it, the same load: event loop, transport and kernel"))
            continue
        if name == "reading":
            rows.append(("submit: reading and answering alone, CPU per request",
                         f"{per * 1e6:.1f} µs, {per / floor:.2f}x json.loads",
                         "the same server reading each line with the daemon's decoder "
                         "(environments remembered) and answering with its accepted line; no "
                         "options, scheduling, metrics or journal"))
            continue
        rows.append((f"submit: daemon CPU per submission, {name}",
                     f"{per * 1e6:.1f} µs, {per / floor:.2f}x json.loads",
                     f"one json.loads of the same {len(sample):,}-byte request: "
                     f"{floor * 1e6:.1f} µs of CPU; target <= 3x; above the transport's "
                     f"floor: {(per - transport) * 1e6:.1f} µs"))


def bench_lateness(rows: list[tuple[str, str, str]], pending: int, probes: int) -> None:
    daemon = Daemon()
    try:
        env = dict(os.environ)
        session = daemon.session()
        for i in range(pending):
            session.submit(f"idle-{i}", ["true"], 3600, env)
        for i in range(probes):
            session.submit(f"probe-{i}", ["true"], 0.5 + 2.0 * i / probes, env)
        deadline = time.monotonic() + 60
        runs: list[protocol.RunRecord] = []
        while time.monotonic() < deadline:
            reply = session.ask(protocol.HistoryRequest(limit=probes))
            assert isinstance(reply, protocol.HistoryReply)
            runs = [r for r in reply.runs if r.key.startswith("probe-")]
            if len(runs) >= probes:
                break
            time.sleep(0.2)
        session.close()
        late = [(r.started_at - (r.due_at or r.started_at)) * 1000 for r in runs]
        rows.append((f"lateness: {probes} probes among {pending:,} pending",
                     f"p50 {percentile(late, 50):.2f} ms, p99 {percentile(late, 99):.2f} ms",
                     "start minus due, as the daemon records them"))
    finally:
        daemon.close()


def bench_memory_and_scaling(rows: list[tuple[str, str, str]], sizes: list[int],
                             sample: int) -> None:
    daemon = Daemon("--no-journal")
    try:
        env = dict(os.environ)
        session = daemon.session()
        time.sleep(0.2)
        base = daemon.rss_kib()
        held = 0
        for size in sizes:
            while held < size:
                session.submit(f"mem-{held}", ["make", "-C", "docs", "html"], 3600, env)
                held += 1
            time.sleep(0.2)
            per = (daemon.rss_kib() - base) * 1024 / held
            start = time.perf_counter()
            for i in range(sample):
                session.submit(f"mem-{i}", ["make", "-C", "docs", "html"], 3600, env)
            cost = (time.perf_counter() - start) / sample * 1e6
            rows.append((f"memory: {size:,} pending", f"{per:,.0f} bytes per invocation",
                         "same environment"))
            rows.append((f"scaling: submit with {size:,} pending", f"{cost:.0f} µs each",
                         "one connection, round trip"))
        session.close()
    finally:
        daemon.close()


def bench_burst(rows: list[tuple[str, str, str]], runs: int) -> None:
    """Many runs falling due at once: how fast they start, and whether clients still get in."""
    daemon = Daemon("--no-journal")
    try:
        env = dict(os.environ)
        session = daemon.session()
        for i in range(runs):
            session.submit(f"burst-{i}", ["true"], 0.5, env)
        start = time.monotonic()
        worst = 0.0
        while True:
            asked = time.monotonic()
            reply = session.ask(protocol.StatusRequest())
            worst = max(worst, time.monotonic() - asked)
            if not reply.keys:  # type: ignore[attr-defined]
                break
            time.sleep(0.05)
        session.close()
        took = time.monotonic() - start
        rows.append((f"burst: {runs:,} runs due at once", f"all done in {took:.2f} s",
                     f"slowest status answer meanwhile {worst * 1000:.0f} ms"))
    finally:
        daemon.close()


def bench_idle(rows: list[tuple[str, str, str]], seconds: float) -> None:
    daemon = Daemon()
    try:
        time.sleep(0.5)
        before = daemon.cpu_seconds()
        time.sleep(seconds)
        used = daemon.cpu_seconds() - before
        rows.append((f"idle: CPU over {seconds:g} s", f"{used * 1000:.0f} ms", ""))
    finally:
        daemon.close()


def stdin_taken(daemon: Daemon, key: str) -> bool:
    """Whether a ``--stdin`` daemon holds ``key`` pending: a ``wait`` on a connection of its
    own, which is cheap however many keys are pending (a status reply lists them all)."""
    session = daemon.session()
    try:
        return isinstance(session.ask(protocol.WaitRequest(target=key, by="key")),
                          protocol.Pending)
    finally:
        session.close()


def bench_stdin_intake(rows: list[tuple[str, str, str]], lines: int, rounds: int) -> None:
    """Lines a ``--stdin`` daemon takes in per second, from the first byte written until all
    are pending, and what each pending invocation costs it in memory; medians of ``rounds``
    fresh daemons a variant, journal on and off taking turns."""
    data = b"".join(b'{"argv": ["true"], "key": "k%d", "delay": "1h"}\n' % i
                    for i in range(lines))
    last = f"k{lines - 1}"
    variants = ("--journal", "--no-journal")
    took: dict[str, list[float]] = {v: [] for v in variants}
    grown: dict[str, list[int]] = {v: [] for v in variants}
    for _ in range(rounds):
        for journal in variants:
            daemon = Daemon("--stdin", journal, feed=True)
            try:
                time.sleep(0.2)
                base = daemon.rss_kib()
                writer = threading.Thread(target=daemon.feed, args=(data,))
                start = time.perf_counter()
                writer.start()
                # Lines are taken in in order: the last one pending means all are. The poll is
                # a `wait` for the last key, as a status reply listing every key would take the
                # daemon longer to build than the lines took to read.
                deadline = time.monotonic() + 120
                while not stdin_taken(daemon, last):
                    if time.monotonic() > deadline:
                        raise RuntimeError("the stdin daemon did not take in every line")
                    time.sleep(0.005)
                took[journal].append(time.perf_counter() - start)
                grown[journal].append(daemon.rss_kib() - base)
                writer.join()
                session = daemon.session()
                reply = session.ask(protocol.StatusRequest())
                session.close()
                assert isinstance(reply, protocol.StatusReply)
                pending = sum(1 for k in reply.keys if k.pending is not None)
                if pending != lines:
                    raise RuntimeError(f"{pending} of {lines} stdin lines pending")
            finally:
                daemon.close()
    for journal in variants:
        name = journal.lstrip("-")
        seconds = statistics.median(took[journal])
        rows.append((f"stdin: intake of {lines:,} lines, {name}",
                     f"{lines / seconds:,.0f} lines/s",
                     f"all pending after {seconds:.2f} s (median of {rounds})"))
        rows.append((f"stdin: memory, {lines:,} pending from stdin, {name}",
                     f"{statistics.median(grown[journal]) * 1024 / lines:,.0f} bytes per "
                     "invocation", "daemon RSS growth / lines"))


def bench_memory_slope(rows: list[tuple[str, str, str]], sizes: tuple[int, int]) -> None:
    """Memory per pending invocation with the journal on, as a slope: the daemon's RSS at
    ``sizes[0]`` and ``sizes[1]`` pending (distinct keys, one environment), so what is fixed
    (the interpreter, SQLite's page cache) drops out. Socket submissions, then stdin lines."""
    small, large = sizes
    env = dict(os.environ)
    for source in ("socket", "stdin"):
        daemon = Daemon("--stdin", feed=True) if source == "stdin" else Daemon()
        try:
            rss: list[int] = []
            held = 0
            session = daemon.session()
            for size in sizes:
                if source == "socket":
                    while held < size:
                        session.submit(f"m{held}", ["make", "-C", "docs", "html"], 3600, env)
                        held += 1
                else:
                    daemon.feed(b"".join(b'{"argv": ["make", "-C", "docs", "html"], '
                                         b'"key": "m%d", "delay": "1h"}\n' % i
                                         for i in range(held, size)))
                    held = size
                    deadline = time.monotonic() + 300
                    while not stdin_taken(daemon, f"m{size - 1}"):
                        if time.monotonic() > deadline:
                            raise RuntimeError("the stdin daemon did not take every line")
                        time.sleep(0.05)
                time.sleep(0.3)  # the last group commit
                rss.append(daemon.rss_kib())
            session.close()
        finally:
            daemon.close()
        slope = (rss[1] - rss[0]) * 1024 / (large - small)
        rows.append((f"memory slope, journal, {source}: {small:,} -> {large:,} pending",
                     f"{slope:,.0f} bytes per invocation",
                     f"RSS {rss[0] / 1024:.1f} -> {rss[1] / 1024:.1f} MiB; target <= 1,024"))


def stamp_command(out: Path) -> list[str]:
    """The command every lateness figure starts: it writes its own clock (ns) to ``out``."""
    return ["sh", "-c", f"date +%s%N >> {shlex.quote(str(out))}"]


def read_stamps(out: Path, count: int, timeout: float = 120) -> list[int]:
    """The first ``count`` stamps written to ``out``, waiting for them."""
    found: list[int] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            found = [int(x) for x in out.read_text().split()]
        except (OSError, ValueError):  # not there yet, or a line half written
            found = []
        if len(found) >= count:
            return found
        time.sleep(0.01)
    raise RuntimeError(f"only {len(found)} of {count} runs wrote their stamp")


def floor_lateness(count: int) -> list[float]:
    """The floor: ``count`` of the same commands started at once by Python's ``subprocess``
    (vfork and one exec each), no debounce at all; each one's clock minus the start, in ms."""
    root = Path(tempfile.mkdtemp(prefix="dbb-", dir="/tmp"))
    try:
        out = root / "stamps"
        command = stamp_command(out)
        started = time.time()
        procs = [subprocess.Popen(command) for _ in range(count)]
        for proc in procs:
            proc.wait()
        return [(int(x) / 1e9 - started) * 1000 for x in out.read_text().split()]
    finally:
        shutil.rmtree(root, ignore_errors=True)


def ratio_rows(rows: list[tuple[str, str, str]], what: str,
               rounds: list[tuple[list[float], list[float]]]) -> None:
    """Rows for ``what``: its lateness, its floor, and their ratio at p50 and p99, from the
    round whose p50 ratio is the median of ``rounds`` (each a (lateness, floor) pair, the
    floor measured right after), with the range of the ratios over all rounds: on a shared
    machine the load moves between one measurement and the next."""
    ratios = []
    for late, floor in rounds:
        ratios.append((percentile(late, 50) / percentile(floor, 50),
                       percentile(late, 99) / percentile(floor, 99), late, floor))
    ratios.sort(key=lambda r: r[0])
    r50, r99, late, floor = ratios[len(ratios) // 2]
    p50, p99 = percentile(late, 50), percentile(late, 99)
    f50, f99 = percentile(floor, 50), percentile(floor, 99)
    rows.append((f"{what}: lateness", f"p50 {p50:.1f} ms, p99 {p99:.1f} ms",
                 "`date` in the command minus the due time"))
    rows.append((f"{what}: floor, {len(floor)} started by subprocess at once",
                 f"p50 {f50:.1f} ms, p99 {f99:.1f} ms",
                 "the same commands, no debounce at all, right after"))
    spread = ""
    if len(ratios) > 1:
        lows, highs = min(r[0] for r in ratios), max(r[0] for r in ratios)
        low99, high99 = min(r[1] for r in ratios), max(r[1] for r in ratios)
        spread = (f"; median of {len(ratios)} rounds (p50 {lows:.2f}-{highs:.2f}x, "
                  f"p99 {low99:.2f}-{high99:.2f}x)")
    rows.append((f"{what}: ratio to the floor", f"p50 {r50:.2f}x, p99 {r99:.2f}x",
                 f"target <= 1.25x each{spread}"))


def bench_stdin_lateness(rows: list[tuple[str, str, str]], lines: int, singles: int = 20,
                         rounds: int = 1) -> None:
    """Lines written at once, each running `date` into a file: the command's own clock minus
    the time the lines were written, so reading, parsing, scheduling and spawning all count.
    The floor (the same commands started by subprocess at once) is measured right after,
    ``rounds`` times."""
    pairs = []
    for round_ in range(rounds):
        daemon = Daemon("--stdin", feed=True)
        try:
            out = daemon.root / "stamps"
            command = stamp_command(out)

            def line(key: str, command: list[str] = command) -> bytes:
                return json.dumps({"argv": command, "key": key, "delay": "0"}).encode() + b"\n"

            daemon.feed(line("warm-up"))  # the first run, and imports on its path, not measured
            read_stamps(out, 1)
            alone = []
            if round_ == 0:
                # One line at a time: what a line costs when the machine is not busy starting
                # others.
                for i in range(singles):
                    written = time.time()
                    daemon.feed(line(f"one{i}"))
                    alone.append((read_stamps(out, 2 + i)[-1] / 1e9 - written) * 1000)
                rows.append((f"stdin: lateness, one line at a time ({singles})",
                             f"p50 {percentile(alone, 50):.1f} ms, "
                             f"p99 {percentile(alone, 99):.1f} ms",
                             "`date` in the command minus time written; target p50 <= 5, "
                             "p99 <= 20"))
            data = b"".join(line(f"l{i}") for i in range(lines))
            written = time.time()
            daemon.feed(data)
            late = [(ns / 1e9 - written) * 1000
                    for ns in read_stamps(out, 1 + len(alone) + lines)[1 + len(alone):]]
        finally:
            daemon.close()
        pairs.append((late, floor_lateness(lines)))
    ratio_rows(rows, f"stdin: {lines} lines written at once", pairs)


def spawner_pid(daemon: Daemon) -> int | None:
    """The pid of the daemon's spawner (spawner.PROGRAM), a child of the daemon."""
    try:
        with open(f"/proc/{daemon.proc.pid}/task/{daemon.proc.pid}/children") as f:
            children = [int(pid) for pid in f.read().split()]
    except OSError:
        return None
    for pid in children:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"marshal" in f.read():
                    return pid
        except OSError:
            continue
    return None


def cpu_of(pid: int | None) -> float:
    if pid is None:
        return 0.0
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bench_socket_lateness(rows: list[tuple[str, str, str]], keys: int, rounds: int = 1
                          ) -> None:
    """``keys`` socket submissions of distinct keys, all due at the same wall-clock moment
    (each one's delay is that moment minus the time it is sent), each running `date` into a
    file: the command's own clock minus the due time. Floor measured right after, ``rounds``
    times. Also the CPU the daemon and its spawner spend on each of those runs, from its due
    time until every run has ended."""
    pairs = []
    spent = []
    for _ in range(rounds):
        daemon = Daemon()
        try:
            out = daemon.root / "stamps"
            command = stamp_command(out)
            env = dict(os.environ)
            session = daemon.session()
            session.submit("warm-up", command, 0, env)
            read_stamps(out, 1)
            due = time.time() + 1.0 + keys * 0.002  # room for a busy machine
            for i in range(keys):
                session.submit(f"due-{i}", command, max(0.0, due - time.time()), env)
            if time.time() > due:
                raise RuntimeError("submitting took longer than the delay; raise it")
            spawner = spawner_pid(daemon)
            before = daemon.cpu_seconds() + cpu_of(spawner)
            late = [(ns / 1e9 - due) * 1000 for ns in read_stamps(out, 1 + keys)[1:]]
            while session.ask(protocol.StatusRequest()).keys:  # type: ignore[attr-defined]
                time.sleep(0.05)
            spent.append((daemon.cpu_seconds() + cpu_of(spawner) - before) / keys)
            session.close()
        finally:
            daemon.close()
        pairs.append((late, floor_lateness(keys)))
    ratio_rows(rows, f"socket: {keys:,} keys due at once", pairs)
    rows.append((f"socket: {keys:,} keys due at once: daemon and spawner CPU per run",
                 f"{statistics.median(spent) * 1000:.2f} ms",
                 "from the due time until every run has ended"
                 + (f" (median of {rounds})" if rounds > 1 else "")))


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = ""
    try:
        with open("/proc/meminfo") as f:
            mem = f"{int(f.readline().split()[1]) / 1024 / 1024:.0f} GiB"
    except OSError:
        pass
    return (f"{platform.system()} {platform.release()}, {os.cpu_count()} CPUs ({cpu}), {mem}, "
            f"Python {platform.python_version()}")


def busy(before: float, after: float) -> str:
    """The machine's load over the run, and what it means for the figures: absolute times
    and rates are the machine's of the moment (a busy machine cannot reproduce a quiet
    one's), ratios to a floor are measured in the same run and hold better."""
    cpus = os.cpu_count() or 1
    said = f"1-minute load average {before:.1f} at the start, {after:.1f} at the end ({cpus} CPUs)"
    if max(before, after) > cpus / 2:
        said += ("; the machine was busy with other work: absolute times and rates are slower "
                 "than on a quiet machine and move from run to run; compare the ratios, each "
                 "measured against its floor in this run")
    return said


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short run (used by the tests)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    parser.add_argument("--only", choices=["spawn", "memory", "submit", "fleet"],
                        help="spawn: only the lateness figures against their floors; "
                             "memory: only the memory slopes; submit: only the submission "
                             "rates and CPU per submission; fleet: only the fleet's")
    args = parser.parse_args(argv)
    rows: list[tuple[str, str, str]] = []
    load_before = os.getloadavg()[0]
    if args.only == "spawn":
        bench_stdin_lateness(rows, 300, 20 if args.quick else 50, 1 if args.quick else 3)
        bench_socket_lateness(rows, 1000, 1 if args.quick else 3)
    elif args.only == "submit":
        bench_submissions(rows, 0.5 if args.quick else 3)
    elif args.only == "memory":
        bench_memory_slope(rows, (2_000, 10_000) if args.quick else (20_000, 100_000))
    elif args.only == "fleet":
        if args.quick:
            bench_fleet(rows, 0.5, 5, Daemon, percentile, many=1_000)
        else:
            bench_fleet(rows, 3, 50, Daemon, percentile)
    elif args.quick:
        bench_client(rows, 5)
        bench_submissions(rows, 0.5)
        bench_lateness(rows, 500, 20)
        bench_memory_and_scaling(rows, [1000, 3000], 200)
        bench_burst(rows, 100)
        bench_idle(rows, 1)
        bench_stdin_intake(rows, 5_000, 1)
        bench_stdin_lateness(rows, 300)
        bench_socket_lateness(rows, 1000)
        bench_memory_slope(rows, (2_000, 10_000))
        bench_fleet(rows, 0.5, 5, Daemon, percentile, many=1_000)
    else:
        bench_client(rows, 30)
        bench_submissions(rows, 3)
        bench_lateness(rows, 10_000, 200)
        bench_memory_and_scaling(rows, [1_000, 10_000, 100_000], 2000)
        bench_burst(rows, 1000)
        bench_idle(rows, 10)
        bench_stdin_intake(rows, 10_000, 3)
        bench_stdin_lateness(rows, 300, 50, 3)
        bench_socket_lateness(rows, 1000, 3)
        bench_memory_slope(rows, (20_000, 100_000))
        bench_fleet(rows, 3, 50, Daemon, percentile)
    load = busy(load_before, os.getloadavg()[0])
    if args.json:
        print(json.dumps({"machine": machine(), "load": load, "rows": rows}, indent=1))
        return 0
    print(f"machine: {machine()}")
    print(f"load: {load}")
    width = max(len(r[0]) for r in rows)
    value_width = max(len(r[1]) for r in rows)
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:<{value_width}}  {note}".rstrip())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
