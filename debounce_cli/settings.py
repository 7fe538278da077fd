"""Configuration files: defaults for every run option and daemon setting, with their origin.

Two TOML files, read with ``tomllib``: the user's (``$XDG_CONFIG_HOME/debounce/config.toml``,
else ``~/.config/debounce/config.toml``) and the project's (the nearest ``.debounce.toml`` from
the working directory up to the repository's top or the filesystem's root). Their keys are the
names of the option table (``options.RUN_OPTIONS`` and ``options.DAEMON_OPTIONS``), never a
list written here, so a new option is a new config key too. A ``[key."PATTERN"]`` table holds
run options for the keys that match the glob PATTERN (``fnmatch``, case-sensitive), so a team
can check in "the docs key waits 500 ms and restarts when busy".

Precedence, highest first: the command line, the environment (``DEBOUNCE_DELAY``,
``DEBOUNCE_STORE``), the project file, the user file, the built-in default. Within one file a
matching ``[key."..."]`` table beats the file's top level, and of several matching tables the
last one written wins.

This module is imported by every ``debounce run``: with no config file it costs a few
``stat`` calls (``bench/config_cost.py`` measures it). Importing ``tomllib`` costs about 6 ms,
half of what a ``debounce run`` costs in all, so a file once read and checked is kept,
as JSON, in ``$DEBOUNCE_STATE_DIR/config-cache.json`` (mode 0600, in the private state
directory), stamped with the file's size, mtime, ctime and inode; a file whose stamp changed
is read again. Globs of ``[key."..."]`` tables match without ``re`` unless they use ``[...]``.
A bad file is one :class:`ConfigError` naming the file, line and key and how to mend it, and
nothing of it is used (nor cached).
"""

from __future__ import annotations

import os

from debounce_cli import __version__
from debounce_cli import options as table

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

#: The project file's name, looked for from the working directory up.
PROJECT_FILE = ".debounce.toml"
#: The table of per-key sections: ``[key."deploy:*"]``.
SECTIONS = "key"

_RUN = {option.name: option for option in table.RUN_OPTIONS}
_DAEMON = {option.name: option for option in table.DAEMON_OPTIONS}


class ConfigError(Exception):
    """A config file that cannot be used; the message is one line: file, line, key, remedy."""


class Entry:
    """One value and where it came from (``origin``: ``PATH:LINE``, ``env:NAME``, ...)."""

    __slots__ = ("origin", "value")

    def __init__(self, value: Any, origin: str) -> None:
        self.value = value
        self.origin = origin

    def __repr__(self) -> str:
        return f"Entry({self.value!r}, {self.origin!r})"


class Source:
    """One config file: its top-level values and its per-key sections, by field name."""

    __slots__ = ("path", "scope", "sections", "values")

    def __init__(self, path: str, scope: str) -> None:
        self.path = path
        self.scope = scope  # "user" or "project"
        self.values: dict[str, Entry] = {}
        self.sections: list[tuple[str, dict[str, Entry]]] = []

    def lookup(self, name: str, key: str | None) -> Entry | None:
        if key is not None and self.sections:
            for pattern, values in reversed(self.sections):
                if name in values and glob_match(key, pattern):
                    return values[name]
        return self.values.get(name)


def glob_match(text: str, pattern: str) -> bool:
    """``fnmatch.fnmatchcase``, without importing ``re`` for the usual ``*`` and ``?``."""
    if "[" in pattern:
        from fnmatch import fnmatchcase

        return fnmatchcase(text, pattern)
    # Iterative wildcard matching with backtracking to the last '*'.
    t = p = 0
    star, mark = -1, 0
    while t < len(text):
        if p < len(pattern) and pattern[p] in ("?", text[t]) and pattern[p] != "*":
            t += 1
            p += 1
        elif p < len(pattern) and pattern[p] == "*":
            star, mark = p, t
            p += 1
        elif star >= 0:
            p = star + 1
            mark += 1
            t = mark
        else:
            return False
    while p < len(pattern) and pattern[p] == "*":
        p += 1
    return p == len(pattern)


