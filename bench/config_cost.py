"""What looking for config files costs the fast client path: ``python bench/config_cost.py``.

Figures (rows of (name, target, measured), as ``bench/__main__.py`` prints them):
  config: import      importing ``debounce_cli.settings`` on top of what ``debounce run``
                      imports anyway (``-X importtime``, the median of several starts)
  config: look-up     ``settings.load()`` in a directory 8 levels deep with no config file
                      above it and no repository: the stat calls of the walk and of the user
                      file, per call
  config: no file     the two together, against the 1 ms budget
  config: with files  ``settings.load()`` with a user and a project file: read with tomllib
                      the first time, then from the cache of checked files in the state
                      directory (paid only by those who write a config file)
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PROBE = """
import os, sys, time
os.chdir(sys.argv[1])
import debounce_cli.options, debounce_cli.durations, debounce_cli.protocol  # a run has them
t0 = time.perf_counter_ns()
from debounce_cli import settings
settings.load()
print(time.perf_counter_ns() - t0)
"""


def _import_and_first_load(cwd: Path, env: dict[str, str], starts: int) -> float:
    """Microseconds for the import of settings plus its first load, in a fresh Python."""
    times = []
    for _ in range(starts):
        out = subprocess.run([sys.executable, "-c", PROBE, str(cwd)], env=env, cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout
        times.append(int(out) / 1000)
    return statistics.median(times)


def _lookup(cwd: Path, env: dict[str, str], calls: int) -> float:
    """Microseconds per ``settings.load()`` (its cache emptied each time), in this process."""
    from debounce_cli import settings

    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    here = os.getcwd()
    os.chdir(cwd)
    try:
        settings._cache.clear()
        settings.load()  # warm
        t0 = time.perf_counter()
        for _ in range(calls):
            settings._cache.clear()
            settings.load()
        return (time.perf_counter() - t0) / calls * 1e6
    finally:
        os.chdir(here)
        os.environ.clear()
        os.environ.update(saved)
        settings._cache.clear()


def bench_config_cost(rows: list[tuple[str, str, str]], quick: bool = False) -> None:
    starts, calls = (5, 2000) if quick else (21, 20000)
    with tempfile.TemporaryDirectory(prefix="dbc-", dir="/tmp") as tmp:
        root = Path(tmp)
        deep = root.joinpath(*"abcdefgh")
        deep.mkdir(parents=True)
        state = root / "state"
        state.mkdir(mode=0o700)
        env = {**os.environ, "XDG_CONFIG_HOME": str(root / "config"), "PYTHONPATH": str(ROOT),
               "DEBOUNCE_STATE_DIR": str(state)}
        env.pop("DEBOUNCE_DELAY", None)
        env.pop("PYTHONDONTWRITEBYTECODE", None)  # an installed package has its .pyc files
        _import_and_first_load(deep, env, 1)  # writes them
        first = _import_and_first_load(deep, env, starts)
        per_call = _lookup(deep, env, calls)
        rows.append(("config: look-up, no file (8 levels deep)", "(measured)",
                     f"{per_call:.1f} µs a call"))
        rows.append(("config: import + first look-up, no file", "≤ 1 ms",
                     f"{first / 1000:.3f} ms (median of {starts} starts)"))
        (root / "config" / "debounce").mkdir(parents=True)
        (root / "config" / "debounce" / "config.toml").write_text('delay = "2s"\njobs = 4\n')
        (deep / ".debounce.toml").write_text('on_busy = "restart"\n[key."docs"]\n'
                                             'delay = "500ms"\n')
        uncached = []
        for _ in range(starts):
            (state / "config-cache.json").unlink(missing_ok=True)
            uncached.append(_import_and_first_load(deep, env, 1))
        cached = _import_and_first_load(deep, env, starts)
        rows.append(("config: user and project file, first read", "(measured)",
                     f"{statistics.median(uncached) / 1000:.3f} ms (tomllib's import is most "
                     "of it)"))
        rows.append(("config: user and project file, cached", "≤ 1 ms",
                     f"{cached / 1000:.3f} ms"))


def main() -> int:
    rows: list[tuple[str, str, str]] = []
    bench_config_cost(rows, quick="--quick" in sys.argv)
    width = max(len(name) for name, _, _ in rows)
    for name, target, measured in rows:
        print(f"{name:<{width}}  {target:<12}  {measured}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
