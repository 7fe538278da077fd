"""The command line: parse, build one request, hand it to the client, map the answer to an exit.

Thin on purpose. Everything heavy is imported inside the command that needs it, so
``debounce run`` on a pipe loads click, the protocol and the client and nothing else.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import click

from debounce_cli import __version__
from debounce_cli.conversation import (
    Failure,
    UsageProblem,
    client_status,
    converse,
    copy_log,
    emit,
    finish_output,
    refused,
    run_request,
    say,
)
from debounce_cli.durations import DurationError, parse_duration
from debounce_cli.exits import ExitStatus
from debounce_cli.options import HISTORY_LIMIT, KILL_SIGNALS


class Duration(click.ParamType):  # type: ignore[type-arg]  # generic only in click's stubs
    name = "DURATION"

    def convert(self, value: Any, param: Any, ctx: Any) -> float:
        if isinstance(value, (int, float)):
            return float(value)
        try:
            return parse_duration(value)
        except DurationError as exc:
            self.fail(str(exc), param, ctx)


DURATION = Duration()


def _complete_path(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[Any]:
    """A PATH completes as the shell completes file names."""
    from click.shell_completion import CompletionItem

    return [CompletionItem(incomplete, type="file")]


def _socket_option(func: Any) -> Any:
    return click.option(
        "--socket",
        "socket_path",
        metavar="PATH",
        shell_complete=_complete_path,
        help="Unix socket of the daemon [env: DEBOUNCE_SOCKET; default: "
        "$XDG_RUNTIME_DIR/debounce/daemon.sock, else /tmp/debounce-$UID/daemon.sock].",
    )(func)


_F = TypeVar("_F", bound=Callable[..., Any])


class _EnvOption(click.Option):
    """An option read from an environment variable too, whose errors name that variable only
    when the bad value came from it (``--delay banana`` is about --delay, not the variable)."""

    def get_error_hint(self, ctx: click.Context | None) -> str:
        from click.core import ParameterSource

        if ctx is not None and self.name and (
            ctx.get_parameter_source(self.name) is not ParameterSource.ENVIRONMENT
        ):
            return click.Parameter.get_error_hint(self, ctx)
        return super().get_error_hint(ctx)


def _invocation_options(func: Any) -> Any:
    """The scheduling options shared by ``run``, ``daemon`` (defaults for stdin lines) and
    ``watch``, made from the one table in ``options.RUN_OPTIONS``; ``--key`` follows --delay."""
    from debounce_cli import options as table
    from debounce_cli.durations import format_duration

    decorators = []
    for option in table.RUN_OPTIONS:
        kwargs: dict[str, Any] = {"help": option.help}
        if option.kind == table.DURATION:
            kwargs["type"] = DURATION
            if option.default is None:
                kwargs["metavar"] = option.metavar
            else:
                kwargs.update(default=format_duration(option.default), show_default=True)
        elif option.kind == table.CHOICE:
            kwargs.update(type=click.Choice(list(option.choices)), default=option.default,
                          show_default=True)
        else:
            # Both ways (--leading/--no-leading), so a command line undoes a config file.
            kwargs.update(is_flag=True, default=False)
            decorators.append(click.option(f"{option.flag}/{option.opposite}", option.param,
                                           **kwargs))
            continue
        if option.envvar:
            kwargs.update(envvar=option.envvar, show_envvar=True, cls=_EnvOption)
        decorators.append(click.option(option.flag, option.param, **kwargs))
    decorators.insert(1, click.option(
        "--key",
        "key_template",
        metavar="TEMPLATE",
        help="Defer key: {0} the command, {1}..{N} arguments, {args}, {cwd}, {env[NAME]}; "
        "a plain string is a fixed key. Default: the whole invocation (cwd and argv).",
    ))
    for decorator in reversed(decorators):
        func = decorator(func)
    return func


def _daemon_options(func: Any) -> Any:
    """The settings of ``debounce daemon``, from ``options.DAEMON_OPTIONS``."""
    from debounce_cli import options as table
    from debounce_cli.durations import format_duration

    decorators = []
    for option in table.DAEMON_OPTIONS:
        kwargs: dict[str, Any] = {"help": option.help}
        if option.kind == table.DURATION:
            kwargs.update(type=DURATION, default=format_duration(option.default),
                          show_default=True)
        elif option.kind == table.FLAG:
            kwargs.update(default=option.default, show_default=True)
        elif option.kind == table.STORE:
            kwargs.update(metavar=option.metavar, envvar=table.STORE_ENV, show_envvar=True)
        elif option.kind == table.ADDRESS:
            kwargs.update(metavar=option.metavar)
        else:
            kwargs.update(type=click.IntRange(min=option.minimum), metavar=option.metavar)
            if option.default is not None:
                kwargs.update(default=option.default, show_default=True)
        decorators.append(click.option(option.flag, option.name, **kwargs))
    for decorator in reversed(decorators):
        func = decorator(func)
    return func


def _host_id() -> str:
    """This daemon's host in the fleet: $DEBOUNCE_HOST_ID, else the hostname."""
    import socket

    from debounce_cli.options import HOST_ENV

    return os.environ.get(HOST_ENV) or socket.gethostname()


