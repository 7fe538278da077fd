"""ruff and mypy (strict, see pyproject.toml) pass on the whole tree, so CI checks both."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_ruff_finds_nothing():
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "debounce_cli", "tests", "bench",
                        "scripts"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.timeout(600)
def test_mypy_strict_finds_nothing():
    r = subprocess.run([sys.executable, "-m", "mypy", "--no-incremental"], cwd=ROOT,
                       capture_output=True, text=True, timeout=590)
    assert r.returncode == 0, r.stdout + r.stderr
