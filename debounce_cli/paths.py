"""Where the socket and the state live, and the permission checks on them.

The socket's directory is the security boundary: only its owner may create or reach the socket,
so a client refuses a directory owned by someone else (it could be a daemon that is not ours)
and the daemon creates it with mode 0700. Directories and the socket are looked at with
``lstat``: a symbolic link is refused, never followed. Once connected, the client's decisive
check is the daemon's uid (``SO_PEERCRED``, in client.py).
"""

from __future__ import annotations

import os
import stat

#: sockaddr_un.sun_path holds 108 bytes on Linux, the terminating NUL included.
MAX_SOCKET_PATH = 107


class PathError(Exception):
    """A socket or state location that cannot be used safely; the message says how to mend it."""


class NotASocket(PathError):
    """Something other than a socket (a mistyped --socket's file, say) is at the socket path.

    No daemon can answer there, and none may be started (it would have to delete the file):
    the client reports it as unreachable rather than unsafe.
    """


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


#: How to mend an unsafe socket location: a directory of one's own, never a shared one's mode.
SOCKET_REMEDY = (
    "choose a socket in a private directory of your own (mode 0700) with --socket or "
    "DEBOUNCE_SOCKET"
)


def check_private_dir(
    path: str, what: str, create: bool, remedy: str = "choose another location",
    follow: bool = False, parents: bool = True,
) -> None:
    """Make sure ``path`` is a directory owned by this user with no access for anyone else.

    The directory itself is looked at with ``lstat``: a symbolic link is refused, never
    followed (whoever may replace it would choose where our socket or state goes). With
    ``create``, a missing directory (and its missing parents, unless ``parents`` is false)
    is made with mode 0700.
    ``remedy`` ends each refusal: what to do instead. With ``follow`` (the state directory,
    which dotfiles set-ups often link elsewhere) a link is followed, and what it leads to
    must pass the same checks.
    """
    look = os.stat if follow else os.lstat
    try:
        st = look(path)
    except FileNotFoundError:
        if not create:
            return
        parent = os.path.dirname(path)
        if not parents and not os.path.isdir(parent):
            raise PathError(f"cannot create {what} {path}: {parent} does not exist (only the "
                            f"last directory is made); create it first, or {remedy}") from None
        try:
            os.makedirs(path, mode=0o700, exist_ok=True)
            st = look(path)  # what is there now, whoever made it
        except OSError as exc:
            raise PathError(f"cannot create {what} {path}: {exc.strerror}") from None
    except OSError as exc:
        raise PathError(f"cannot use {what} {path}: {exc.strerror}") from None
    uid = os.getuid()
    if stat.S_ISLNK(st.st_mode):
        raise PathError(
            f"{what} {path} is a symbolic link (to {_link_target(path)}), which debounce does "
            f"not follow; {remedy}"
        )
    if not stat.S_ISDIR(st.st_mode):
        raise PathError(f"{what} {path} is not a directory; {remedy}")
    if st.st_uid != uid:
        raise PathError(
            f"{what} {path} belongs to uid {st.st_uid}, not to you (uid {uid}); {remedy}"
        )
    if st.st_mode & 0o077:
        mend = f"run 'chmod 700 {path}' or {remedy}" if _own_directory(path, st) else remedy
        raise PathError(
            f"{what} {path} is mode {stat.S_IMODE(st.st_mode):04o}, open to other users; {mend}"
        )


def _link_target(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return "?"


def _own_directory(path: str, st: os.stat_result) -> bool:
    """Whether 'chmod 700' is sound advice for ``path``: a directory of debounce's own.

    That is one of debounce's default directories (``debounce``, ``debounce-$UID``) or one
    inside a private directory of this user's. Never a shared directory such as /tmp, /run or
    a team's directory: closing those would break them for everyone else.
    """
    if st.st_mode & (stat.S_ISVTX | 0o002):
        return False  # a sticky or world-writable directory is somebody's shared drop box
    name = os.path.basename(path)
    if name in ("debounce", f"debounce-{os.getuid()}"):
        return True
    try:
        parent = os.lstat(os.path.dirname(path))
    except OSError:
        return False
    return (stat.S_ISDIR(parent.st_mode) and parent.st_uid == os.getuid()
            and not parent.st_mode & 0o077)


def socket_dir_check(sock: str, create: bool) -> None:
    """The socket's directory: private to this user, and not reached through a symbolic link.

    Only the last directory is ever made: a mistyped ``--socket /nonexistent/dir/s.sock`` is
    refused instead of growing a tree (and a second daemon in it).
    """
    check_private_dir(os.path.dirname(sock), "socket directory", create, SOCKET_REMEDY,
                      parents=False)


def socket_file_check(sock: str) -> None:
    """What is at the socket path, looked at without following it: a socket of this user's.

    Nothing there is fine (a daemon will be started); anything else unsafe raises PathError.
    The decisive check is the daemon's credentials once connected: this one says early and
    clearly what is wrong with a path.
    """
    try:
        st = os.lstat(sock)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise PathError(f"cannot use socket {sock}: {exc.strerror}") from None
    uid = os.getuid()
    if stat.S_ISLNK(st.st_mode):
        raise PathError(
            f"socket {sock} is a symbolic link (to {_link_target(sock)}), which debounce does "
            f"not follow; remove the link or {SOCKET_REMEDY}"
        )
    if not stat.S_ISSOCK(st.st_mode):
        raise NotASocket(
            f"{sock} is not a socket but a {_kind(st.st_mode)}; choose another socket path "
            "with --socket or DEBOUNCE_SOCKET"
        )
    if st.st_uid != uid:
        raise PathError(
            f"socket {sock} belongs to uid {st.st_uid}, not to you (uid {uid}); {SOCKET_REMEDY}"
        )


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "directory"
    if stat.S_ISREG(mode):
        return "regular file"
    if stat.S_ISFIFO(mode):
        return "named pipe"
    return "special file"


def lock(path: str, wait: bool) -> int | None:
    """Take the lock file ``path`` (made if missing, mode 0600): its descriptor, or ``None``
    when it is held and ``wait`` is false. Raises OSError if it cannot be opened.

    Lock files are removed by their last holder (the daemon on its way out), so a lock taken
    on a file that is no longer at ``path`` is void: let go and take the one there now.
    """
    import fcntl

    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            same = os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


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