class Settings:
    """The config files in force, lowest precedence first."""

    __slots__ = ("sources",)

    def __init__(self, sources: list[Source]) -> None:
        self.sources = sources

    def lookup(self, name: str, key: str | None = None) -> Entry | None:
        """The files' value of ``name`` (for ``key``, when per-key sections may apply)."""
        for source in reversed(self.sources):
            entry = source.lookup(name, key)
            if entry is not None:
                return entry
        return None

    @property
    def has_sections(self) -> bool:
        return any(source.sections for source in self.sources)

    def run_options(self, given: dict[str, Any], key: str | None = None) -> dict[str, Any]:
        """A request's options object: ``given`` (command line and environment, by field,
        shorthands expanded), else the files (for ``key``), else the defaults."""
        out: dict[str, Any] = {}
        for option in table.FIELDS:
            if option.name in given:
                out[option.name] = given[option.name]
                continue
            entry = self.lookup(option.name, key) if self.sources else None
            out[option.name] = option.default if entry is None else entry.value
        return out

    def problems(self, options: dict[str, Any], given: dict[str, Any],
                 key: str | None = None) -> list[str]:
        """``options.usage_problems`` of resolved options, each naming the file lines that
        took part (``--no-trailing`` may come from a file, ``--leading`` missing from all)."""
        out = []
        for problem in table.usage_problems(options):
            blamed = []
            for option in table.FIELDS:
                if option.name in given or option.flag not in problem:
                    continue
                entry = self.lookup(option.name, key) if self.sources else None
                if entry is not None:
                    blamed.append(f"{option.name} = "
                                  f"{toml_value(option.kind, entry.value)} at {entry.origin}")
            out.append(problem + (f" ({'; '.join(blamed)})" if blamed else ""))
        return out

    def explain_run(self, given: dict[str, Entry], key: str | None = None) -> list[
            tuple[str, Entry]]:
        """Every run option's effective value and origin (``debounce config``)."""
        out = []
        for option in table.FIELDS:
            entry = given.get(option.name) or self.lookup(option.name, key)
            out.append((option.name, entry or Entry(option.default, "default")))
        return out

    def explain_daemon(self, given: dict[str, Entry]) -> list[tuple[str, Entry]]:
        out = []
        for option in table.DAEMON_OPTIONS:
            entry = given.get(option.name) or self.lookup(option.name)
            out.append((option.name, entry or Entry(option.default, "default")))
        return out


# ------------------------------------------------------------------------------ locations
def user_file() -> str:
    """``$XDG_CONFIG_HOME/debounce/config.toml``, else ``~/.config/debounce/config.toml``."""
    base = os.environ.get("XDG_CONFIG_HOME")
    if not base or not os.path.isabs(base):  # the XDG spec: a relative value is ignored
        base = os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "debounce", "config.toml")


def project_file(cwd: str) -> str | None:
    """The nearest ``.debounce.toml`` from ``cwd`` up, stopping at the repository's top (a
    directory holding ``.git``) or the root. Two ``stat`` calls a level when there is none."""
    here = cwd
    while True:
        candidate = os.path.join(here, PROJECT_FILE)
        if os.path.isfile(candidate):
            return candidate
        if os.path.exists(os.path.join(here, ".git")):
            return None
        parent = os.path.dirname(here)
        if parent == here:
            return None
        here = parent


def paths(cwd: str | None = None) -> list[tuple[str, str]]:
    """The config files that exist, as (scope, path), lowest precedence first."""
    found = []
    user = user_file()
    if os.path.isfile(user):
        found.append(("user", user))
    if cwd is None:
        try:
            cwd = os.getcwd()
        except OSError:
            cwd = None
    project = project_file(cwd) if cwd is not None else None
    if project is not None:
        found.append(("project", project))
    return found


_cache: dict[str | None, Settings] = {}


