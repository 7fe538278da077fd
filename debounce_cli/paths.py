"""Where the socket and the state live, and the permission checks on them.

The socket's directory is the security boundary: only its owner may create or reach the socket,
so a client refuses a directory owned by someone else (it could be a daemon that is not ours)
and the daemon creates it with mode 0700.
"""

from __future__ import annotations

import os
import stat

#: sockaddr_un.sun_path holds 108 bytes on Linux, the terminating NUL included.
MAX_SOCKET_PATH = 107


class PathError(Exception):
    """A socket or state location that cannot be used safely; the message says how to mend it."""


def socket_path(option: str | None = None) -> str:
    """``--socket``, else ``$DEBOUNCE_SOCKET``, else the per-user runtime location."""
    path = option or os.environ.get("DEBOUNCE_SOCKET")
    if not path:
        runtime = os.environ.get("XDG_RUNTIME_DIR")
        if runtime:
            path = os.path.join(runtime, "debounce", "daemon.sock")
        else:
            path = f"/tmp/debounce-{os.getuid()}/daemon.sock"
    path = os.path.abspath(path)
    size = len(os.fsencode(path))
    if size > MAX_SOCKET_PATH:
        raise PathError(
            f"socket path {path} is {size} bytes, longer than the {MAX_SOCKET_PATH} a Unix "
            "socket allows; choose a shorter --socket or DEBOUNCE_SOCKET"
        )
    return path


def state_dir() -> str:
    """``$DEBOUNCE_STATE_DIR``, else ``$XDG_STATE_HOME/debounce``, else
    ``~/.local/state/debounce``."""
    path = os.environ.get("DEBOUNCE_STATE_DIR")
    if not path:
        base = os.environ.get("XDG_STATE_HOME") or os.path.join(
            os.path.expanduser("~"), ".local", "state"
        )
        path = os.path.join(base, "debounce")
    return os.path.abspath(path)


def check_private_dir(path: str, what: str, create: bool) -> None:
    """Make sure ``path`` is a directory owned by this user with no access for anyone else.

    With ``create``, a missing directory (and its missing parents) is made with mode 0700.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if not create:
            return
        try:
            os.makedirs(path, mode=0o700, exist_ok=True)
            st = os.stat(path)
        except OSError as exc:
            raise PathError(f"cannot create {what} {path}: {exc.strerror}") from None
    except OSError as exc:
        raise PathError(f"cannot use {what} {path}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise PathError(f"{what} {path} is not a directory; choose another location")
    if st.st_uid != os.getuid():
        raise PathError(
            f"{what} {path} belongs to uid {st.st_uid}, not to you (uid {os.getuid()}); "
            "choose a directory of your own"
        )
    if st.st_mode & 0o077:
        raise PathError(
            f"{what} {path} is mode {stat.S_IMODE(st.st_mode):04o}, open to other users; "
            f"run 'chmod 700 {path}' or choose another location"
        )


def socket_dir_check(sock: str, create: bool) -> None:
    check_private_dir(os.path.dirname(sock), "socket directory", create)


def lock_path(sock: str) -> str:
    """The daemon's lock beside its socket: held for as long as that daemon lives."""
    return sock + ".lock"


def start_lock_path(sock: str) -> str:
    """Clients take turns on this lock to start one daemon between them."""
    return sock + ".start"


def socket_digest(sock: str) -> str:
    """A short name for a socket path, for the files kept per socket in the state directory."""
    import hashlib

    return hashlib.sha1(os.fsencode(sock)).hexdigest()[:12]