def _settings() -> Any:
    """The config files in force here (``settings.py``); a bad one is a usage error."""
    from debounce_cli import settings

    try:
        return settings.load()
    except settings.ConfigError as exc:
        raise Failure(str(exc), ExitStatus.USAGE) from None


def _given(values: dict[str, Any]) -> dict[str, Any]:
    """The run options the command line or the environment gave, by field (shorthands
    expanded); the rest comes from the config files or the defaults. Without a click context
    (a test calling ``_options`` with values) every value counts as given."""
    from click.core import ParameterSource

    from debounce_cli import options as table

    ctx = click.get_current_context(silent=True)
    given: dict[str, Any] = {}
    for option in table.RUN_OPTIONS:
        if ctx is not None and ctx.get_parameter_source(option.param) not in (
                ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT):
            continue
        value = values[option.param]
        given[option.name] = (not value) if option.negated else value
    return table.expand(given)


def _options(key: str | None = None, **values: Any) -> dict[str, Any]:
    """The RunRequest options object: the command line and environment, else the config
    files (their ``[key."PATTERN"]`` sections for ``key``), else the defaults; checked by the
    same rules the daemon applies."""
    settings = _settings()
    given = _given(values)
    options: dict[str, Any] = settings.run_options(given, key)
    problems = settings.problems(options, given, key)
    if problems:
        raise click.UsageError(problems[0])
    return options


def _daemon_settings(values: dict[str, Any]) -> dict[str, Any]:
    """The daemon's settings: the command line and environment, else the config files, else
    the defaults (``options.DAEMON_OPTIONS``)."""
    from click.core import ParameterSource

    from debounce_cli import options as table

    settings = _settings()
    ctx = click.get_current_context()
    out = {}
    for option in table.DAEMON_OPTIONS:
        value = values[option.name]
        if ctx.get_parameter_source(option.name) not in (ParameterSource.COMMANDLINE,
                                                         ParameterSource.ENVIRONMENT):
            entry = settings.lookup(option.name)
            if entry is not None:
                value = entry.value
        out[option.name] = value
    return out


def _complete_keys(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[Any]:
    """KEY arguments complete from the keys a running daemon has (never starting one)."""
    return _keys_like(ctx, incomplete, history=False)


def _complete_keys_with_history(ctx: click.Context, param: click.Parameter,
                                incomplete: str) -> list[Any]:
    """For ``logs`` and ``history``: also the keys that only have finished runs."""
    return _keys_like(ctx, incomplete, history=True)


#: How many of the latest runs ``logs``/``history`` completion looks through for keys.
COMPLETION_HISTORY = 1000


def _keys_like(ctx: click.Context, incomplete: str, history: bool) -> list[Any]:
    from click.shell_completion import CompletionItem

    from debounce_cli import client, protocol

    keys: list[str] = []
    try:
        sock = _socket(ctx.params.get("socket_path"))
        reply = client.request(sock, protocol.StatusRequest(), autostart=False)
        if isinstance(reply, protocol.StatusReply):
            keys += [row.key for row in reply.keys]
        if history:
            reply = client.request(sock, protocol.HistoryRequest(limit=COMPLETION_HISTORY),
                                   autostart=False)
            if isinstance(reply, protocol.HistoryReply):
                keys += [run.key for run in reply.runs]
    except Exception:  # noqa: BLE001 - completion must stay silent
        pass
    seen = dict.fromkeys(key for key in keys if key.startswith(incomplete))
    return [CompletionItem(key) for key in seen]


def _socket(option: str | None) -> str:
    from debounce_cli.paths import PathError, socket_path

    try:
        return socket_path(option)
    except PathError as exc:
        raise Failure(str(exc), ExitStatus.USAGE) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="debounce")
def cli() -> None:
    """Run a command once after the calls to it have gone quiet.

    Call `debounce run -- CMD ARGS...` as often as events happen. A per-user daemon (started
    on demand) coalesces invocations with the same key, waits for a quiet period, runs the
    latest one, and every coalesced caller exits with its exit status.
    """


# ------------------------------------------------------------------------------ run
@cli.command(context_settings={"allow_interspersed_args": False},
             short_help="Run COMMAND once the calls to it go quiet, and wait for it.")