def load(cwd: str | None = None) -> Settings:
    """The settings seen from ``cwd`` (default: the working directory), read once a process.

    Raises:
        ConfigError: a file cannot be read or says something wrong.
    """
    if cwd in _cache:
        return _cache[cwd]
    found = paths(cwd)
    sources = []
    if found:
        cache = _Cache()
        for scope, path in found:
            source = cache.get(path, scope)
            if source is None:
                source = read_file(path, scope)
                cache.put(path, source)
            sources.append(source)
        cache.save()
    settings = _cache[cwd] = Settings(sources)
    return settings


def _private(what: str | int) -> bool:
    """Whether a directory (by path) or an open file is ours and writable by us alone."""
    try:
        st = os.stat(what)
    except OSError:
        return False
    return st.st_uid == os.getuid() and not st.st_mode & 0o022


class _Cache:
    """Config files already read and checked, by path, with the stamp of what was read."""

    #: Files remembered at most (the least recently read go first).
    LIMIT = 64

    def __init__(self) -> None:
        state = os.environ.get("DEBOUNCE_STATE_DIR")
        if not state:
            from debounce_cli.paths import state_dir

            state = state_dir()
        self.path = os.path.join(state, "config-cache.json")
        self.entries: dict[str, Any] = {}
        self.changed = False
        self.usable = _private(state)  # no one else may plant settings (a store URL) here
        if not self.usable:
            return
        try:
            with open(self.path, encoding="utf-8") as f:
                if not _private(f.fileno()):
                    return
                from debounce_cli.protocol import loads

                entries = loads(f.read())
            if isinstance(entries, dict):
                self.entries = entries
        except (OSError, ValueError):
            pass  # none yet, or unreadable: read the files themselves

    @staticmethod
    def stamp(path: str) -> list[int] | None:
        try:
            st = os.stat(path)
        except OSError:
            return None
        return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]

    def get(self, path: str, scope: str) -> Source | None:
        entry = self.entries.get(path)
        if (not isinstance(entry, dict) or entry.get("stamp") != self.stamp(path)
                or entry.get("version") != __version__):  # another version checks otherwise
            return None
        try:
            source = Source(path, scope)
            source.values = {n: Entry(v, o) for n, (v, o) in entry["values"].items()}
            source.sections = [(pattern, {n: Entry(v, o) for n, (v, o) in values.items()})
                               for pattern, values in entry["sections"]]
        except (KeyError, TypeError, ValueError, AttributeError):
            return None
        return source

    def put(self, path: str, source: Source) -> None:
        stamp = self.stamp(path)
        if stamp is None:
            return

        def plain(values: dict[str, Entry]) -> dict[str, Any]:
            return {n: [e.value, e.origin] for n, e in values.items()}

        self.entries.pop(path, None)
        self.entries[path] = {"stamp": stamp, "version": __version__,
                              "values": plain(source.values),
                              "sections": [[p, plain(v)] for p, v in source.sections]}
        while len(self.entries) > self.LIMIT:
            del self.entries[next(iter(self.entries))]
        self.changed = True

    def save(self) -> None:
        """Best effort: a state directory that is missing or unwritable only costs speed."""
        if not self.changed or not self.usable:
            return
        import json

        temp = f"{self.path}.{os.getpid()}"
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(self.entries, f)
            os.replace(temp, self.path)
        except OSError:
            try:
                os.unlink(temp)
            except OSError:
                pass


