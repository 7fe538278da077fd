"""Config files: a user file and a project file set defaults for every run option and daemon
setting; the command line beats the environment, which beats the project file, the user file
and the defaults; `debounce config` says where each value comes from; a bad file is one line
and exit 2, and no daemon starts on half a configuration."""

from __future__ import annotations

import fnmatch
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from debounce_cli import options as table
from debounce_cli.settings import glob_match

from conftest import World, status, wait_until


@pytest.fixture
def cworld(world: World) -> World:
    """A world with a user config directory of its own (never the real user's)."""
    world.env["XDG_CONFIG_HOME"] = str(world.root / "config")
    return world


def user_file(world: World, text: str) -> Path:
    path = world.root / "config" / "debounce" / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def project_file(world: World, text: str, where: Path | None = None) -> Path:
    path = (where or world.work) / ".debounce.toml"
    path.write_text(textwrap.dedent(text))
    return path


def submit(world: World, *args: str, cwd: Path | None = None, env: dict | None = None) -> dict:
    """``run --no-wait --json`` of a never-running command; the daemon's acceptance."""
    proc = world.run("run", "--no-wait", "--json", *args, "--", "true",
                     cwd=cwd or world.work, env=env or world.env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def config(world: World, *args: str, cwd: Path | None = None, env: dict | None = None) -> dict:
    """``debounce config --json``, as {name: (value, origin)}."""
    proc = world.run("config", "--json", *args, cwd=cwd or world.work, env=env or world.env)
    assert proc.returncode == 0, proc.stderr
    return {row["name"]: (row["value"], row["origin"]) for row in json.loads(proc.stdout)
            ["settings"]}


def test_precedence_command_line_environment_project_user_default(cworld):
    user = user_file(cworld, 'delay = "40s"\n')
    assert submit(cworld, "--key", "a")["due_in"] == pytest.approx(40, abs=2)
    project = project_file(cworld, '# the team\'s\n\ndelay = "30s"\n')
    assert submit(cworld, "--key", "b")["due_in"] == pytest.approx(30, abs=2)
    env = {**cworld.env, "DEBOUNCE_DELAY": "25s"}
    assert submit(cworld, "--key", "c", env=env)["due_in"] == pytest.approx(25, abs=2)
    assert submit(cworld, "--key", "d", "--delay", "20s", env=env)["due_in"] == pytest.approx(
        20, abs=2)
    # ...and each origin, as `debounce config` tells it (file and line)
    assert config(cworld)["delay"] == (30.0, f"{project}:3")
    assert config(cworld, env=env)["delay"] == (25.0, "env:DEBOUNCE_DELAY")
    project.unlink()
    assert config(cworld)["delay"] == (40.0, f"{user}:1")
    user.unlink()
    assert config(cworld)["delay"] == (1.0, "default")


def test_config_prints_every_option_of_the_table_with_its_origin(cworld):
    project = project_file(cworld, """\
        on_busy = "restart"
        stop_timeout = 2
        jobs = 3
    """)
    proc = cworld.run("config")
    assert proc.returncode == 0, proc.stderr
    rows = {line.split("\t")[1].split(" = ")[0]: line for line in proc.stdout.splitlines()}
    names = [o.name for o in table.FIELDS] + [o.name for o in table.DAEMON_OPTIONS]
    assert list(rows) == names  # every run option and daemon setting, from the one table
    assert rows["on_busy"] == f'file:{project}:1\ton_busy = "restart"'
    assert rows["stop_timeout"] == f'file:{project}:2\tstop_timeout = "2s"'
    assert rows["jobs"] == f"file:{project}:3\tjobs = 3"
    assert rows["delay"] == 'default\tdelay = "1s"'


def test_a_per_key_section_sets_the_docs_key_for_the_whole_team(cworld):
    project_file(cworld, """\
        delay = "30s"

        [key."docs"]
        delay = "500ms"
        on_busy = "restart"

        [key."deploy:*"]
        delay = "45s"
    """)
    assert submit(cworld, "--key", "docs")["due_in"] == pytest.approx(0.5, abs=0.4)
    assert submit(cworld, "--key", "deploy:prod")["due_in"] == pytest.approx(45, abs=2)
    assert submit(cworld, "--key", "deploy")["due_in"] == pytest.approx(30, abs=2)
    # the command line still wins over a section
    assert submit(cworld, "--key", "deploy:x", "--delay", "20s")["due_in"] == pytest.approx(
        20, abs=2)
    seen = config(cworld, "docs")
    assert seen["on_busy"][0] == "restart" and seen["on_busy"][1].endswith(":5")
    assert config(cworld, "other")["on_busy"] == ("queue", "default")


def test_the_per_key_section_reaches_the_run_on_the_slow_path_too(cworld):
    """`debounce run` through click (a flag the fast parser leaves to it) resolves alike."""
    project_file(cworld, '[key."docs"]\ndelay = "40s"\n')
    proc = cworld.run("run", "--no-wait", "--json", "--key=docs", "--collect", "--", "true")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["due_in"] == pytest.approx(40, abs=2)


def test_a_flag_set_in_a_file_is_undone_on_the_command_line(cworld):
    project_file(cworld, "leading = true\n")
    # leading: the first invocation of a burst starts at once
    assert submit(cworld, "--key", "x", "--delay", "30s")["state"] != "pending"
    assert submit(cworld, "--key", "y", "--delay", "30s", "--no-leading")["state"] == "pending"


def test_the_project_file_is_the_nearest_one_up_to_the_repository_top(cworld):
    deep = cworld.work / "repo" / "src" / "pkg"
    deep.mkdir(parents=True)
    outer = project_file(cworld, 'delay = "30s"\n')
    assert config(cworld, cwd=deep)["delay"] == (30.0, f"{outer}:1")
    inner = project_file(cworld, 'delay = "35s"\n', where=cworld.work / "repo" / "src")
    assert config(cworld, cwd=deep)["delay"] == (35.0, f"{inner}:1")
    inner.unlink()
    (cworld.work / "repo" / ".git").mkdir()  # the repository's top: nothing above it counts
    assert config(cworld, cwd=deep)["delay"] == (1.0, "default")


def test_daemon_settings_come_from_the_user_file(cworld):
    user_file(cworld, "jobs = 1\n")
    assert status(cworld)["jobs"] == 1  # the auto-started daemon took it
    cworld.run("stop")
    proc = cworld.popen("daemon", "--jobs", "2")  # the command line wins
    wait_until(lambda: os.path.exists(cworld.socket))
    assert status(cworld)["jobs"] == 2
    cworld.run("stop")
    proc.wait(timeout=30)


def test_an_edited_file_is_read_again(cworld):
    """What was read is kept (tomllib costs a run 6 ms); an edit of the same size is seen."""
    project = project_file(cworld, 'delay = "30s"\n')
    assert submit(cworld, "--key", "j")["due_in"] == pytest.approx(30, abs=2)  # a state dir
    assert config(cworld)["delay"][0] == 30.0
    assert (cworld.state / "config-cache.json").stat().st_mode & 0o777 == 0o600
    project.write_text('delay = "35s"\n')
    assert config(cworld)["delay"][0] == 35.0
    assert submit(cworld, "--key", "k")["due_in"] == pytest.approx(35, abs=2)
    project.write_text('delay = "3 s"\n')
    assert cworld.run("config").returncode == 2


PROBE = """
import sys
from debounce_cli import fast
sys.argv = ["debounce", *sys.argv[1:]]
try:
    fast.main()
except SystemExit:
    pass
print("LOADED=" + ",".join(m for m in ("tomllib", "json", "click") if m in sys.modules),
      file=sys.__stderr__)
"""


def test_a_plain_run_with_a_config_file_stays_on_the_fast_path(cworld):
    """Once read and kept in the state directory, a config file costs a run no tomllib, json
    or click (nor re, which an editable install's import hook loads anyway)."""
    project_file(cworld, 'delay = "30s"\n[key."docs*"]\non_busy = "restart"\n')
    user_file(cworld, "stop_timeout = 2\n")
    args = ["run", "--no-wait", "--key", "docs1", "--", "true"]
    loaded = []
    for _ in range(3):  # the first makes the state directory (it starts the daemon)
        proc = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True,
                              text=True, env=cworld.env, cwd=cworld.work, timeout=30)
        assert proc.returncode == 0, proc.stderr
        loaded.append(proc.stderr.strip().splitlines()[-1])
    assert "tomllib" in loaded[0]  # the first read
    assert loaded[2] == "LOADED="


