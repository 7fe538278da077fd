"""The benchmark suite cannot rot: its quick mode runs, prints every figure, and every figure is
a measurement (a positive number), not only a label."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: Figures that may honestly be zero.
MAY_BE_ZERO = ("idle: CPU",)


def numbers(text: str) -> list[float]:
    """The figures in a row's value; the digits of a label such as "p50" or "p99" are not."""
    return [float(n.replace(",", "")) for n in re.findall(r"(?<![\w.])\d[\d,]*(?:\.\d+)?", text)]


def unmeasured(rows: list[tuple[str, str, str]]) -> list[str]:
    """The rows whose value holds no figure, or (except where zero is honest) no positive one."""
    wrong = []
    for name, value, _note in rows:
        found = numbers(value)
        if not found:
            wrong.append(f"{name}: no figure in {value!r}")
        elif not name.startswith(MAY_BE_ZERO) and not any(n > 0 for n in found):
            wrong.append(f"{name}: no positive figure in {value!r}")
    return wrong


def test_a_row_without_a_real_figure_is_caught():
    rows = [("lateness: 20 probes among 500 pending", "p50 0.00 ms, p99 0.00 ms", ""),
            ("client: python -c pass", "median 0.0 ms, p95 0.0 ms", ""),
            ("scaling: submit with 1,000 pending", "nan µs each", ""),
            ("burst: 100 runs due at once", "all done in 0.00 s", ""),
            ("idle: CPU over 1 s", "0 ms", ""),
            ("hook: git post-commit", "-1.5 ms per commit", ""),
            ("memory: 1,000 pending", "1,234 bytes per invocation", "")]
    assert [line.split(":")[0] for line in unmeasured(rows)] == [
        "lateness", "client", "scaling", "burst"]


@pytest.mark.slow  # real daemons and processes for a minute or so: the full run only
@pytest.mark.timeout(400)
def test_quick_bench_runs_and_prints_every_figure():
    r = subprocess.run([sys.executable, "-m", "bench", "--quick", "--json"], cwd=ROOT,
                       capture_output=True, text=True, timeout=390)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["machine"]
    rows = out["rows"]
    names = "\n".join(name for name, _value, _note in rows)
    for label in ("client: python -c pass", 'client: python -c "import click"',
                  "client: debounce run --no-wait", "client: debounce run --delay 0 -- true",
                  "hook: git post-commit", "submit: 8 connections, journal",
                  "submit: 8 connections, no-journal", "lateness:", "memory:", "scaling:",
                  "burst:", "idle: CPU", "stdin: intake of", "lines, journal",
                  "lines, no-journal", "stdin: memory,", "stdin: lateness, one line",
                  "stdin: 300 lines written at once: lateness",
                  "stdin: 300 lines written at once: floor",
                  "stdin: 300 lines written at once: ratio to the floor",
                  "socket: 1,000 keys due at once: lateness",
                  "socket: 1,000 keys due at once: floor",
                  "socket: 1,000 keys due at once: ratio to the floor",
                  "memory slope, journal, socket", "memory slope, journal, stdin"):
        assert label in names, f"{label} missing from:\n{names}"
    if shutil.which("redis-server"):  # (without it the fleet's row says "skipped")
        for label in ("fleet: submissions, 3 daemons", "fleet: the ceiling, LOCAL",
                      "fleet: due to start",
                      "fleet: start to a waiter on another host"):
            assert label in names, f"{label} missing from:\n{names}"
    assert any("x python -c pass" in note for _name, _value, note in rows)
    assert unmeasured([row for row in rows if row[:2] != ("fleet", "skipped")]) == []
    ratios = [value for name, value, _note in rows if name.endswith("ratio to the floor")]
    assert len(ratios) == 2
    for value in ratios:  # "p50 1.23x, p99 1.45x": both measured
        assert len(re.findall(r"\d+\.\d+x", value)) == 2, value

