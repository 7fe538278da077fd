"""Edges a new user meets in the first hour (issue 11): what the client says and exits with."""

from __future__ import annotations

import os
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


def test_a_caller_with_closed_stdout_or_stderr_still_gets_the_runs_status(world):
    for redirect in (">&-", "2>&-", ">&- 2>&-"):
        cmd = " ".join(world.argv("run", "--delay", "0", "--", "sh", "-c", "echo out; exit 3"))
        proc = subprocess.run(["sh", "-c", f"{cmd} {redirect}"], capture_output=True,
                              text=True, env=world.env, cwd=world.work, timeout=30)
        assert proc.returncode == 3, (redirect, proc.stderr)
        assert "Traceback" not in proc.stderr


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
