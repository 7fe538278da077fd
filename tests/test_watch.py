"""``debounce watch`` end to end: big bursts, single files, temporary files, ignores, Ctrl-C.

Each test runs the real ``debounce watch`` as a subprocess in its own world and waits for the
watcher to say it is watching (its watches are in place by then) before changing anything.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from conftest import World, lines, status, wait_until

USAGE_HINT = "write: debounce watch PATH... -- COMMAND [ARG]..."


def _start(world: World, *args: str) -> tuple[subprocess.Popen[str], Path]:
    """``debounce watch ARGS`` in the background, once its watches are in place."""
    log = world.root / f"watch-{len(world.procs)}.err"
    with log.open("w") as err:
        proc = world.popen("watch", *args, stderr=err)
    wait_until(lambda: "watching" in log.read_text() or proc.poll() is not None, timeout=15)
    assert proc.poll() is None, log.read_text()
    return proc, log


def _idle(world: World) -> None:
    wait_until(lambda: not any(k["pending"] or k["running"] for k in status(world)["keys"]),
               timeout=20)


def _history(world: World) -> list[dict]:
    r = world.run("history", "--json")
    assert r.returncode == 0, r.stderr
    return [json.loads(line) for line in r.stdout.splitlines() if line.strip()]


def _runs(out: Path) -> list[set[str]]:
    """What each run wrote: its $DEBOUNCE_CHANGED_PATHS, closed by a '--' line."""
    text = out.read_text() if out.exists() else ""
    return [set(filter(None, run.split("\n"))) for run in text.split("--\n")[:-1]]


RECORD = 'printf "%s\\n--\\n" "$DEBOUNCE_CHANGED_PATHS" >> "$0"'


def _interrupt(proc: subprocess.Popen[str]) -> int:
    proc.send_signal(signal.SIGINT)
    return proc.wait(timeout=15)


# ------------------------------------------------------------------ 1. big bursts
def test_a_big_burst_reaches_one_run_through_a_private_file(world):
    """4,200 long names at once: one run that succeeds, listing them all in the file (a
    delay of 3 s: writing them takes over a second on a busy machine)."""
    src = world.work / "src"
    src.mkdir()
    out = world.root / "out"
    out.mkdir()
    script = (
        'f="$DEBOUNCE_CHANGED_PATHS_FILE"; cp "$f" "$0/list"; echo "$f" > "$0/name"; '
        'stat -c %a "$f" > "$0/mode"; stat -c %a "$(dirname "$f")" > "$0/dirmode"; '
        'printf %s "${DEBOUNCE_CHANGED_PATHS+set}" > "$0/env"'
    )
    watch, log = _start(world, "--delay", "3s", "src", "--", "sh", "-c", script, str(out))
    names = [src / (f"{i:05d}-" + "n" * 120) for i in range(4200)]
    for name in names:
        name.write_text("")

    def listed_or_settled() -> bool:
        if len(lines(out / "list")) >= len(names):
            return True
        return (out / "list").exists() and not any(
            k["pending"] or k["running"] for k in status(world)["keys"])

    wait_until(listed_or_settled, timeout=60, interval=0.2)
    _idle(world)
    runs = _history(world)
    listed = lines(out / "list")
    assert len(listed) == len(names) and [run["exit_code"] for run in runs] == [0], (
        f"{len(listed)} of {len(names)} names listed; runs (status, coalesced): "
        f"{[(run['exit_code'], run['coalesced']) for run in runs]}; the watcher said: "
        f"{log.read_text()[-2000:]!r}")
    assert set(listed) == {str(name) for name in names}
    assert (out / "mode").read_text().strip() == "600"
    assert (out / "dirmode").read_text().strip() == "700"
    assert (out / "env").read_text() == ""  # too big for the environment: unset
    listing = Path((out / "name").read_text().strip())
    assert _interrupt(watch) == 130
    assert not listing.parent.exists()  # the private directory goes with the watcher


def test_a_small_burst_is_in_the_environment_and_the_file(world):
    src = world.work / "src"
    src.mkdir()
    out = world.root / "out"
    script = RECORD + '; cat "$DEBOUNCE_CHANGED_PATHS_FILE" >> "$0"'
    watch, _log = _start(world, "--delay", "300ms", "src", "--", "sh", "-c", script, str(out))
    (src / "a.c").write_text("a")
    (src / "b.c").write_text("b")
    wait_until(lambda: len(lines(out)) >= 5)
    _idle(world)
    want = [str(src / "a.c"), str(src / "b.c")]
    assert lines(out) == [*want, "--", *want]
    assert _interrupt(watch) == 130


# ------------------------------------------------------------------ 2. a single file
def test_a_watched_file_keeps_counting_after_a_save_by_rename(world):
    """Editors save by writing a temporary file and renaming it over the original."""
    notes = world.work / "notes.txt"
    notes.write_text("v1\n")
    out = world.root / "runs.txt"
    watch, _log = _start(world, "--delay", "150ms", "notes.txt", "--", "sh", "-c", RECORD,
                         str(out))
    tmp = world.work / ".notes.txt.tmp4711"
    tmp.write_text("v2\n")
    os.replace(tmp, notes)
    wait_until(lambda: len(_runs(out)) == 1)
    for count in (2, 3):
        with notes.open("a") as f:
            f.write("more\n")
        wait_until(lambda count=count: len(_runs(out)) == count)
    assert _runs(out) == [{str(notes)}] * 3  # the temporary file next to it never counts
    assert _interrupt(watch) == 130


# ------------------------------------------------------------------ 3. temporary files
def test_files_created_and_removed_within_the_burst_are_not_listed(world):
    src = world.work / "src"
    src.mkdir()
    (src / "x").write_text("v1")
    (src / "old.txt").write_text("old")
    out = world.root / "runs.txt"
    watch, _log = _start(world, "--delay", "500ms", "src", "--", "sh", "-c", RECORD, str(out))
    tmp = src / ".x.tmp123"  # an editor's save
    tmp.write_text("v2")
    os.replace(tmp, src / "x")
    for dropping in ("x___jb_tmp___", "#x#"):  # JetBrains', Emacs'
        (src / dropping).write_text("v2")
        (src / dropping).unlink()
    (src / "old.txt").unlink()  # existed before: a deletion is a change
    (src / "new.txt").write_text("new")
    wait_until(lambda: _runs(out), timeout=15)
    _idle(world)
    assert _runs(out) == [{str(src / "x"), str(src / "old.txt"), str(src / "new.txt")}]
    assert _interrupt(watch) == 130


# ------------------------------------------------------------------ 4, 5. ignores
@pytest.mark.parametrize("pattern", ["build/", "build"])
def test_ignored_directories_match_at_any_depth(world, pattern):
    src = world.work / "src"
    (src / "lib" / "build").mkdir(parents=True)  # there before: its files' events are seen
    out = world.root / "runs.txt"
    watch, _log = _start(world, "--delay", "300ms", "--ignore", pattern, "src", "--",
                         "sh", "-c", RECORD, str(out))
    (src / "lib" / "build" / "out.o").write_text("o")
    (src / "lib" / "build" / "gen").mkdir()
    (src / "a.c").write_text("a")
    wait_until(lambda: _runs(out), timeout=15)
    _idle(world)
    assert _runs(out) == [{str(src / "a.c")}]
    assert _interrupt(watch) == 130


@pytest.mark.parametrize("vcs", [True, False])
def test_gitignore_files_are_respected_unless_no_vcs_ignore(world, vcs):
    (world.work / ".git").mkdir()  # the repository's top is above the watched directory
    (world.work / ".gitignore").write_text("*.o\n")
    src = world.work / "src"
    (src / "gen").mkdir(parents=True)
    (src / "sub" / "gen").mkdir(parents=True)
    (src / ".gitignore").write_text("# generated\n\n*.log\n!keep.log\n/gen/\n")
    out = world.root / "runs.txt"
    flags = [] if vcs else ["--no-vcs-ignore"]
    watch, _log = _start(world, "--delay", "400ms", *flags, "src", "--", "sh", "-c", RECORD,
                         str(out))
    changed = ["x.log", "keep.log", "gen/a.c", "sub/gen/b.c", "z.o", "main.c"]
    for name in changed:
        (src / name).write_text(name)
    wait_until(lambda: _runs(out), timeout=15)
    _idle(world)
    kept = ["keep.log", "sub/gen/b.c", "main.c"] if vcs else changed
    assert _runs(out) == [{str(src / name) for name in kept}]
    assert _interrupt(watch) == 130


@pytest.mark.parametrize(
    ("line", "path", "is_dir", "matched"),
    [
        ("build/", "/r/src/build", True, True),
        ("build/", "/r/src/build", False, False),  # a trailing slash: directories only
        ("build", "/r/a/b/build", False, True),
        ("/gen", "/r/gen", True, True),
        ("/gen", "/r/x/gen", True, False),  # a leading slash anchors
        ("src/*.c", "/r/src/a.c", False, True),
        ("src/*.c", "/r/src/d/a.c", False, False),  # '*' stays within a directory
        ("a/**/b", "/r/a/b", False, True),
        ("a/**/b", "/r/a/x/y/b", False, True),
        ("**/foo", "/r/x/y/foo", False, True),
        ("foo/**", "/r/foo/x/y", False, True),
        ("foo/**", "/r/foo", True, False),
        ("?.c", "/r/a.c", False, True),
        ("[!a]x", "/r/bx", False, True),
        ("[!a]x", "/r/ax", False, False),
        ("\\#x", "/r/#x", False, True),
        ("x\\ ", "/r/x ", False, True),
        ("x  ", "/r/x", False, True),  # trailing spaces are dropped
    ],
)
def test_gitignore_patterns(line, path, is_dir, matched):
    from debounce_cli.watch import parse_pattern

    pattern = parse_pattern(line, "/r")
    assert pattern is not None
    assert pattern.matches(path, is_dir) is matched


def test_comments_and_blank_lines_are_no_patterns():
    from debounce_cli.watch import parse_pattern

    assert parse_pattern("# a comment", "/r") is None
    assert parse_pattern("   ", "/r") is None
    negated = parse_pattern("!keep.log", "/r")
    assert negated is not None and negated.negate and negated.matches("/r/keep.log", False)


# ------------------------------------------------------------------ 6. Ctrl-C
def test_ctrl_c_cancels_what_the_watcher_left_pending_and_exits_130(world):
    src = world.work / "src"
    src.mkdir()
    out = world.root / "runs.txt"
    watch, log = _start(world, "--delay", "30s", "src", "--", "sh", "-c", f"echo ran >> {out}")
    (src / "a.c").write_text("a")
    wait_until(lambda: any(k["pending"] for k in status(world)["keys"]), timeout=15)
    assert _interrupt(watch) == 130
    assert not any(k["pending"] or k["running"] for k in status(world)["keys"])
    assert not out.exists() and _history(world) == []
    said = log.read_text()
    assert "cancelled" in said and "Traceback" not in said


def test_a_second_ctrl_c_stops_a_run_of_the_watcher_that_is_executing(world):
    """The first Ctrl-C lets the run end (and says so); the second stops it."""
    src = world.work / "src"
    src.mkdir()
    started = world.root / "started"
    watch, log = _start(world, "--delay", "100ms", "src", "--", "sh", "-c",
                        f"echo go > {started}; exec sleep 30")
    (src / "a.c").write_text("a")
    wait_until(started.exists, timeout=15)
    watch.send_signal(signal.SIGINT)
    wait_until(lambda: "Ctrl-C again stops it" in log.read_text(), timeout=15)
    assert _interrupt(watch) == 130
    wait_until(lambda: not status(world)["keys"], timeout=15)
    assert [(r["outcome"], r["exit_code"]) for r in _history(world)] == [("killed", 143)]
    assert "stopping run" in log.read_text()


# ------------------------------------------------------------------ 7. --initial
def test_initial_runs_once_at_start_with_no_changed_paths(world):
    src = world.work / "src"
    src.mkdir()
    out = world.root / "runs.txt"
    script = ('printf "[%s] %s\\n" "$DEBOUNCE_CHANGED_PATHS" '
              '"$(wc -c < "$DEBOUNCE_CHANGED_PATHS_FILE")" >> "$0"')
    watch, _log = _start(world, "--initial", "--delay", "100ms", "src", "--", "sh", "-c",
                         script, str(out))
    wait_until(lambda: lines(out), timeout=15)
    _idle(world)
    assert lines(out) == ["[] 0"]
    assert _interrupt(watch) == 130


# ------------------------------------------------------------------ 8. forgetting --
def test_forgetting_the_dashes_says_how_to_write_it(world):
    (world.work / "src").mkdir()
    r = world.run("watch", "src", "true")
    assert r.returncode == 2 and USAGE_HINT in r.stderr, r.stderr
    assert "'true' does not exist" in r.stderr
    r = world.run("watch", "src", "make", "-j4")
    assert r.returncode == 2 and USAGE_HINT in r.stderr, r.stderr
    r = world.run("watch", "nowhere", "--", "true")  # with the dashes: just the path
    assert r.returncode == 2 and "'nowhere' does not exist" in r.stderr
    assert USAGE_HINT not in r.stderr


def test_every_bursts_lists_get_files_of_their_own_while_earlier_ones_are_kept():
    """The lists of a burst stay until its run has read them, so a watcher holds many at
    once: the tenth burst's list must not be refused because the first one's exact list
    is there (they were named changed-10 both; the tenth burst was dropped with "cannot
    write the list of changed paths", and a run that ended a big burst never came)."""
    from debounce_cli.watch import Watcher

    watcher = Watcher("/nonexistent.sock", ["true"], "k", {}, quiet=True)
    written = []
    try:
        for n in range(1, 112):
            written.append(watcher._write_lists([f"/p/{n}"], [f"/p/{n}"]))
        names = [name for pair in written for name in pair]
        assert len(set(names)) == len(names)
        lines_file, exact_file = written[9]  # the tenth burst's
        assert Path(lines_file).read_text() == "/p/10\n"
        assert Path(exact_file).read_bytes() == b"/p/10\0"
    finally:
        if watcher.tmpdir is not None:
            shutil.rmtree(watcher.tmpdir, ignore_errors=True)
