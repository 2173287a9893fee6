"""Logging setup: structlog, human console lines on a terminal, JSON lines otherwise (and in a logfile)."""

from __future__ import annotations

import sys
import time

import structlog


class _Tee:
    """Writes each rendered line to stderr and, if configured, appends it to the logfile."""

    def __init__(self, logfile: str | None):
        self.file = open(logfile, "a", buffering=1) if logfile else None

    def msg(self, message: str) -> None:
        print(message, file=sys.stderr, flush=True)
        if self.file is not None:
            self.file.write(message + "\n")

    debug = info = warning = error = critical = exception = msg


def configure(logfile: str | None = None, json_lines: bool | None = None) -> None:
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