# ------------------------------------------------------------------------------ reading
def read_file(path: str, scope: str) -> Source:
    """One config file, checked whole: every key known, every value of its type."""
    import tomllib

    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read it: {exc.strerror}; mend its permissions or "
                          "remove it") from None
    try:
        text = raw.decode()
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text; save the file as UTF-8") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message, line = _decode_error(str(exc), text)
        raise ConfigError(f"{path}:{line}: invalid TOML: {message}; fix the syntax (strings "
                          'in quotes: delay = "2s")') from None
    lines = _key_lines(text)
    source = Source(path, scope)
    for name, value in data.items():
        where = f"{path}:{lines.get((), {}).get(name, 1)}"
        if name == SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f'{where}: key: must be tables, as in [key."docs"] '
                                  "delay = \"500ms\"")
            for pattern, values in value.items():
                at = lines.get((SECTIONS, pattern), {})
                header = f"{path}:{at.get('', 1)}"
                if not isinstance(values, dict):
                    raise ConfigError(f'{header}: key.{pattern}: must be a table, as in '
                                      f'[key."{pattern}"] then delay = "500ms" below it')
                source.sections.append(
                    (pattern, _table(values, path, at, f'[key."{pattern}"]', per_key=True)))
            continue
        source.values.update(_table({name: value}, path, lines.get((), {}), "", per_key=False))
    return source


def _table(values: dict[str, Any], path: str, lines: dict[str, int], where: str,
           per_key: bool) -> dict[str, Entry]:
    out: dict[str, Entry] = {}
    for name, value in values.items():
        origin = f"{path}:{lines.get(name, lines.get('', 1))}"
        option = _RUN.get(name)
        if option is None and name in _DAEMON:
            if per_key:
                raise ConfigError(f"{origin}: {name} is a daemon setting, not a run option: "
                                  f"move it out of {where} to the top of the file")
            out[name] = Entry(_daemon_value(_DAEMON[name], value, origin), origin)
            continue
        if option is None:
            raise ConfigError(f"{origin}: unknown key {name!r}{_suggest(name, per_key)}")
        converted = _run_value(option, value, origin)
        if option.shorthand:  # throttle = "2s": leading, delay and max_wait, from this line
            for field, field_value in table.expand({name: converted}).items():
                if field in values and field != name:
                    raise ConfigError(f"{origin}: throttle sets {field} too; keep one of "
                                      f"throttle and {field}")
                out[field] = Entry(field_value, origin)
        else:
            out[name] = Entry(converted, origin)
    return out


def _run_value(option: table.RunOption, value: Any, origin: str) -> Any:
    name = option.name
    if option.kind == table.DURATION:
        return _duration(name, value, origin, positive=option.default is None)
    if option.kind == table.FLAG:
        if not isinstance(value, bool):
            raise ConfigError(f"{origin}: {name} must be true or false, not {_show(value)}")
        return value
    if option.kind == table.CHOICE:
        if value not in option.choices:
            raise ConfigError(f"{origin}: {name} must be one of "
                              f"{', '.join(repr(c) for c in option.choices)} (in quotes), "
                              f"not {_show(value)}")
        return value
    raise AssertionError(option.kind)


def _daemon_value(option: table.DaemonOption, value: Any, origin: str) -> Any:
    name = option.name
    if option.kind == table.DURATION:
        return _duration(name, value, origin, positive=name == "lease")
    if option.kind == table.FLAG:
        if not isinstance(value, bool):
            raise ConfigError(f"{origin}: {name} must be true or false, not {_show(value)}")
        return value
    if option.kind == table.COUNT:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{origin}: {name} must be a whole number, as in {name} = 4, "
                              f"not {_show(value)}")
        if option.minimum is not None and value < option.minimum:
            raise ConfigError(f"{origin}: {name} must be at least {option.minimum}, not "
                              f"{value}")
        return value
    if not isinstance(value, str):
        raise ConfigError(f'{origin}: {name} must be a string, as in {name} = "..."; not '
                          f"{_show(value)}")
    if option.kind == table.STORE:
        from debounce_cli.daemon.fleet.url import StoreURLError, parse_store_url

        try:
            parse_store_url(value)
        except StoreURLError as exc:
            raise ConfigError(f"{origin}: {name}: {exc}".replace("--store/DEBOUNCE_STORE",
                                                                 "store")) from None
    elif option.kind == table.ADDRESS:
        try:
            table.parse_address(value)
        except ValueError as exc:
            raise ConfigError(f"{origin}: {name}: {exc}") from None
    return value


