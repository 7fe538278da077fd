"""Defer keys: the default key and ``--key`` templates.

A template is parsed by hand rather than handed to ``str.format``: ``str.format`` would follow
attribute and index look-ups (``{0.__class__}``, ``{env.__dict__}``) into Python objects. Here a
field can only be one of the names the SPEC lists, and anything else is refused with the field
named, so the renderer can never reach more than the invocation's own argv, cwd and environment.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

#: Characters shlex.quote leaves unquoted (its pattern, without importing re or shlex).
_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_@%+=:,./-")
_NAME_START = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_")
_NAME = _NAME_START | frozenset("0123456789")
_FIELDS_HELP = "use {0}..{N}, {args}, {cwd}, {env[NAME]}, or {{ and }} for literal braces"


class KeyTemplateError(ValueError):
    """A key template that cannot be used; the message names the bad field."""


def default_key(argv: Sequence[str], cwd: str) -> str:
    """The whole invocation: only identical commands run in the same directory coalesce.

    Written like a shell prompt (``/src/app$ make test``) so that it reads well in ``status``.
    """
    return f"{cwd}$ {join(argv)}"


def quote(word: str) -> str:
    """``shlex.quote``, to the byte, without its imports (the client computes keys)."""
    if not word:
        return "''"
    if all(c in _SAFE for c in word):
        return word
    return "'" + word.replace("'", "'\"'\"'") + "'"


def join(argv: Sequence[str]) -> str:
    """``shlex.join``, to the byte."""
    return " ".join(quote(word) for word in argv)


def parse_template(template: str) -> list[str | tuple[str, str]]:
    """Split a template into literal text and ``(kind, name)`` fields, refusing unknown fields.

    Kinds are ``arg`` (name is the index), ``args``, ``cwd`` and ``env`` (name is the variable).
    """
    parts: list[str | tuple[str, str]] = []
    literal: list[str] = []
    i, n = 0, len(template)
    while i < n:
        ch = template[i]
        if ch == "{":
            if template.startswith("{{", i):
                literal.append("{")
                i += 2
                continue
            end = template.find("}", i + 1)
            if end < 0:
                raise KeyTemplateError(
                    f"key template {template!r}: unclosed '{{' at position {i + 1}; "
                    "write {{ for a literal brace"
                )
            name = template[i + 1 : end]
            if literal:
                parts.append("".join(literal))
                literal = []
            parts.append(_field(name, template))
            i = end + 1
        elif ch == "}":
            if template.startswith("}}", i):
                literal.append("}")
                i += 2
                continue
            raise KeyTemplateError(
                f"key template {template!r}: single '}}' at position {i + 1}; "
                "write }} for a literal brace"
            )
        else:
            literal.append(ch)
            i += 1
    if literal:
        parts.append("".join(literal))
    return parts


def _field(name: str, template: str) -> tuple[str, str]:
    if name.isascii() and name.isdigit():
        return ("arg", str(int(name)))
    if name in ("args", "cwd"):
        return (name, "")
    if name.startswith("env[") and name.endswith("]"):
        var = name[4:-1]
        if var and var[0] in _NAME_START and all(c in _NAME for c in var):
            return ("env", var)
    raise KeyTemplateError(f"key template {template!r}: unknown field {{{name}}}; {_FIELDS_HELP}")


def render_key(
    template: str, argv: Sequence[str], cwd: str, env: Mapping[str, str]
) -> str:
    """Render ``template`` for one invocation; refuse fields the invocation cannot fill."""
    out: list[str] = []
    for part in parse_template(template):
        if isinstance(part, str):
            out.append(part)
            continue
        kind, name = part
        if kind == "arg":
            index = int(name)
            if index >= len(argv):
                have = len(argv) - 1
                raise KeyTemplateError(
                    f"key template {template!r}: field {{{name}}} names argument {index}, "
                    f"but the command has {have} argument{'s' if have != 1 else ''}"
                )
            out.append(argv[index])
        elif kind == "args":
            out.append(join(argv[1:]))
        elif kind == "cwd":
            out.append(cwd)
        else:
            if name not in env:
                raise KeyTemplateError(
                    f"key template {template!r}: field {{env[{name}]}} names ${name}, "
                    "which is not set; export it or drop the field"
                )
            out.append(env[name])
    return "".join(out)


def compute_key(
    template: str | None, argv: Sequence[str], cwd: str, env: Mapping[str, str],
    collect: bool = False,
) -> str:
    """The key of an invocation: the template rendered, or the whole invocation without one.

    With ``--collect`` and no template the last argument is left out (cwd plus the argv
    before it), so ``lint.sh x.py`` and ``lint.sh y.py`` coalesce into one batch: the
    obvious first try batches."""
    if template is None:
        if collect and len(argv) >= 2:
            return default_key(argv[:-1], cwd)
        return default_key(argv, cwd)
    return render_key(template, argv, cwd, env)
