#!/usr/bin/env python3
"""Generate man/ and completions/ from the click definitions, so they cannot drift.

    python scripts/gendocs.py          # rewrite man/*.1 and completions/*
    python scripts/gendocs.py --check  # exit 1 and name the stale files instead

Each man page takes its synopsis, description and options from the command's own click
definition (the same text as --help); the sections click knows nothing about (exit status,
environment, files, examples) are written here once and shared by the pages.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from debounce_cli import __version__  # noqa: E402
from debounce_cli.cli import cli, completion_script  # noqa: E402
from debounce_cli.exits import ExitStatus  # noqa: E402

DATE = "2026-11"

EXIT_MEANINGS = {
    ExitStatus.SUCCESS: "The run succeeded (for run and wait: the run's own status, which "
    "may be any value), or the command did what was asked.",
    ExitStatus.USAGE: "Usage error: an unknown option, a bad duration or key template, a "
    "missing command, an unsafe socket location.",
    ExitStatus.DAEMON_UNREACHABLE: "No daemon answered and none could be started.",
    ExitStatus.DAEMON_LOST: "The daemon went away while the client waited, or the run was "
    "lost because its daemon died; debounce wait KEY reattaches.",
    ExitStatus.CANCELLED: "The invocation was cancelled (debounce cancel) before it ran.",
    ExitStatus.WAIT_TIMEOUT: "debounce wait --timeout ran out before the run finished.",
    ExitStatus.REFUSED: "The daemon refused the request, for example because its state "
    "directory is full or read-only.",
    ExitStatus.NOT_FOUND: "Nothing by that key or run id (wait, flush, cancel, logs).",
    ExitStatus.OUTCOME_UNKNOWN: "Outcome unknown: the store may have taken a fleet "
    "submission whose answer was lost, and did not confirm it in time; it may still run "
    "(once); debounce wait --invocation ID tells its outcome.",
    ExitStatus.FAILURE: "debounce daemon could not start; with --stdin, a line failed to "
    "parse or a run failed. Any command: its output could not be written (a full disk, a "
    "closed stdout); a waiting client also says what the run's own status was. A reader "
    "that goes away (| head -1) is no error.",
    ExitStatus.INTERRUPTED: "Interrupted (Ctrl-C): a waiting client stops waiting and the "
    "invocation stays with the daemon; debounce watch cancels what it left pending and lets "
    "a run of its that executes finish (then exits 130, or with that run's status if it "
    "failed; a second Ctrl-C stops the run).",
}

ENVIRONMENT = [
    ("DEBOUNCE_SOCKET", "The daemon's socket, when --socket is not given. Default: "
     "$XDG_RUNTIME_DIR/debounce/daemon.sock, else /tmp/debounce-$UID/daemon.sock."),
    ("DEBOUNCE_STATE_DIR", "Where the journal, run logs and the auto-started daemon's own log "
     "live. Default: $XDG_STATE_HOME/debounce, else ~/.local/state/debounce."),
    ("DEBOUNCE_DELAY", "The default --delay."),
    ("NO_COLOR", "When set and not empty, the terminal output uses no colour."),
    ("DEBOUNCE_KEY, DEBOUNCE_RUN_ID, DEBOUNCE_COALESCED", "Set in every run's environment: "
     "the key, the run id, and how many invocations the run stands for."),
    ("DEBOUNCE_DAEMON", "Set in every run's environment: which daemon (socket) the run "
     "belongs to, so that the next daemon finds what is left of it after a crash."),
    ("DEBOUNCE_CHANGED_PATHS", "Set in the runs of debounce watch: the changed paths of the "
     "burst, one per line, when they fit in 64 KiB (a name holding a line break is quoted as "
     "$'...')."),
    ("DEBOUNCE_CHANGED_PATHS_FILE", "Set in the runs of debounce watch: a private file with "
     "the changed paths of the burst, one per line (a name holding a line break is quoted as "
     "$'...'), always."),
    ("DEBOUNCE_CHANGED_PATHS_FILE0", "Set in the runs of debounce watch: a private file with "
     "the exact changed paths of the burst, each ended by a NUL byte (for xargs -0), always."),
    ("DEBOUNCE_BATCH", "Set in the runs of --collect: a file with the argv of every coalesced "
     "invocation, one JSON array per line."),
]

FILES = [
    ("$DEBOUNCE_STATE_DIR/journal.db", "SQLite journal (mode 0600): pending invocations with "
     "their argv, cwd and environment, and the run history, kept per socket. It survives "
     "a crash or kill -9 of the daemon; a power cut may lose the last moments."),
    ("$DEBOUNCE_STATE_DIR/logs/", "Output logs of runs (mode 0600), the last --keep-logs per "
     "key and --keep-logs-total in all."),
    ("$DEBOUNCE_STATE_DIR/daemon-*.log", "Messages of auto-started daemons."),
    ("$DEBOUNCE_STATE_DIR/started-*", "The ids of runs whose process started (mode 0600), "
     "written by each run before its command is executed, so that after a crash a run that "
     "never started runs again instead of being recorded lost."),
    ("$XDG_CONFIG_HOME/debounce/config.toml", "The user's config file (TOML; else "
     "~/.config/debounce/config.toml): defaults for every run option and daemon setting, by "
     "the names debounce config shows (delay = \"2s\", on_busy = \"restart\", jobs = 4), and "
     "[key.\"PATTERN\"] tables of run options for the keys matching the glob PATTERN. The "
     "command line beats the environment, which beats the project file, then this file."),
    (".debounce.toml", "The project's config file, the nearest from the working directory up "
     "to the repository's top: as the user's file, and ahead of it. A bad file (syntax, "
     "unknown key, wrong type) is a usage error naming file, line and key (exit 2)."),
    ("SOCKET, SOCKET.lock", "The daemon's socket (mode 0600, in a directory of mode 0700 owned "
     "by the user) and the lock that makes it the only daemon on that socket."),
]

EXAMPLES = {
    None: [
        ("Build once after a burst of saves; every caller gets the build's output and status:",
         "debounce run \\-\\-delay 500ms \\-\\- make html"),
        ("Notify once per user and document, whatever the update:",
         "debounce run \\-\\-key '#{1}:#{2}' \\-\\- notify \"$user\" \"$doc\" \"$update\""),
        ("Rebuild on file changes:", "debounce watch src \\-\\- make"),
    ],
    "run": [
        ("Coalesce identical calls; the latest runs 2 seconds after the last call:",
         "debounce run \\-\\-delay 2s \\-\\- make \\-C docs html"),
        ("Deploy the latest push at most a minute late, never two at once:",
         "debounce run \\-\\-key deploy \\-\\-delay 10s \\-\\-max\\-wait 1m "
         "\\-\\- ./deploy.sh \"$1\""),
        ("Run the first call at once, and one more after the burst:",
         "debounce run \\-\\-leading \\-\\-delay 1s \\-\\- ./notify.sh"),
        ("Fire and forget from a git hook:",
         "debounce run \\-\\-no\\-wait \\-\\-key 'reindex:{cwd}' \\-\\- ctags \\-R ."),
    ],
    "daemon": [
        ("Turn file events into runs:",
         "inotifywait \\-m \\-r \\-e close_write \\-\\-format 'make \\-C docs html' docs/ | "
         "debounce daemon \\-\\-stdin \\-\\-delay 500ms"),
        ("A long-lived daemon with at most two runs at once:",
         "debounce daemon \\-\\-jobs 2 \\-\\-idle\\-exit 0"),
    ],
    "watch": [
        ("Run the tests after each burst of changes to Python files:",
         "debounce watch \\-\\-filter '*.py' src tests \\-\\- pytest \\-q"),
        ("Restart a server when its sources change:",
         "debounce watch \\-\\-on\\-busy restart \\-\\-delay 300ms src \\-\\- ./serve.sh"),
    ],
    "status": [("What is pending and running:", "debounce status"),
               ("For scripts:", "debounce status \\-\\-json")],
    "wait": [("Reattach after the daemon restarted:", "debounce wait deploy")],
    "flush": [("Deploy now instead of after the quiet period:", "debounce flush deploy")],
    "cancel": [("Drop the pending deploy:", "debounce cancel deploy")],
    "history": [("The last five deploys:", "debounce history deploy \\-\\-limit 5")],
    "logs": [("The output of the latest deploy:", "debounce logs deploy")],
    "stop": [("Stop the daemon:", "debounce stop")],
    "config": [("Where the delay of the docs key comes from:",
                "debounce config docs | grep delay"),
               ("A project's .debounce.toml: the docs key waits 500 ms and restarts when busy:",
                "[key.\"docs\"]\ndelay = \"500ms\"\non_busy = \"restart\"")],
    "completion": [("Enable completion in bash:",
                    "eval \"$(debounce completion bash)\"")],
}


def roff(text: str) -> str:
    """Escape text for roff: backslashes, hyphens, and dots or quotes at a line's start."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    lines = []
    for line in text.split("\n"):
        if line.startswith((".", "'")):
            line = "\\&" + line
        lines.append(line)
    return "\n".join(lines)


