"""Durations as operators write them ("200ms", "2", "1.5s") to integer milliseconds.

Heartbeat's rule (config.c get_msec): a bare number is seconds; "ms"/"msec" and "us"/"usec"
suffixes are accepted, with optional blanks before the unit, and the result is rounded to the
nearest millisecond. hastore also accepts "s"/"sec" and "min" because they read better.
"""

from __future__ import annotations

import re
from decimal import ROUND_HALF_UP, Decimal

_UNITS_MS = {
    "": Decimal(1000),
    "s": Decimal(1000),
    "sec": Decimal(1000),
    "ms": Decimal(1),
    "msec": Decimal(1),
    "us": Decimal("0.001"),
    "usec": Decimal("0.001"),
    "min": Decimal(60000),
}
_PATTERN = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*")
_MAX_MS = 7 * 24 * 3600 * 1000  # a week: anything longer is a typo, not a timer


def parse_duration(text: str) -> int:
    """Return `text` in whole milliseconds; raise ValueError with a sentence if it is not a duration."""
    if not isinstance(text, str):
        raise ValueError(f"{text!r} is not a duration; write it as a string such as \"2s\" or \"500ms\"")
    match = _PATTERN.fullmatch(text)
    if match is None:
        raise ValueError(
            f"{text!r} is not a duration; write a number of seconds (\"2\", \"1.5\") "
            f"or a number with a unit (\"500ms\", \"2s\", \"1min\")"
        )
    number, unit = match.groups()
    factor = _UNITS_MS.get(unit.lower())
    if factor is None:
        raise ValueError(f"{text!r} has unknown unit {unit!r}; use ms, s or min (us is accepted too)")
    ms = int((Decimal(number) * factor).quantize(Decimal(1), rounding=ROUND_HALF_UP))
    if ms > _MAX_MS:
        raise ValueError(f"{text!r} is longer than a week; that cannot be a heartbeat timer")
    return ms


def format_duration(ms: int) -> str:
    """The shortest exact spelling: "2s", "1500ms", "2min" never (seconds read better in ha.cf terms)."""
    if ms % 1000 == 0:
        return f"{ms // 1000}s"
    return f"{ms}ms"
