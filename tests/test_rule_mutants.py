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
     "        if signal is not None:\n            if signal not in run.signalled:",
     "        if False:\n            if signal not in run.signalled:"),
    ("restore forgets where max-wait counts from", "rules.py",
     "    k.max_from = first_at\n", "    pass\n"),
]


UNBROKEN = "(the package as it is)"
#: Runs test_rules.py once per mutant directory given, each in a child forked after pytest
#: and hypothesis are imported (they are most of a start-up) and before the package is: the
#: child imports the mutant's copy (hypothesis's pytest plugin, already imported, is not
#: rewritten for assertions: pytest's warning about it is let through). Prints "index
#: exit-code" a line.
FORK_SERVER = """
import os, sys
import hypothesis, pytest
for index, where in enumerate(sys.argv[1:]):
    pid = os.fork()
    if pid == 0:
        os.chdir(where)
        sys.path.insert(0, where)
        out = os.open(os.path.join(where, "pytest.out"), os.O_WRONLY | os.O_CREAT, 0o600)
        os.dup2(out, 1)
        os.dup2(out, 2)
        code = pytest.main(["-q", "-x", "-n", "0", "-p", "no:cacheprovider", "-W",
                            "ignore::pytest.PytestAssertRewriteWarning", "tests/test_rules.py"])
        sys.stdout.flush()
        os._exit(int(code))
    print(index, os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
"""


@pytest.fixture(scope="module")
def verdicts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[int, str]]:
    """test_rules.py's exit code and output on each mutant, by the mutant's name."""
    dirs = []
    for name, module, code, broken in [*MUTANTS, (UNBROKEN, "rules.py", "", "")]:
        where = tmp_path_factory.mktemp("mutant")
        shutil.copytree(ROOT / "debounce_cli", where / "debounce_cli")
        shutil.copytree(ROOT / "tests", where / "tests",
                        ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy(ROOT / "pyproject.toml", where)
        path = where / "debounce_cli" / module
        text = path.read_text()
        if name != UNBROKEN:
            assert text.count(code) == 1, f"{name}: the code this mutant breaks moved: {code!r}"
            path.write_text(text.replace(code, broken))
        dirs.append(where)
    proc = subprocess.run([sys.executable, "-c", FORK_SERVER, *map(str, dirs)],
                          env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
                          capture_output=True, text=True, timeout=100 + 10 * len(dirs))
    assert proc.returncode == 0, proc.stderr
    codes = dict(line.split() for line in proc.stdout.splitlines())
    return {name: (int(codes[str(i)]), (where / "pytest.out").read_text())
            for i, (name, where) in enumerate(zip([*(m[0] for m in MUTANTS), UNBROKEN], dirs,
                                                  strict=True))}


@pytest.mark.slow
def test_the_rule_tests_pass_on_the_unbroken_copy(verdicts: dict[str, tuple[int, str]]) -> None:
    """The copies are run the way that catches the mutants, and the unbroken one passes."""
    code, output = verdicts[UNBROKEN]
    assert code == 0, output[-2000:]


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", [m[0] for m in MUTANTS])
def test_the_rule_tests_catch_a_broken_rule(verdicts: dict[str, tuple[int, str]],
                                            name: str) -> None:
    code, output = verdicts[name]
    assert code == 1, f"{name}: test_rules.py still passes\n{output[-2000:]}"
