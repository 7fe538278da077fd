"""No file name can forge a line in ``debounce watch``'s lists of changed paths (issue 23).

``$DEBOUNCE_CHANGED_PATHS_FILE`` and ``$DEBOUNCE_CHANGED_PATHS`` list one path a line; a name
holding a line break is written there quoted as bash's ``$'...'`` (never the start of a listed
path, which is absolute), and ``$DEBOUNCE_CHANGED_PATHS_FILE0`` lists every name exactly,
each ended by a NUL byte.
"""

from __future__ import annotations

import pytest
from test_watch import _idle, _interrupt, _start

from debounce_cli.watch import listed

from conftest import World, wait_until


@pytest.mark.parametrize("name", ["evil\n-rf", "a\rb", "x\u2028y", "v\x0bw", "e\x85f", "q\nr\n"])
def test_a_name_holding_a_line_break_is_one_quoted_line(name: str) -> None:
    line = listed("/w/" + name)
    assert len(line.splitlines()) == 1 and "\n" not in line and line.startswith("$'")


@pytest.mark.parametrize("name", ["plain.c", "with space", "tab\tin", "caf\u00e9",
                                  "bytes\udce9", "back\\slash", "$'looks quoted'"])
def test_a_name_without_a_line_break_is_listed_as_it_is(name: str) -> None:
    assert listed("/w/" + name) == "/w/" + name


def test_a_file_named_with_a_newline_forges_no_line(world: World) -> None:
    """A real file named ``evil<newline>-rf`` beside ``plain.c``: the line forms hold two
    lines, the plain path and the quoted name, never ``-rf``; the NUL form both names."""
    src = world.work / "src"
    src.mkdir()
    out = world.root / "out"
    out.mkdir()
    script = ('cp "$DEBOUNCE_CHANGED_PATHS_FILE" "$0/lines"; '
              'cp "$DEBOUNCE_CHANGED_PATHS_FILE0" "$0/nul"; '
              'printf %s "$DEBOUNCE_CHANGED_PATHS" > "$0/env"; touch "$0/done"')
    watch, _log = _start(world, "--delay", "300ms", "src", "--", "sh", "-c", script, str(out))
    evil, plain = src / "evil\n-rf", src / "plain.c"
    evil.write_text("x")
    plain.write_text("y")
    wait_until(lambda: (out / "done").exists())
    _idle(world)
    quoted = f"$'{src}/evil\\x0a-rf'"
    assert sorted((out / "lines").read_text().splitlines()) == [quoted, str(plain)]
    assert sorted((out / "env").read_text().split("\n")) == [quoted, str(plain)]
    names = (out / "nul").read_bytes()
    assert names.endswith(b"\0")
    assert sorted(names[:-1].split(b"\0")) == sorted([bytes(evil), bytes(plain)])
    assert _interrupt(watch) == 130