@_invocation_options
@click.option("--no-wait", is_flag=True, help="Return once the daemon has accepted it (exit 0).")
@click.option("-q", "--quiet", is_flag=True, help="Do not copy the run's output.")
@click.option(
    "--json", "as_json", is_flag=True,
    help="Print the result as one JSON object on stdout (the run's stdout is not copied).",
)
@_socket_option
@click.argument("command", nargs=-1, type=click.UNPROCESSED, metavar="[--] COMMAND [ARG]...")
def run(
    command: tuple[str, ...],
    key_template: str | None,
    no_wait: bool,
    quiet: bool,
    as_json: bool,
    socket_path: str | None,
    **scheduling: Any,
) -> int:
    """Submit COMMAND, wait for the run it coalesces into, and exit with its status.

    Options stop at COMMAND, so `debounce run make -j4` passes -j4 to make. The run's output
    streams to this command's stdout and stderr. debounce's own failures exit 2 (usage), 112
    (no daemon), 113 (daemon lost; `debounce wait --key KEY` reattaches), 114 (cancelled),
    116 (refused) or 1 (the output could not be written).

    The defaults shown are the built-in ones: .debounce.toml files and the user's
    config.toml may change them, per key too (`debounce config` shows what is in force).
    """
    try:
        request = run_request(list(command), key_template, _options(**scheduling), no_wait,
                              given=_given(scheduling))
    except UsageProblem as exc:
        raise click.UsageError(str(exc)) from None
    return converse(_socket(socket_path), request, request.key, quiet, as_json, no_wait)


# ------------------------------------------------------------------------------ daemon
@cli.command(short_help="Serve the socket in the foreground.")
@_socket_option
@click.option("--stdin", "read_stdin", is_flag=True,
              help="Also read invocations from standard input, one per line (a shell-quoted "
              "command line or a JSON object); exit when input ends and all have run. Lines "
              "longer than 1 MiB are refused (stderr names the line) and count as a failure.")
@_daemon_options
@_invocation_options
@click.option("--ready-fd", type=int, hidden=True)
@click.option("--clock-skew", type=float, default=0.0, hidden=True)  # tests: a host's clock off
def daemon(
    socket_path: str | None,
    read_stdin: bool,
    key_template: str | None,
    ready_fd: int | None,
    clock_skew: float,
    **scheduling: Any,
) -> int:
    """Serve the socket in the foreground (clients start one on demand).

    The scheduling options are the defaults for lines read with --stdin. Pending invocations,
    run history and output logs are kept in $DEBOUNCE_STATE_DIR (mode 0700, files 0600).
    Every setting may also come from the config files (`debounce config`), as seen from the
    daemon's working directory: an auto-started daemon, in /, reads the user's file only.
    """
    from debounce_cli import daemon as daemon_mod
    from debounce_cli import keys
    from debounce_cli import options as table
    from debounce_cli.paths import PathError, state_dir

    given = _daemon_settings({o.name: scheduling.pop(o.name) for o in table.DAEMON_OPTIONS})
    jobs, idle_exit, store, lease = (given[name] for name in ("jobs", "idle_exit", "store",
                                                               "lease"))
    defaults = _options(**scheduling)
    if key_template is not None:
        try:
            keys.parse_template(key_template)
        except keys.KeyTemplateError as exc:
            raise click.UsageError(str(exc)) from None
        defaults["key"] = key_template
    config = daemon_mod.Config(
        socket=_socket(socket_path),
        state_dir=state_dir(),
        jobs=jobs,
        idle_exit=idle_exit or None,
        stdin=read_stdin,
        defaults=defaults,
        ready_fd=ready_fd,
        journal=given["journal"],
        keep_logs=given["keep_logs"],
        keep_logs_total=given["keep_logs_total"],
        keep_history=given["keep_history"],
        listen_fd=_listen_fd(),
        metrics_listen=given["metrics_listen"],
        store=store or None,
        lease=lease,
        host_id=_host_id(),
        clock_skew=clock_skew,
    )
    if config.store is not None:
        from debounce_cli.daemon.fleet.url import StoreURLError, parse_store_url

        try:
            parse_store_url(config.store)
        except StoreURLError as exc:
            raise click.UsageError(str(exc)) from None
        if lease <= 0:
            raise click.UsageError("--lease must be greater than 0")
    if config.metrics_listen is not None:
        try:
            table.parse_address(config.metrics_listen)
        except ValueError as exc:
            raise click.UsageError(f"--metrics-listen: {exc}") from None
    try:
        return daemon_mod.run_daemon(config)
    except PathError as exc:
        raise Failure(str(exc), ExitStatus.USAGE) from None
    except daemon_mod.DaemonError as exc:
        raise Failure(str(exc), ExitStatus.FAILURE) from None


