"""The benchmark suite cannot rot: its quick mode runs and prints every figure."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

#: Minutes of real processes at scale: the full run (README's test command) only.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(180)
def test_quick_bench_runs_and_prints_every_figure():
    r = subprocess.run([sys.executable, "-m", "bench", "--quick"], cwd=ROOT, capture_output=True,
                       text=True, timeout=170)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert out.startswith("machine: ")
    for label in ("client: python -c pass", 'client: python -c "import click"',
                  "client: debounce run --no-wait", "client: debounce run --delay 0 -- true",
                  "x python -c pass", "hook: git post-commit", "submit: 8 connections, journal",
                  "submit: 8 connections, no-journal", "lateness:", "memory:", "scaling:",
                  "burst:", "idle: CPU", "stdin: intake of", "lines, journal",
                  "lines, no-journal", "stdin: memory,", "stdin: lateness,"):
        assert label in out, f"{label} missing from:\n{out}"
