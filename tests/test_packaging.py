"""Packaging: the sdist carries what the wheel needs; the wheel, installed in a fresh venv
(offline), puts the man pages where man(1) finds them and the completions where bash, zsh and
fish look, under the install prefix, and the licence in the metadata."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BASH_COMPLETION = Path("/usr/share/bash-completion/bash_completion")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def _build(tmp: Path) -> tuple[Path, Path]:
    """The sdist of a copy of the source, and the wheel built from that sdist (so the sdist
    is known to be complete), without build isolation: no network."""
    source = tmp / "source"
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                            check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        if (ROOT / name).is_file():  # a file deleted in the work tree is still listed
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    build = ("import sys; from setuptools import build_meta as b; "
             "print(getattr(b, sys.argv[1])(sys.argv[2]))")
    sdist_name = subprocess.run([sys.executable, "-c", build, "build_sdist", str(tmp / "dist")],
                                cwd=source, capture_output=True, text=True, check=True)
    sdist = tmp / "dist" / sdist_name.stdout.strip().splitlines()[-1]
    with tarfile.open(sdist) as tar:
        tar.extractall(tmp / "unpacked", filter="data")
    unpacked = next((tmp / "unpacked").iterdir())
    wheel_name = subprocess.run([sys.executable, "-c", build, "build_wheel",
                                 str(tmp / "wheel")], cwd=unpacked, capture_output=True,
                                text=True, check=True)
    return sdist, tmp / "wheel" / wheel_name.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("pkg")
    sdist, wheel = _build(tmp)
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q",
                    "--no-index", "--no-deps", str(wheel)], check=True)
    # The dependencies, offline: the test venv's own (click, rich, ...), by a .pth file.
    site = subprocess.run([str(python), "-c", "import sysconfig; "
                           "print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "test-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return {"sdist": sdist, "wheel": wheel, "venv": venv}


def test_the_licence_is_in_the_sdist_and_the_wheel(installed):
    with tarfile.open(installed["sdist"]) as tar:
        names = tar.getnames()
    top = names[0].split("/")[0]
    assert f"{top}/LICENSE" in names
    for generated in ("man/debounce-run.1", "completions/debounce.bash", "bin/debounce"):
        assert f"{top}/{generated}" in names
    with zipfile.ZipFile(installed["wheel"]) as whl:
        licences = [n for n in whl.namelist() if n.endswith("dist-info/licenses/LICENSE")]
        assert licences and "MIT License" in whl.read(licences[0]).decode()
        metadata = next(n for n in whl.namelist() if n.endswith("dist-info/METADATA"))
        assert "License-Expression: MIT" in whl.read(metadata).decode()


def test_man_renders_every_page_from_the_prefix(installed):
    share = installed["venv"] / "share"
    pages = sorted(p.stem for p in (ROOT / "man").glob("*.1"))
    assert sorted(p.stem for p in (share / "man" / "man1").glob("*.1")) == pages
    if shutil.which("man") is None:
        pytest.skip("man is not installed")
    env = {**os.environ, "MANPAGER": "cat", "PAGER": "cat", "MANWIDTH": "80"}
    proc = subprocess.run(["man", "-M", str(share / "man"), "debounce-run"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "debounce run [OPTIONS]" in proc.stdout and "--delay" in proc.stdout


def test_the_completions_are_where_the_shells_look(installed):
    share = installed["venv"] / "share"
    assert (share / "zsh" / "site-functions" / "_debounce").is_file()
    assert (share / "fish" / "vendor_completions.d" / "debounce.fish").is_file()
    bash = share / "bash-completion" / "completions" / "debounce.bash"
    assert bash.is_file()
    bin_dir = installed["venv"] / "bin"
    if BASH_COMPLETION.exists():
        # bash-completion's own loader finds it by the command's name under the prefix.
        load = f"source {BASH_COMPLETION}; __load_completion debounce; complete -p debounce"
        env = {**os.environ, "XDG_DATA_DIRS": str(share)}
    else:
        load = f"source {bash}; complete -p debounce"
        env = dict(os.environ)
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    proc = subprocess.run(["bash", "-c", load], capture_output=True, text=True, env=env,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "-F _debounce_completion debounce" in proc.stdout
    # ...and the function it installs completes, through the installed command.
    complete = (f"source {bash}; COMP_WORDS=(debounce con); COMP_CWORD=1; "
                "_debounce_completion debounce; printf '%s\\n' \"${COMPREPLY[@]}\"")
    proc = subprocess.run(["bash", "-c", complete], capture_output=True, text=True, env=env,
                          timeout=60)
    assert proc.stdout.split() == ["config"], proc.stderr


def test_the_installed_command_runs(installed):
    proc = subprocess.run([str(installed["venv"] / "bin" / "debounce"), "--version"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "debounce, version" in proc.stdout, proc.stderr