# ------------------------------------------------------------------------------ watch
class _SplitAtDashes(click.Command):
    """Takes everything after the first ``--`` as COMMAND before click parses the rest."""

    usage = "debounce watch PATH... -- COMMAND [ARG]..."

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if "--" in args:
            at = args.index("--")
            ctx.meta["debounce.command"] = args[at + 1 :]
            args = args[:at]
        try:
            return super().parse_args(ctx, args)
        except click.NoSuchOption as exc:
            if "debounce.command" in ctx.meta:
                raise
            # `debounce watch src make -j4`: the command's options reached ours.
            raise click.UsageError(
                f"{exc.format_message()}; if it belongs to the command, write: {self.usage}",
                ctx,
            ) from None


@cli.command(cls=_SplitAtDashes,
             short_help="Run COMMAND after each burst of file changes under PATH.")
@click.argument("paths", nargs=-1, metavar="PATH... -- COMMAND [ARG]...",
                type=click.Path())
@click.option("--filter", "filters", multiple=True, metavar="GLOB",
              help="Only changes to matching files count (repeatable). Globs follow "
              ".gitignore rules: without '/' a glob matches a file or directory name at any "
              "depth (a trailing '/' for directories only), with '/' the path relative to the "
              "current directory; '**' spans directories.")
@click.option("--ignore", "ignores", multiple=True, metavar="GLOB",
              help="Changes to matching files, and to anything in matching directories, do "
              "not count (repeatable; .gitignore rules, as for --filter, '!GLOB' re-includes). "
              "Comes on top of .gitignore files and the default ignores (.git, .hg, .svn, "
              "caches, node_modules, .venv, editor swap files).")
@click.option("--no-vcs-ignore", is_flag=True,
              help="Do not read .gitignore files (in the watched directories and above them "
              "up to the repository's top) nor .git/info/exclude.")
@click.option("--initial", is_flag=True,
              help="Also run COMMAND once at start, with an empty list of changed paths.")
@_invocation_options
@click.option("-q", "--quiet", is_flag=True, help="Do not print the runs' output.")
@_socket_option
@click.pass_context
def watch(
    ctx: click.Context,
    /,
    paths: tuple[str, ...],
    filters: tuple[str, ...],
    ignores: tuple[str, ...],
    no_vcs_ignore: bool,
    initial: bool,
    key_template: str | None,
    quiet: bool,
    socket_path: str | None,
    **scheduling: Any,
) -> int:
    """Run COMMAND after each burst of changes under PATH (until Ctrl-C).

    The run finds the changed paths of the whole burst, one per line, in the private file
    named by $DEBOUNCE_CHANGED_PATHS_FILE, and also in $DEBOUNCE_CHANGED_PATHS when they fit
    in 64 KiB (else that variable is unset); a name holding a line break is quoted there as
    $'...', and $DEBOUNCE_CHANGED_PATHS_FILE0 has the exact names, each ended by a NUL.
    Files that were created and removed within the
    burst (editors' temporary files) are left out. A PATH that is a file is watched through its
    directory, so saves that replace the file keep counting, and its changes count whatever
    --filter, --ignore and .gitignore say. .gitignore files are read in the watched
    directories and above them up to the repository's top. Submissions are keyed by COMMAND,
    so --delay, --max-wait and --on-busy work as in run. Ctrl-C stops watching and cancels
    what this watcher left pending; a run of its that is executing is left to finish (it says
    so), and then it exits 130, or with the run's status if that failed. A second Ctrl-C
    stops that run and exits 130 at once.
    """
    from debounce_cli.keys import KeyTemplateError, compute_key

    dashes = "debounce.command" in ctx.meta
    command = ctx.meta.get("debounce.command") or []
    missing = [path for path in paths if not os.path.exists(path)]
    if missing and not dashes:
        raise click.UsageError(f"path {missing[0]!r} does not exist; to run a command, "
                               f"write: {_SplitAtDashes.usage}")
    if not command:
        raise click.UsageError(f"missing COMMAND: write {_SplitAtDashes.usage}")
    if not paths:
        raise click.UsageError("missing PATH: name at least one file or directory to watch")
    if missing:
        raise click.UsageError(f"path {missing[0]!r} does not exist")
    cwd = os.getcwd()
    try:
        key = compute_key(key_template, command, cwd, dict(os.environ))
    except KeyTemplateError as exc:
        raise click.UsageError(str(exc)) from None
    options = _options(key, **scheduling)
    sock = _socket(socket_path)
    from debounce_cli.watch import run_watch

    return run_watch(sock, list(paths), list(command), key, options, filters, ignores, quiet,
                     vcs_ignore=not no_vcs_ignore, initial=initial)


