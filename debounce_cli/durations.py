"""Parse and format durations such as ``250ms``, ``1m30s`` or ``0.5``.

Parsed by hand, without ``re``: the client parses ``--delay`` on every call, and importing
the regular expression engine would cost it more than the parsing.
"""

from __future__ import annotations

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_ORDER = ("d", "h", "m", "s", "ms")  # largest first
_DIGITS = frozenset("0123456789")


class DurationError(ValueError):
    """A duration that cannot be parsed; the message says what to write instead."""


def _number(text: str, pos: int) -> tuple[str, int]:
    """The number at ``pos`` (``12``, ``1.5``, ``1.``, ``.5``) and where it ends; "" if none."""
    start = pos
    while pos < len(text) and text[pos] in _DIGITS:
        pos += 1
    whole = pos > start
    if pos < len(text) and text[pos] == ".":
        frac_start = pos + 1
        end = frac_start
        while end < len(text) and text[end] in _DIGITS:
            end += 1
        if whole or end > frac_start:
            return text[start:end], end
    return (text[start:pos], pos) if whole else ("", start)


def parse_duration(text: str) -> float:
    """Return ``text`` as seconds.

    Accepts a bare number of seconds (``0.5``) or one or more number-unit parts with the units
    ``ms``, ``s``, ``m``, ``h`` and ``d`` (``1m30s``, ``1.5s``, ``250ms``). Each unit may appear
    once, largest first, so ``30s1m`` and ``1m1m`` are refused rather than guessed at.
    """
    raw = text
    text = text.strip().lower()
    if not text:
        raise DurationError("empty duration; write e.g. 250ms, 2s, 1m30s or 0.5")
    number, end = _number(text, 0)
    if number and end == len(text):
        value = float(number)
    else:
        pos = 0
        value = 0.0
        last_rank: int | None = None
        while pos < len(text):
            number, pos = _number(text, pos)
            unit = "ms" if text.startswith("ms", pos) else text[pos:pos + 1]
            if not number or unit not in _UNITS:
                raise DurationError(
                    f"invalid duration {raw!r}; write e.g. 250ms, 2s, 1.5s, 1m30s, 2h or 0.5"
                )
            rank = _ORDER.index(unit)
            if last_rank is not None and rank <= last_rank:
                raise DurationError(
                    f"invalid duration {raw!r}: units must appear once each, largest first "
                    "(e.g. 1m30s)"
                )
            last_rank = rank
            value += float(number) * _UNITS[unit]
            pos += len(unit)
    if not value - value == 0:  # inf or nan (math.isfinite, without importing math)
        raise DurationError(f"invalid duration {raw!r}: too large")
    return value


def format_duration(seconds: float) -> str:
    """Format seconds compactly for people: ``250ms``, ``2s``, ``1.5s``, ``1m30s``, ``2h5m``."""
    if seconds < 0:
        return "-" + format_duration(-seconds)
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    if seconds < 60:
        text = f"{seconds:.1f}".rstrip("0").rstrip(".")
        return f"{text}s"
    total = round(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    parts = []
    if hours:
        parts.append(f"{hours}h")
    if minutes:
        parts.append(f"{minutes}m")
    if secs:
        parts.append(f"{secs}s")
    return "".join(parts) or "0s"