def _duration(name: str, value: Any, origin: str, positive: bool) -> float:
    from debounce_cli.durations import DurationError, parse_duration

    if isinstance(value, bool):
        seconds = None
    elif isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        try:
            seconds = parse_duration(value)
        except DurationError as exc:
            raise ConfigError(f"{origin}: {name}: {exc} (in quotes: {name} = "
                              '"2s")') from None
    else:
        seconds = None
    if seconds is None or seconds != seconds:
        raise ConfigError(f'{origin}: {name} must be a duration such as {name} = "2s" or 0.5, '
                          f"not {_show(value)}")
    if seconds < 0 or (positive and seconds == 0):
        bound = "greater than 0" if positive else "0 or more"
        raise ConfigError(f"{origin}: {name} must be {bound}, not {_show(value)}")
    return seconds


def _suggest(name: str, per_key: bool) -> str:
    import difflib

    known = sorted(_RUN) if per_key else sorted({*_RUN, *_DAEMON})
    close = difflib.get_close_matches(name.replace("-", "_"), known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"{hint} (known: {', '.join(known)})" if not close else hint


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "a list"
    return repr(value)


def _decode_error(message: str, text: str) -> tuple[str, int]:
    """tomllib's "Expected '=' ... (at line 3, column 7)" as (message, 3)."""
    if message.endswith(" (at end of document)"):
        return message.removesuffix(" (at end of document)") + " at the end of the file", max(
            1, len(text.splitlines()))
    head, sep, tail = message.rpartition(" (at line ")
    if not sep:
        return message, 1
    number = tail.split(",", 1)[0]
    return head, int(number) if number.isdigit() else 1


def _key_lines(text: str) -> dict[tuple[str, ...], dict[str, int]]:
    """Where each key is written: {table path: {key: line}}, '' for the table's header.

    Only for messages: a line-oriented look at ``key = value`` and ``[table]`` lines (the
    file has already parsed, so the rare line this misreads costs a line number, no more).
    """
    out: dict[tuple[str, ...], dict[str, int]] = {(): {}}
    current: tuple[str, ...] = ()
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("[") and not stripped.startswith("[["):
            current = tuple(_split_dotted(stripped[1:].split("]", 1)[0]
                                          if '"' not in stripped else _header(stripped)))
            out.setdefault(current, {})[""] = number
            continue
        if "=" not in stripped or stripped.startswith("#"):
            continue
        name = _split_dotted(stripped.split("=", 1)[0] if not stripped.startswith('"')
                             else _quoted_head(stripped))
        if name:
            out.setdefault(current, {}).setdefault(name[0], number)
    return out


def _header(stripped: str) -> str:
    """``[key."a]b"]`` -> ``key."a]b"``: the header up to its closing bracket outside quotes."""
    quoted = False
    for i, char in enumerate(stripped[1:], 1):
        if char == '"':
            quoted = not quoted
        elif char == "]" and not quoted:
            return stripped[1:i]
    return stripped[1:]


def _quoted_head(stripped: str) -> str:
    end = stripped.find('"', 1)
    return stripped[: end + 1] if end > 0 else stripped


def _split_dotted(text: str) -> list[str]:
    parts, part, quoted = [], "", ""
    for char in text.strip():
        if quoted:
            if char == quoted:
                quoted = ""
            else:
                part += char
        elif char in "\"'":
            quoted = char
        elif char == ".":
            parts.append(part.strip())
            part = ""
        else:
            part += char
    parts.append(part.strip())
    return [p for p in parts if p]


# ------------------------------------------------------------------------------ writing
def toml_value(option_kind: str, value: Any) -> str:
    """A value as a config file would write it (``debounce config``)."""
    if value is None:
        return "(none)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if option_kind == table.DURATION:
        from debounce_cli.durations import format_duration

        return f'"{format_duration(value)}"'
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return str(value)