def _listen_fd() -> int | None:
    """A listening socket passed by systemd socket activation (LISTEN_PID, LISTEN_FDS)."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return None
    try:
        count = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return None
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)  # not for the runs' environments
    return 3 if count >= 1 else None


# ------------------------------------------------------------------------------ control
@cli.command(short_help="Stop the daemon and wait until it has exited.")
@_socket_option
def stop(socket_path: str | None) -> int:
    """Stop the daemon as SIGTERM would, and wait until it has exited."""
    from debounce_cli import client, protocol

    sock = _socket(socket_path)
    # Named before it is asked: once it has exited, its pid may be another process's.
    process = client.daemon_process(sock)
    try:
        try:
            client.request(sock, protocol.StopRequest(), autostart=False)
        except client.ClientError as exc:
            if exc.code == "unreachable":
                say(f"debounce: no daemon is running on {sock}")
                return ExitStatus.SUCCESS
            raise Failure(str(exc), client_status(exc)) from None
        except client.DaemonLost:
            pass
        if client.wait_until_gone(sock, timeout=60, process=process):
            return ExitStatus.SUCCESS
    finally:
        if process is not None:
            process.close()
    raise Failure("the daemon did not exit within 60s", ExitStatus.DAEMON_UNREACHABLE)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--fleet", is_flag=True,
              help="Show the fleet's keys (every host's, from the store) instead of this "
              "daemon's.")
@_socket_option
def status(as_json: bool, fleet: bool, socket_path: str | None) -> int:
    """Show pending and running keys."""
    from debounce_cli import protocol, render

    reply = _ask(socket_path, protocol.StatusRequest(fleet=fleet))
    assert isinstance(reply, protocol.StatusReply)
    if as_json:
        emit(render.status_json(reply))
    elif sys.stdout is not None and sys.stdout.isatty():
        render.status_table(reply)
    else:
        text = render.status_text(reply)
        if text:
            emit(text)
    return ExitStatus.SUCCESS


def _target_options(metavar: str, history: bool = False) -> Callable[[_F], _F]:
    """KEY|RUN_ID as one argument, or said outright with --key K or --run N; with
    ``history``, keys complete from finished runs too."""
    complete = _complete_keys_with_history if history else _complete_keys

    def decorate(func: _F) -> _F:
        func = click.option("--run", "run_id", type=click.IntRange(min=1), metavar="N",
                            help="The run with this id.")(func)
        func = click.option("--key", "key_option", metavar="KEY", shell_complete=complete,
                            help="The key KEY, even if it looks like a run id.")(func)
        return click.argument("target", metavar=metavar, required=False,
                              shell_complete=complete)(func)

    return decorate


def _target(target: str | None, key_option: str | None, run_id: int | None
            ) -> tuple[str, str | None]:
    """(what, how to read it): "key", "run", or None when a bare argument may be either."""
    given = sum(x is not None for x in (target, key_option, run_id))
    if given != 1:
        raise click.UsageError("name one KEY or RUN_ID, or use --key KEY or --run N")
    if key_option is not None:
        return key_option, "key"
    if run_id is not None:
        return str(run_id), "run"
    assert target is not None
    return target, None


@cli.command(short_help="Run what is pending for KEY now.")
@_target_options("[KEY]")
@_socket_option
def flush(target: str | None, key_option: str | None, run_id: int | None,
          socket_path: str | None) -> int:
    """Run what is pending for KEY (or for the key of run N) now."""
    from debounce_cli import protocol

    what, by = _target(target, key_option, run_id)
    _ask(socket_path, protocol.FlushRequest(key=what, by=by))
    return ExitStatus.SUCCESS


@cli.command(short_help="Drop what is pending for KEY.")
@_target_options("[KEY]")
@_socket_option
def cancel(target: str | None, key_option: str | None, run_id: int | None,
           socket_path: str | None) -> int:
    """Drop what is pending for KEY (or for the key of run N); its waiters exit with the
    cancelled status."""
    from debounce_cli import protocol

    what, by = _target(target, key_option, run_id)
    _ask(socket_path, protocol.CancelRequest(key=what, by=by))
    return ExitStatus.SUCCESS


@cli.command(short_help="Stop what runs for KEY (or run N).")
@_target_options("[KEY|RUN_ID]")
@click.option("--signal", "signal_name", type=click.Choice(list(KILL_SIGNALS)), metavar="SIG",
              help="Send this signal once instead of stopping the run (no KILL follows: "
              "the run goes on if it survives SIG).")
@_socket_option
def kill(target: str | None, key_option: str | None, run_id: int | None,
         signal_name: str | None, socket_path: str | None) -> int:
    """Stop the run executing for KEY or RUN_ID: SIGTERM to its process group, then SIGKILL
    after its --stop-timeout (or send --signal SIG once). Its waiters get its real status."""
    from debounce_cli import protocol

    what, by = _target(target, key_option, run_id)
    _ask(socket_path, protocol.KillRequest(target=what, by=by, signal=signal_name))
    return ExitStatus.SUCCESS


@cli.command(short_help="Wait for what is pending or running for KEY or RUN_ID.")
@_target_options("[KEY|RUN_ID]")
@click.option("--invocation", "invocation", type=click.IntRange(min=1), metavar="N",
              help="The run that stands for invocation N (the id `run --json` prints): "
              "follow it and exit with its status; 114 if N was cancelled, 113 if its run "
              "was lost.")
@click.option("-q", "--quiet", is_flag=True, help="Do not copy the run's output.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
@click.option("--timeout", type=DURATION, metavar="DURATION",
              help="Give up after this long (exit 115); the run goes on.")
@_socket_option
def wait(
    target: str | None, key_option: str | None, run_id: int | None, invocation: int | None,
    quiet: bool, as_json: bool, timeout: float | None, socket_path: str | None,
) -> int:
    """Wait for what is pending or running for KEY or RUN_ID, like run does.

    When nothing is, exit at once with the status of that run or of the key's latest run.
    A bare argument that is both a key and a run id is refused: say --key or --run. With
    --invocation N, wait for the run that stands for invocation N, wherever it was coalesced.
    """
    from debounce_cli import protocol

    by: str | None
    if invocation is not None:
        if (target, key_option, run_id) != (None, None, None):
            raise click.UsageError("name one KEY or RUN_ID, or use --invocation N alone")
        what, by = str(invocation), "invocation"
    else:
        what, by = _target(target, key_option, run_id)
    return converse(_socket(socket_path), protocol.WaitRequest(target=what, by=by), what,
                     quiet, as_json, wait_timeout=timeout)


@cli.command()
@click.argument("key", required=False, shell_complete=_complete_keys_with_history)
@click.option("--limit", type=click.IntRange(min=1), default=HISTORY_LIMIT, show_default=True,
              help="Show at most this many runs, newest first.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per line.")
@click.option("--fleet", is_flag=True,
              help="Show the fleet's runs (every host's, from the store) instead of this "
              "daemon's.")
@click.option("--invocation", "invocation", type=click.IntRange(min=1), metavar="N",
              help="Show the run that stood for invocation N (the id `run --json` prints).")
@_socket_option
def history(key: str | None, limit: int, as_json: bool, fleet: bool, invocation: int | None,
            socket_path: str | None) -> int:
    """Show finished runs (of KEY, or of every key), newest first."""
    from debounce_cli import protocol, render

    if invocation is not None and key is not None:
        raise click.UsageError("name a KEY or use --invocation N, not both")
    reply = _ask(socket_path, protocol.HistoryRequest(key=key, limit=limit, fleet=fleet,
                                                      invocation=invocation))
    if not as_json and sys.stdout is not None and sys.stdout.isatty():
        render.history_table(reply.runs)
        return ExitStatus.SUCCESS
    text = render.history_json(reply.runs) if as_json else render.history_text(reply.runs)
    if text:
        emit(text)
    return ExitStatus.SUCCESS


@cli.command(short_help="Print the output of a run, or of the latest run of KEY.")
@_target_options("[RUN_ID|KEY]", history=True)
@click.option("-f", "--follow", is_flag=True,
              help="Print the output as it is written, from the start, and exit with the "
              "run's status when it ends: of run N, or of KEY's run executing now, else its "
              "next one (a run that has ended: its log, then its status). Ctrl-C stops "
              "following only.")
@_socket_option
def logs(target: str | None, key_option: str | None, run_id: int | None, follow: bool,
         socket_path: str | None) -> int:
    """Print the output of a run, or of the latest run of KEY (stdout and stderr apart)."""
    from debounce_cli import protocol

    what, by = _target(target, key_option, run_id)
    if follow:
        return converse(_socket(socket_path), protocol.WaitRequest(target=what, by=by), what,
                        quiet=False, as_json=False, replay_finished=True)
    reply = _ask(socket_path, protocol.LogsRequest(target=what, by=by))
    assert isinstance(reply, protocol.LogsReply)
    copy_log(reply)
    return ExitStatus.SUCCESS


@cli.command(short_help="Print the daemon's metrics in the Prometheus text format.")
@_socket_option
def metrics(socket_path: str | None) -> int:
    """Print the daemon's metrics in the Prometheus text format: invocations submitted and
    coalesced, runs started and ended by outcome, pending and running, per-key counts (the
    first 100 keys), run duration and start lateness histograms, journal commit time, and
    for a fleet daemon the store's round trips and takeovers. `debounce daemon
    --metrics-listen [HOST:]PORT` serves the same at /metrics over HTTP."""
    from debounce_cli import protocol

    reply = _ask(socket_path, protocol.MetricsRequest())
    assert isinstance(reply, protocol.MetricsReply)
    emit(reply.text, end="")
    return ExitStatus.SUCCESS


@cli.command(short_help="Show every setting's effective value and where it comes from.")
@click.argument("key", required=False, shell_complete=_complete_keys)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def config(key: str | None, as_json: bool) -> int:
    """Show every run option and daemon setting: its effective value and its origin.

    One line each, '<origin> <TAB> <name> = <value>', the origin being file:PATH:LINE of a
    config file, env:NAME, or default (as git config --show-origin). Config files are TOML:
    the user's $XDG_CONFIG_HOME/debounce/config.toml (else ~/.config/debounce/config.toml)
    and the project's, the nearest .debounce.toml from here up to the repository's top. Their
    keys are the names below (delay = "2s", on_busy = "restart", jobs = 4); a table
    [key."PATTERN"] sets run options for the keys that match the glob PATTERN. The command
    line beats the environment, which beats the project file, then the user file, then the
    default. With KEY, the tables that match KEY apply too.
    """
    import json

    from debounce_cli import options as table
    from debounce_cli import settings as config_files

    settings = _settings()
    given: dict[str, config_files.Entry] = {}
    for option in table.RUN_OPTIONS:
        text = os.environ.get(option.envvar) if option.envvar else None
        if text:
            try:
                value = parse_duration(text)
            except DurationError as exc:
                raise Failure(f"{option.envvar}: {exc}", ExitStatus.USAGE) from None
            given[option.name] = config_files.Entry(value, f"env:{option.envvar}")
    store = os.environ.get(table.STORE_ENV)
    if store:
        given["store"] = config_files.Entry(store, f"env:{table.STORE_ENV}")
    rows = [*settings.explain_run(given, key), *settings.explain_daemon(given)]
    kinds = {option.name: option.kind for option in table.FIELDS}
    kinds.update((option.name, option.kind) for option in table.DAEMON_OPTIONS)
    if as_json:
        emit(json.dumps({
            "files": [{"scope": s.scope, "path": s.path} for s in settings.sources],
            "key": key,
            "settings": [{"name": name, "value": entry.value, "origin": entry.origin}
                         for name, entry in rows],
        }))
        return ExitStatus.SUCCESS
    lines = []
    for name, entry in rows:
        origin = entry.origin
        if origin not in ("default",) and not origin.startswith("env:"):
            origin = "file:" + origin
        lines.append(f"{origin}\t{name} = {config_files.toml_value(kinds[name], entry.value)}")
    emit("\n".join(lines))
    return ExitStatus.SUCCESS


@cli.command()
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion(shell: str) -> int:
    """Print the completion script for SHELL (bash, zsh or fish).

    For bash: eval "$(debounce completion bash)" in ~/.bashrc. The same scripts are in the
    completions/ directory of the source.
    """
    emit(completion_script(shell), end="")
    return ExitStatus.SUCCESS


def completion_script(shell: str) -> str:
    """The completion script for ``shell`` (also written to completions/): click's, and for
    bash one of ours that also completes the COMMAND of ``run`` and ``watch`` as bash
    completes any command line, and quotes what it inserts."""
    from click.shell_completion import get_completion_class

    if shell == "bash":
        return _BASH_COMPLETION.replace("@RUN_VALUE_OPTIONS@", "|".join(_value_options("run")))
    cls = get_completion_class(shell)
    assert cls is not None
    return cls(cli, {}, "debounce", "_DEBOUNCE_COMPLETE").source().rstrip("\n") + "\n"


def _value_options(name: str) -> list[str]:
    """The options of command ``name`` that take a value (``--delay 2s``)."""
    command = cli.commands[name]
    return sorted(opt for param in command.params if isinstance(param, click.Option)
                  and not param.is_flag and not param.count
                  for opt in (*param.opts, *param.secondary_opts))


#: The bash completion: click's protocol for debounce's own words; the COMMAND of ``run``
#: (after ``--``, or its first operand) and of ``watch`` (after ``--``) completes as bash
#: completes a command line (bash-completion's ``_command_offset`` when it is loaded: the
#: command's own completion; else command names, then file names); what it inserts is quoted
#: (a key with a space stays one word).
_BASH_COMPLETION = r"""# debounce(1) completion for bash: eval "$(debounce completion bash)"
_debounce_command_at() {
    # Complete COMP_WORDS[$1...] as a command line of its own.
    local at=$1 cur=${COMP_WORDS[COMP_CWORD]}
    if declare -F _command_offset >/dev/null; then
        _command_offset "$at"
        return 0
    fi
    if ((COMP_CWORD == at)) && [[ $cur != */* ]]; then
        COMPREPLY=($(compgen -c -- "$cur"))
    else
        _debounce_files  # as for any command without a completion of its own
    fi
}

_debounce_files() {
    local cur=${COMP_WORDS[COMP_CWORD]}
    compopt -o filenames 2>/dev/null  # quoted, and a directory gets its /
    COMPREPLY=($(compgen -f -- "$cur"))
}

_debounce_completion() {
    local IFS=$'
'
    local response completion type value word i sub= at=
    for ((i = 1; i <= COMP_CWORD; i++)); do
        word=${COMP_WORDS[i]}
        if ((i == COMP_CWORD)); then
            # The word being completed: run's COMMAND if it is no option.
            [[ $sub == run && $word != -* ]] && at=$i
            break
        fi
        if [[ -z $sub ]]; then
            [[ $word == -* ]] || sub=$word
            continue
        fi
        if [[ $word == -- ]]; then
            at=$((i + 1))
            break
        fi
        if [[ $sub == run ]]; then
            case $word in
                @RUN_VALUE_OPTIONS@)
                    ((i++))
                    [[ ${COMP_WORDS[i]} == = ]] && ((i++)) ;;
                -*) ;;
                *) at=$i; break ;;
            esac
        fi
    done
    if [[ -n $at && ( $sub == run || $sub == watch ) ]]; then
        _debounce_command_at "$at"
        return 0
    fi

    response=$(env COMP_WORDS="${COMP_WORDS[*]}" COMP_CWORD=$COMP_CWORD \
        _DEBOUNCE_COMPLETE=bash_complete "$1")
    for completion in $response; do
        IFS=',' read -r type value <<< "$completion"
        if [[ $type == dir ]]; then
            COMPREPLY=()
            compopt -o dirnames
        elif [[ $type == file ]]; then
            _debounce_files
        elif [[ $type == plain ]]; then
            printf -v value '%q' "$value"
            COMPREPLY+=("$value")
        fi
    done
    return 0
}

complete -o nosort -F _debounce_completion debounce
"""


def _ask(socket_path: str | None, message: Any) -> Any:
    from debounce_cli import client, protocol

    try:
        reply = client.request(_socket(socket_path), message)
    except client.ClientError as exc:
        raise Failure(str(exc), client_status(exc)) from None
    except client.DaemonLost:
        raise Failure("the daemon closed the connection without answering",
                      ExitStatus.DAEMON_LOST) from None
    if isinstance(reply, protocol.Error):
        refused(reply, "")
    return reply


# ------------------------------------------------------------------------------ entry point
def main(args: list[str] | None = None) -> NoReturn:
    """Run the CLI; every failure ends as one line on stderr and a documented exit status."""
    if sys.stdout is None and (args or sys.argv[1:])[:1] != ["daemon"]:
        sys.stdout = _closed_stdout()  # '>&-': what is written is a write error, click's too
    try:
        status = cli.main(args=args, prog_name="debounce", standalone_mode=False)
    except OSError as exc:
        if not _stdout_broken(exc):
            raise
        status = ExitStatus.SUCCESS  # click's own output (--help, --version): reported below
    except click.exceptions.NoArgsIsHelpError as exc:
        # Bare `debounce` (or a group with no command): the help, as it is, and a usage error.
        say(exc.format_message())
        sys.exit(ExitStatus.USAGE)
    except click.UsageError as exc:
        where = exc.ctx.command_path if exc.ctx is not None else "debounce"
        say(f"{where}: {exc.format_message()} (see '{where} --help')")
        sys.exit(ExitStatus.USAGE)
    except click.exceptions.Abort:
        sys.exit(ExitStatus.INTERRUPTED)
    except click.ClickException as exc:
        say(f"debounce: {exc.format_message()}")
        sys.exit(exc.exit_code)
    except Failure as exc:
        say(f"debounce: {exc}")
        sys.exit(exc.status)
    except KeyboardInterrupt:
        sys.exit(ExitStatus.INTERRUPTED)
    sys.exit(finish_output(status or 0))


def _closed_stdout() -> Any:
    """A stand-in for a stdout that was closed before we began: every write fails with EBADF,
    as it would on the closed descriptor (which is never written to: a socket we open may
    have taken its number)."""
    import errno
    import io

    class Closed(io.RawIOBase):
        def writable(self) -> bool:
            return True

        def write(self, data: Any) -> int:
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))

        def fileno(self) -> int:
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))

    return io.TextIOWrapper(Closed(), encoding="utf-8", write_through=True)


def _stdout_broken(exc: OSError) -> bool:
    """Whether ``exc``, raised out of click, came from click writing to our stdout (--help,
    --version): then it is noted as a write error, reported as ours are."""
    from debounce_cli import client

    tb = exc.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        if code.co_name == "echo" and "click" in code.co_filename:
            client.note_lost(1, exc)
            return True
        tb = tb.tb_next
    return False
