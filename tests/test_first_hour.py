"""Edges a new user meets in the first hour (issue 11): what the client says and exits with."""

from __future__ import annotations

import os
import shlex
import subprocess


def test_a_missing_interpreter_is_reported_as_a_shell_would(world):
    script = world.work / "x"
    script.write_text("#!/nope\necho hi\n")
    script.chmod(0o755)
    proc = world.run("run", "--delay", "0", "--", "./x")
    assert proc.returncode == 126
    assert proc.stderr.strip() == "debounce: ./x: /nope: bad interpreter: No such file or directory"


def test_an_executable_script_without_a_shebang_runs_with_sh(world):
    script = world.work / "y"
    script.write_text("echo from-sh\n")
    script.chmod(0o755)
    proc = world.run("run", "--delay", "0", "--", "./y")
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "from-sh\n", "")


def test_a_caller_with_closed_stdout_or_stderr_still_learns_the_runs_status(world):
    """Output that cannot be written is a write error (exit 1, as coreutils do), and the line
    says what the run's own status was; a closed stream that gets nothing is no error."""
    for redirect in (">&-", "2>&-", ">&- 2>&-"):
        cmd = shlex.join(world.argv("run", "--delay", "0", "--", "sh", "-c",
                                    "echo out; echo err >&2; exit 3"))
        proc = subprocess.run(["sh", "-c", f"{cmd} {redirect}"], capture_output=True,
                              text=True, env=world.env, cwd=world.work, timeout=30)
        assert proc.returncode == 1, (redirect, proc.stderr)
        assert "Traceback" not in proc.stderr
        if redirect == ">&-":
            assert proc.stderr.startswith("err\ndebounce: write error: Bad file descriptor; "
                                          "run "), proc.stderr
            assert proc.stderr.endswith(" exited 3\n"), proc.stderr
    for redirect, output in ((">&-", "echo err >&2"), ("2>&-", "echo out")):
        cmd = shlex.join(world.argv("run", "--delay", "0", "--", "sh", "-c", f"{output}; exit 3"))
        proc = subprocess.run(["sh", "-c", f"{cmd} {redirect}"], capture_output=True,
                              text=True, env=world.env, cwd=world.work, timeout=30)
        assert proc.returncode == 3, (redirect, proc.stderr)


def test_a_bad_delay_names_the_variable_only_when_it_was_used(world):
    proc = world.run("run", "--delay", "banana", "--", "true")
    assert proc.returncode == 2
    assert "DEBOUNCE_DELAY" not in proc.stderr and "banana" in proc.stderr
    env = dict(world.env, DEBOUNCE_DELAY="banana")
    proc = world.run("run", "--", "true", env=env)
    assert proc.returncode == 2 and "DEBOUNCE_DELAY" in proc.stderr


def test_socket_advice_never_touches_a_shared_directory(world):
    proc = world.run("run", "--socket", "/tmp/x.sock", "--", "true")
    assert proc.returncode == 2
    assert "chmod" not in proc.stderr and "private directory" in proc.stderr
    assert os.stat("/tmp").st_mode & 0o1777 == 0o1777


def _history(world) -> list[dict]:
    import json

    proc = world.run("history", "--json")
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines()]


def test_kill_stops_a_running_run_and_its_waiters_get_its_real_status(world):
    from conftest import lines, wait_until

    started = world.work / "started"
    waiter = world.popen("run", "--delay", "0", "--key", "long", "--", "sh", "-c",
                         f"echo go > {started}; exec sleep 30")
    wait_until(lambda: lines(started), timeout=10)
    killed = world.run("kill", "long")
    assert killed.returncode == 0, killed.stderr
    _out, err = waiter.communicate(timeout=30)
    assert waiter.returncode == 143, err
    assert "stopped by 'debounce kill'" in err
    assert [(r["key"], r["outcome"], r["exit_code"]) for r in _history(world)] == [
        ("long", "killed", 143)]
    nothing = world.run("kill", "long")
    assert nothing.returncode == 117 and "nothing is running" in nothing.stderr


def test_kill_with_a_signal_sends_it_once(world):
    from conftest import lines, wait_until

    log = world.work / "log"
    script = (f'trap "echo hup >> {log}; exit 5" HUP; echo up >> {log}; '
              "while :; do sleep 0.05; done")
    waiter = world.popen("run", "--delay", "0", "--key", "srv", "--", "sh", "-c", script)
    wait_until(lambda: lines(log) == ["up"], timeout=10)
    assert world.run("kill", "--key", "srv", "--signal", "HUP").returncode == 0
    waiter.communicate(timeout=30)
    assert waiter.returncode == 5 and lines(log) == ["up", "hup"]


def test_a_timeout_says_so_in_one_line(world):
    proc = world.run("run", "--delay", "0", "--timeout", "200ms", "--", "sleep", "10")
    assert proc.returncode == 143
    assert proc.stderr.strip().startswith("debounce: run 1 timed out after")


def test_ctrl_c_while_waiting_says_how_to_reattach(world):
    import signal

    from conftest import status, wait_until

    waiter = world.popen("run", "--key", "later", "--delay", "30s", "--", "true")
    wait_until(lambda: any(r["key"] == "later" for r in status(world)["keys"]), timeout=10)
    waiter.send_signal(signal.SIGINT)
    _out, err = waiter.communicate(timeout=10)
    assert waiter.returncode == 130
    assert "debounce wait --key later" in err and "Traceback" not in err
    assert any(r["key"] == "later" for r in status(world)["keys"])  # still pending


def test_key_and_run_say_outright_what_a_bare_argument_leaves_open(world):
    first = world.run("run", "--delay", "0", "--key", "1", "--", "sh", "-c", "exit 4")
    assert first.returncode == 4  # key "1", whose run is run 1
    ambiguous = world.run("wait", "1")
    assert ambiguous.returncode == 2
    assert "--key 1" in ambiguous.stderr and "--run 1" in ambiguous.stderr
    assert world.run("wait", "--run", "1").returncode == 4
    assert world.run("wait", "--key", "1").returncode == 4
    both = world.run("wait", "1", "--key", "1")
    assert both.returncode == 2


def test_a_no_trailing_caller_that_joins_a_finished_leading_run_sees_its_output(world):
    first = world.run("run", "--leading", "--no-trailing", "--delay", "5s", "--key", "lead",
                      "--", "sh", "-c", "echo leading-output; exit 3")
    assert (first.returncode, first.stdout) == (3, "leading-output\n")
    second = world.run("run", "--leading", "--no-trailing", "--delay", "5s", "--key", "lead",
                       "--", "sh", "-c", "echo never")
    assert (second.returncode, second.stdout) == (3, "leading-output\n"), second.stderr