@given(st.text("ab*?", max_size=8), st.text("ab", max_size=8))
def test_key_globs_match_as_fnmatch_does(pattern, key):
    assert glob_match(key, pattern) == fnmatch.fnmatchcase(key, pattern)


BAD = [
    ("delay = [\n", 1, "invalid TOML"),
    ('delay = "5 parsecs"\n', 1, "delay"),
    ('\n\ndealy = "2s"\n', 3, "'dealy'; did you mean 'delay'?"),
    ('jobs = "4"\n', 1, "jobs must be a whole number"),
    ('on_busy = "later"\n', 1, "on_busy must be one of"),
    ("leading = 1\n", 1, "leading must be true or false"),
    ('[key."docs"]\njobs = 2\n', 2, "jobs is a daemon setting"),
    ('store = "http://x"\n', 1, "store"),
    ("keep_logs = -1\n", 1, "keep_logs must be at least 0"),
    ('max_wait = "0"\n', 1, "max_wait must be greater than 0"),
]


@pytest.mark.parametrize(("text", "line", "says"), BAD)
@pytest.mark.parametrize("which", ["project", "user"])
def test_a_bad_file_is_one_line_naming_file_line_and_key_and_nothing_starts(cworld, which,
                                                                           text, line, says):
    path = project_file(cworld, text) if which == "project" else user_file(cworld, text)
    for args in (("run", "--", "true"), ("run", "--no-wait", "--key", "k", "true"),
                 ("config",), ("daemon",)):
        proc = cworld.run(*args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert proc.stderr.count("\n") == 1, proc.stderr
        assert f"{path}:{line}:" in proc.stderr and says in proc.stderr, proc.stderr
    assert not os.path.exists(cworld.socket)  # no daemon on half a configuration


def test_a_daemon_started_by_hand_refuses_a_bad_user_file_before_listening(cworld):
    user_file(cworld, "idle_exit = true\n")
    proc = subprocess.run(cworld.argv("daemon", "--stdin"), input="true\n", text=True,
                          capture_output=True, env=cworld.env, cwd=cworld.work, timeout=30)
    assert proc.returncode == 2 and "idle_exit must be a duration" in proc.stderr
    assert not os.path.exists(cworld.socket)
