"""The README's set-up lines and .ci/run cannot drift apart."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest

from debounce_cli.cli import cli

ROOT = Path(__file__).resolve().parent.parent


def _setup_lines() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = text.split("```sh\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip()]


def test_readme_starts_with_exactly_two_setup_commands():
    lines = _setup_lines()
    assert len(lines) == 2, lines
    assert "debounce run" in lines[0]
    assert "pytest" in lines[1]


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert _setup_lines()[1] in ci


GENDOCS = ROOT / "scripts" / "gendocs.py"


def test_generated_man_pages_and_completions_are_fresh():
    """man/ and completions/ match what the click definitions generate now."""
    r = subprocess.run([sys.executable, str(GENDOCS), "--check"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("name", sorted(cli.commands))
def test_every_subcommand_page_names_each_option(name):
    page = (ROOT / "man" / f"debounce-{name}.1").read_text().replace("\\-", "-")
    command = cli.commands[name]
    for param in command.params:
        if isinstance(param, click.Option) and not param.hidden:
            for opt in param.opts + param.secondary_opts:
                assert opt in page, f"{opt} missing from man/debounce-{name}.1"
    for section in ("OPTIONS", "EXIT STATUS", "ENVIRONMENT", "FILES", "EXAMPLES"):
        assert f".SH {section}" in page


def test_main_page_lists_every_subcommand():
    page = (ROOT / "man" / "debounce.1").read_text().replace("\\-", "-")
    for name in cli.commands:
        assert f"debounce-{name}" in page


@pytest.mark.skipif(shutil.which("groff") is None, reason="groff is not installed")
def test_man_pages_render_without_warnings():
    for page in sorted((ROOT / "man").glob("*.1")):
        r = subprocess.run(["groff", "-man", "-ww", "-z", str(page)], capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 0 and r.stderr == "", f"{page.name}: {r.stderr}"


@pytest.mark.parametrize(("shell", "name"), [("bash", "debounce.bash"), ("zsh", "_debounce"),
                                             ("fish", "debounce.fish")])
def test_completion_command_prints_the_shipped_script(shell, name):
    r = subprocess.run([sys.executable, "-m", "debounce_cli", "completion", shell],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0
    assert r.stdout == (ROOT / "completions" / name).read_text()


def test_readme_documents_every_exit_status_and_command():
    from debounce_cli.exits import ExitStatus

    readme = (ROOT / "README.md").read_text()
    for status in ExitStatus.all().values():
        if status:
            assert f"| {int(status)} |" in readme, f"exit status {int(status)} not in README"
    for name in cli.commands:
        assert f"debounce {name}" in readme, f"debounce {name} not in README"


def test_the_man_pages_explain_every_exit_status():
    from debounce_cli.exits import ExitStatus

    page = (ROOT / "man" / "debounce.1").read_text()
    for status in ExitStatus.all().values():
        assert f".B {int(status)}\n" in page, f"exit status {int(status)} not in debounce(1)"


def test_readme_module_table_names_every_module():
    """Each module of the package has its row (``a.py``, ``b.py`` share one; a row's later
    names take the first one's directory)."""
    readme = (ROOT / "README.md").read_text()
    table = readme.split("| module | its one job |", 1)[1].split("\n\n", 1)[0]
    named = set()
    for row in table.splitlines()[2:]:
        names = [n.strip().strip("`") for n in row.split("|")[1].split(",")]
        folder = names[0].rpartition("/")[0]
        named.update(n if "/" in n or not folder else f"{folder}/{n}" for n in names)
    package = ROOT / "debounce_cli"
    modules = {str(p.relative_to(package)) for p in package.rglob("*.py")
               if p.name not in ("__init__.py", "__main__.py")}
    assert modules <= named, f"not in README's module table: {sorted(modules - named)}"