def paragraphs(help_text: str) -> list[str]:
    """click help text as paragraphs; backquoted words lose their backquotes."""
    text = help_text.replace("`", "")
    return [" ".join(p.split()) for p in text.strip().split("\n\n") if p.strip()]


def option_entries(cmd: click.Command, ctx: click.Context) -> list[tuple[str, str]]:
    entries = []
    for param in cmd.get_params(ctx):
        if not isinstance(param, click.Option) or param.hidden:
            continue
        record = param.get_help_record(ctx)
        if record is None:
            continue
        names, help_text = record
        entries.append((names, help_text))
    return entries


def page(name: str | None, cmd: click.Command) -> str:
    full = "debounce" if name is None else f"debounce-{name}"
    title = full.upper()
    info = click.Context(cli, info_name="debounce")
    ctx = info if name is None else click.Context(cmd, info_name=name, parent=info)
    summary = cmd.get_short_help_str(limit=200).rstrip(".")
    out = [
        f'.TH {title} 1 "{DATE}" "debounce {__version__}" "User Commands"',
        ".SH NAME",
        f"{roff(full)} \\- {roff(summary[0].lower() + summary[1:])}",
        ".SH SYNOPSIS",
        ".B " + roff("debounce" if name is None else f"debounce {name}"),
        roff(" ".join(cmd.collect_usage_pieces(ctx))),
        ".SH DESCRIPTION",
    ]
    for para in paragraphs(cmd.help or ""):
        out += [roff(para), ".PP"]
    out.pop()
    if name is None:
        out.append(".SH COMMANDS")
        for sub_name in sorted(cli.commands):
            sub = cli.commands[sub_name]
            out += [".TP", f".BR debounce\\-{roff(sub_name)} (1)",
                    roff(sub.get_short_help_str(limit=200))]
    out.append(".SH OPTIONS")
    for names, help_text in option_entries(cmd, ctx):
        out += [".TP", f".B {roff(names)}", roff(" ".join(help_text.split()))]
    out.append(".SH EXIT STATUS")
    for status, meaning in EXIT_MEANINGS.items():
        out += [".TP", f".B {int(status)}", roff(meaning)]
    out.append(".SH ENVIRONMENT")
    for var, meaning in ENVIRONMENT:
        out += [".TP", f".B {roff(var)}", roff(meaning)]
    out.append(".SH FILES")
    for path, meaning in FILES:
        out += [".TP", f".I {roff(path)}", roff(meaning)]
    out.append(".SH EXAMPLES")
    for text, example in EXAMPLES.get(name, []):
        out += [".PP", roff(text), ".PP", ".RS", ".nf", example, ".fi", ".RE"]
    out.append(".SH SEE ALSO")
    others = ["debounce"] + [f"debounce-{n}" for n in sorted(cli.commands)]
    out.append(",\n".join(f".BR {roff(o)} (1)" for o in others if o != full))
    return "\n".join(out) + "\n"


def outputs() -> dict[Path, str]:
    files: dict[Path, str] = {ROOT / "man" / "debounce.1": page(None, cli)}
    for name, cmd in sorted(cli.commands.items()):
        files[ROOT / "man" / f"debounce-{name}.1"] = page(name, cmd)
    for shell in ("bash", "zsh", "fish"):
        source = completion_script(shell)
        suffix = {"bash": "debounce.bash", "zsh": "_debounce", "fish": "debounce.fish"}[shell]
        files[ROOT / "completions" / suffix] = source
    return files


def main(argv: list[str]) -> int:
    check = "--check" in argv
    stale = []
    for path, text in outputs().items():
        current = path.read_text() if path.exists() else None
        if current == text:
            continue
        stale.append(path)
        if not check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if check and stale:
        names = ", ".join(str(p.relative_to(ROOT)) for p in stale)
        print(f"stale generated files: {names}; run python scripts/gendocs.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
