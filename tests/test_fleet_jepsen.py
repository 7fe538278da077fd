"""The short version of the real-process Jepsen run (``tests/fleet_jepsen.py``): three host
daemons, each reaching a real redis-server through a proxy of its own, clients on every
host, and random faults (kill -9, SIGSTOP, a host cut off, answers lost, the store frozen);
then the checker over what ran and what every client was told."""

from __future__ import annotations

import pytest
from fleet_jepsen import play

pytestmark = pytest.mark.slow


@pytest.mark.timeout(300)
def test_random_real_faults_break_no_invariant() -> None:
    verdict = play(seed=11, seconds=15)
    assert verdict.runs > 0 and verdict.calls > 0
    assert not verdict.problems, str(verdict)
