"""Submit an invocation (or attach to one) and follow it to its end, without click.

The fast path of ``debounce run`` (``fast.py``) and the click commands (``cli.py``) share
this: what the client says while it waits, and how an answer becomes an exit status.
"""

from __future__ import annotations

import os
import sys

from debounce_cli.exits import ExitStatus
from debounce_cli.states import BAD_REQUEST, KILLED, LOST, NOT_FOUND, TIMED_OUT, UNKNOWN

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, NoReturn


class Failure(Exception):
    """A failure of debounce itself: one line for stderr and the exit status to leave with."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


class UsageProblem(ValueError):
    """The command line cannot make a request (the message says why): a usage error."""


def run_request(argv: list[str], key_template: str | None, options: dict[str, Any],
                no_wait: bool, given: dict[str, Any] | None = None) -> Any:
    """The RunRequest of ``debounce run``: this process's directory and environment.

    ``options`` were resolved before the key was known; with ``given`` (what the command
    line and environment said), the config files' ``[key."PATTERN"]`` sections that match the
    key are applied now, under ``given``.
    """
    from debounce_cli import protocol
    from debounce_cli.keys import KeyTemplateError, compute_key

    if not argv:
        raise UsageProblem("missing COMMAND: write debounce run [OPTIONS] -- COMMAND [ARG]...")
    try:
        cwd = os.getcwd()
    except OSError as exc:
        raise Failure(f"cannot read the current directory: {exc.strerror}",
                      ExitStatus.USAGE) from None
    env = dict(os.environ)
    try:
        key = compute_key(key_template, argv, cwd, env, collect=bool(options.get("collect")))
    except KeyTemplateError as exc:
        raise UsageProblem(str(exc)) from None
    if given is not None:
        from debounce_cli import settings as config_files

        settings = config_files.load()  # read already, to make ``options``
        if settings.has_sections:
            options = settings.run_options(given, key)
            problems = settings.problems(options, given, key)
            if problems:
                raise UsageProblem(problems[0])
    return protocol.RunRequest(argv=argv, cwd=cwd, env=env, key=key, options=options,
                               wait=not no_wait)


def converse(
    sock: str,
    request: Any,
    key: str,
    quiet: bool,
    as_json: bool,
    no_wait: bool = False,
    wait_timeout: float | None = None,
    replay_finished: bool = False,
) -> int:
    """Send a run or wait request and follow it to the end; return the exit status.

    With ``replay_finished`` (``logs --follow``), a run that had already ended when the
    request came (so nothing of it streamed) has its log printed before its status."""
    from debounce_cli import client, protocol

    try:
        conn = client.connect(sock, request)
    except client.ClientError as exc:
        raise Failure(str(exc), client_status(exc)) from None
    try:
        if no_wait:
            reply = conn.recv(timeout=30)
            if isinstance(reply, protocol.Accepted):
                if as_json:
                    import json

                    emit(json.dumps(protocol.json_safe({
                        "id": reply.id, "key": reply.key, "state": reply.state,
                        "due_in": reply.due_in, "coalesced": reply.coalesced,
                    })))
                return ExitStatus.SUCCESS
            refused(reply, key)
        display: client.Display = client.Display()
        out: Any = None if quiet else client.write_output
        if quiet:
            pass
        elif as_json:
            out = stderr_only  # stdout is for the JSON object
        elif sys.stderr is not None and sys.stderr.isatty():
            from debounce_cli.render import TerminalDisplay

            terminal = TerminalDisplay()
            terminal.fleet = bool((getattr(request, "options", None) or {}).get("fleet"))
            display = terminal

            def out(fd: int, data: bytes) -> None:
                terminal.output(fd, data, write=client.write_output)
        noting = _noting(display)
        try:
            result = client.wait_for_run(conn, noting, out, wait_timeout)
        except TimeoutError:
            if wait_timeout is None:
                raise
            raise Failure(f"gave up waiting for {key} after {wait_timeout:g}s",
                          ExitStatus.WAIT_TIMEOUT) from None
        except client.DaemonLost:
            what, again = _reattach(conn.key, request)
            raise Failure(
                f"lost the daemon while waiting for {what}; run '{again}' to reattach",
                ExitStatus.DAEMON_LOST,
            ) from None
        except KeyboardInterrupt:
            # Stop waiting; the invocation stays with the daemon for the other waiters.
            what, again = _reattach(conn.key, request)
            say(f"debounce: stopped waiting; {what} stays with the daemon "
                f"('{again}' reattaches)")
            return ExitStatus.INTERRUPTED
        if isinstance(result, protocol.Finished) and replay_finished and not noting.seen:
            print_log(sock, result.run_id)
        if isinstance(result, protocol.Finished):
            if result.outcome == LOST:
                raise Failure(
                    f"run {result.run_id} of {result.key} was lost: its daemon died while it ran",
                    ExitStatus.DAEMON_LOST,
                )
            if result.outcome == TIMED_OUT:
                from debounce_cli.durations import format_duration

                took = format_duration(result.finished_at - result.started_at)
                say(f"debounce: run {result.run_id} timed out after {took}")
            elif result.outcome == KILLED:
                say(f"debounce: run {result.run_id} was stopped by 'debounce kill'")
            if as_json:
                from debounce_cli.render import finished_json

                client.write_text(finished_json(result) + "\n")
            unwritten = client.write_error()
            if unwritten is not None:
                # The output is incomplete: say so, and what the run itself did.
                raise Failure(f"{write_error(unwritten)}; run {result.run_id} exited "
                              f"{result.exit_code}", ExitStatus.FAILURE)
            return result.exit_code
        if isinstance(result, protocol.Cancelled):
            raise Failure(f"{result.key} was cancelled before it ran", ExitStatus.CANCELLED)
        refused(result, key)
    except client.ClientError as exc:
        raise Failure(str(exc), ExitStatus.DAEMON_UNREACHABLE) from None
    except TimeoutError:
        raise Failure("the daemon did not answer within 30s",
                      ExitStatus.DAEMON_UNREACHABLE) from None
    finally:
        conn.close()


def _noting(inner: Any) -> Any:
    """A display that passes everything on to ``inner`` and notes (``seen``) whether the
    run was seen to start, so its output streamed."""
    from debounce_cli import client

    class Noting(client.Display):
        seen = False

        def pending(self, msg: Any) -> None:
            inner.pending(msg)

        def started(self, msg: Any) -> None:
            self.seen = True
            inner.started(msg)

        def tick(self) -> None:
            inner.tick()

        def close(self) -> None:
            inner.close()

    noting = Noting()
    noting.refresh = inner.refresh
    return noting


def print_log(sock: str, run_id: int) -> None:
    """Copy the log of run ``run_id`` to our stdout and stderr (``debounce logs``)."""
    from debounce_cli import client, protocol

    try:
        conn = client.connect(sock, protocol.LogsRequest(target=str(run_id), by="run"))
        try:
            reply = conn.recv(timeout=30)
        finally:
            conn.close()
    except client.ClientError as exc:
        raise Failure(str(exc), client_status(exc)) from None
    except (OSError, TimeoutError):
        raise Failure("the daemon did not answer within 30s",
                      ExitStatus.DAEMON_UNREACHABLE) from None
    if not isinstance(reply, protocol.LogsReply):
        refused(reply, f"run {run_id}")
    copy_log(reply)


def copy_log(reply: Any) -> None:
    """Copy the log a ``LogsReply`` names to our stdout and stderr, as it was written."""
    from debounce_cli import client
    from debounce_cli.logfile import read_log

    if not reply.log_path:
        raise Failure(f"run {reply.run_id} keeps no log", ExitStatus.NOT_FOUND)
    try:
        for fd, data in read_log(reply.log_path):  # reading may fail, writing never raises
            client.write_output(fd, data)
            lost = client.write_error()
            if lost is not None:
                raise Failure(write_error(lost), ExitStatus.FAILURE)
    except OSError as exc:
        raise Failure(f"cannot read the log of run {reply.run_id}: {exc.strerror}",
                      ExitStatus.NOT_FOUND) from None


def _reattach(filed: str | None, request: Any) -> tuple[str, str]:
    """What we waited for, and the command that waits for it again: always saying whether it
    is a key or a run (a key of digits, given bare, could be taken for a run id)."""
    from debounce_cli import protocol

    if isinstance(request, protocol.WaitRequest) and request.by == "run":
        return f"run {request.target}", f"debounce wait --run {request.target}"
    if filed is None and isinstance(request, protocol.RunRequest):
        filed = request.key
    if filed is not None:
        return filed, f"debounce wait --key {quote(filed)}"
    # A bare wait whose daemon never said what it found: the same words find it again.
    return request.target, f"debounce wait {quote(request.target)}"


def write_error(exc: OSError) -> str:
    """How a failure to write our output is reported, as coreutils do."""
    return f"write error: {exc.strerror or exc}"


def emit(text: str, end: str = "\n") -> None:
    """Print ``text`` on our stdout, at once. A stdout that cannot take it (closed, a full
    disk) is a failure of ours (exit 1); a reader that went away (``| head -1``) is not."""
    from debounce_cli import client

    client.write_text(text + end)
    lost = client.write_error()
    if lost is not None:
        raise Failure(write_error(lost), ExitStatus.FAILURE)


def finish_output(status: int) -> int:
    """``status``, once what is left in our stdout's buffer has been written; a write error
    that nothing reported yet is reported now and ends in exit 1."""
    from debounce_cli import client

    client.flush_stdout()
    lost = client.write_error()
    if lost is None:
        return status
    say(f"debounce: {write_error(lost)}")
    return ExitStatus.FAILURE


def say(line: str) -> None:
    """One line of debounce's own on stderr (nothing if stderr is closed: print() would
    take stdout instead)."""
    if sys.stderr is None:
        return
    if "\\udc" in line or not line.isascii():
        from debounce_cli.protocol import readable

        line = readable(line)
    try:
        print(line, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


def stderr_only(fd: int, data: bytes) -> None:
    from debounce_cli import client

    if fd == 2:
        client.write_output(fd, data)


def client_status(exc: Any) -> int:
    """An unsafe socket location, or a setting the daemon to be started refused, is the
    user's to mend (usage); a daemon that answered and refused (too many connections) is a
    refusal; anything else is unreachable."""
    if exc.code in ("unsafe", "usage"):
        return ExitStatus.USAGE
    if exc.code == "refused":
        return ExitStatus.REFUSED
    return ExitStatus.DAEMON_UNREACHABLE


def refused(reply: Any, key: str) -> NoReturn:
    from debounce_cli import protocol

    if reply is None:
        raise Failure(f"the daemon closed the connection before accepting {key}",
                      ExitStatus.DAEMON_LOST)
    if isinstance(reply, protocol.Error):
        status = {
            BAD_REQUEST: ExitStatus.USAGE,
            NOT_FOUND: ExitStatus.NOT_FOUND,
            UNKNOWN: ExitStatus.OUTCOME_UNKNOWN,
        }.get(reply.code, ExitStatus.REFUSED)
        raise Failure(reply.message, status)
    raise Failure(f"unexpected answer from the daemon: {reply.type}", ExitStatus.REFUSED)


def quote(text: str) -> str:
    """``text`` as a shell word, for a command a message suggests; one holding bytes that
    are not UTF-8 (or control characters) is written as bash's ``$'...'``."""
    from debounce_cli.protocol import shell_word

    return shell_word(text)
