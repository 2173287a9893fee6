"""Logging setup: structlog, human console lines on a terminal, JSON lines otherwise (and in a logfile); and the
same JSON lines without structlog for the guard (JsonLines), which must start fast: structlog imports asyncio,
logging and threading, seconds in an emulated VM (structlog is imported by configure and get, not here)."""

from __future__ import annotations

import datetime
import json
import sys
import time


class _Tee:
    """Writes each rendered line to stderr and, if configured, appends it to the logfile."""

    def __init__(self, logfile: str | None):
        self.file = open(logfile, "a", buffering=1) if logfile else None

    def msg(self, message: str) -> None:
        print(message, file=sys.stderr, flush=True)
        if self.file is not None:
            self.file.write(message + "\n")

    debug = info = warning = error = critical = exception = msg


class JsonLines:
    """The lines configure(json_lines=True) makes (bound fields, the call's fields, event, level, local ISO time),
    from the standard library alone."""

    def __init__(self, logfile: str | None = None, _tee: _Tee | None = None, **bound):
        self._tee = _tee if _tee is not None else _Tee(logfile)
        self._bound = bound

    def bind(self, **fields) -> JsonLines:
        return JsonLines(_tee=self._tee, **{**self._bound, **fields})

    def _line(self, level: str, event: str, fields: dict) -> None:
        d = {**self._bound, **fields, "event": event, "level": level,
             "timestamp": datetime.datetime.now().isoformat()}
        self._tee.msg(json.dumps(d, default=repr))

    def debug(self, event: str, **fields) -> None:
        self._line("debug", event, fields)

    def info(self, event: str, **fields) -> None:
        self._line("info", event, fields)

    def warning(self, event: str, **fields) -> None:
        self._line("warning", event, fields)

    def error(self, event: str, **fields) -> None:
        self._line("error", event, fields)


def configure(logfile: str | None = None, json_lines: bool | None = None) -> None:
    import structlog

    if json_lines is None:
        json_lines = not sys.stderr.isatty()
    renderer = structlog.processors.JSONRenderer() if json_lines else structlog.dev.ConsoleRenderer(colors=False)
    tee = _Tee(logfile)
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=False),
            renderer,
        ],
        logger_factory=lambda *args: tee,
        cache_logger_on_first_use=True,
    )


def get(name: str = "hastore"):
    import structlog

    return structlog.get_logger(name)


class RateLimiter:
    """Lets one message per key through every `interval` seconds and counts the ones it held back."""

    def __init__(self, interval: float = 10.0, clock=time.monotonic):
        self.interval = interval
        self.clock = clock
        self.last: dict[str, float] = {}
        self.held: dict[str, int] = {}

    def allow(self, key: str) -> tuple[bool, int]:
        now = self.clock()
        if now - self.last.get(key, -1e18) >= self.interval:
            self.last[key] = now
            return True, self.held.pop(key, 0)
        self.held[key] = self.held.get(key, 0) + 1
        return False, 0
