"""Each rule ``test_rules.py`` guards is really guarded: the test file fails on a copy of the
package with that rule broken (the mutations issue 22 listed, on the rulebook's code)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: (what is broken, file, the code, the broken code)
MUTANTS = [
    ("--on-busy signal joins at submission", "rules.py",
     'options.on_busy == "ignore" and running.stopping is None',
     'options.on_busy in ("ignore", "signal") and running.stopping is None'),
    ("--on-busy signal never sends the signal", "scheduler.py",
     "effects.append(SignalRun(running, inv.options.signal))", "pass"),
    ("a cancelled --no-trailing leader is not replaced", "rules.py",
     "        lead = True  # nothing to join (its leader was cancelled): lead afresh\n",
     "        pass\n"),
    ("restart-stopped callers dropped on supersede", "scheduler.py",
     "inv.adopted, prev.adopted = prev.adopted, ()", "inv.adopted, prev.adopted = (), ()"),
    ("a collect batch keeps the last two", "scheduler.py",
     "batch = prev.batch if prev.batch else [prev.payload]", "batch = [prev.payload]"),
    ("a collect batch newest first", "scheduler.py",
     "batch.append(inv.payload)", "batch.insert(0, inv.payload)"),
    ("a replaced leader waits a full delay", "rules.py",
     "lead = lead or pending.lead  #", "lead = lead  #"),
    ("the running run's --on-busy decides", "rules.py",
     "on_busy = pending.options.on_busy",
     'on_busy = getattr(running, "options", pending.options).on_busy'),
    ("a signal-joined invocation stays pending", "scheduler.py",
     "            self._set_pending(ks, None)\n            self._join_run(inv, running, effects)",
     "            self._join_run(inv, running, effects)"),
    ("a signal-joined invocation's count is lost", "rules.py",
     "running.coalesced += pending.coalesced", "pass"),
    ("a second stop sends TERM again", "scheduler.py",
     "        if run.stop_reason is not None:\n            return\n"
     "        run.stop_reason = reason",
     "        run.stop_reason = reason"),
    ("kill --signal stops the run", "scheduler.py",
     "        if signal is not None:\n            effects.append(SignalRun(run, signal))",
     "        if False:\n            pass"),
    ("restore forgets where max-wait counts from", "rules.py",
     "    k.max_from = first_at\n", "    pass\n"),
]


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize(("name", "module", "code", "broken"), MUTANTS,
                         ids=[m[0] for m in MUTANTS])
def test_the_rule_tests_catch_a_broken_rule(tmp_path: Path, name: str, module: str,
                                            code: str, broken: str) -> None:
    shutil.copytree(ROOT / "debounce_cli", tmp_path / "debounce_cli")
    shutil.copytree(ROOT / "tests", tmp_path / "tests",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    path = tmp_path / "debounce_cli" / module
    text = path.read_text()
    assert text.count(code) == 1, f"the code this mutant breaks moved: {code!r}"
    path.write_text(text.replace(code, broken))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
         "tests/test_rules.py"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(tmp_path)},
        capture_output=True, text=True, timeout=100)
    assert proc.returncode == 1, f"{name}: test_rules.py still passes\n{proc.stdout[-2000:]}"
