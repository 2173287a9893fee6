"""Configuration: one frozen model (model.py), two front doors.

    load(path, node=None, allow_insecure_auth=False) -> Config
        path: a TOML file (native), or a Heartbeat directory holding ha.cf (+ authkeys, + haresources),
        or the ha.cf file itself. Raises ConfigError listing every problem found; never anything else.
    to_toml(cfg) -> str          the native form of any Config (round-trips through load)
    parse_duration("200ms") -> 200
"""

from __future__ import annotations

import os

from .convert import to_toml
from .durations import format_duration, parse_duration
from .errors import ConfigError
from .model import DEFAULT_CONFIG_PATH, DEFAULT_LEGACY_DIR, Config

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "DEFAULT_LEGACY_DIR",
    "Config",
    "ConfigError",
    "format_duration",
    "load",
    "parse_duration",
    "to_toml",
]


def load(path: str, node: str | None = None, allow_insecure_auth: bool = False) -> Config:
    """Load and validate the configuration at `path` as seen from `node` (default: uname -n)."""
    from .legacy import load_legacy
    from .native import load_toml

    if node is None:
        node = os.uname().nodename
    path = os.fspath(path)
    try:
        if os.path.isdir(path):
            return load_legacy(path, node, allow_insecure_auth)
        if os.path.basename(path) == "ha.cf":
            return load_legacy(os.path.dirname(path) or ".", node, allow_insecure_auth)
        if not os.path.exists(path):
            try:
                os.stat(path)
            except PermissionError:
                raise ConfigError([f"{path}: permission denied (a directory on the way is not searchable)"]) from None
            except OSError:
                pass
            raise ConfigError([f"{path}: no such file or directory (give a hastore.toml file, "
                               f"or a Heartbeat directory such as {DEFAULT_LEGACY_DIR})"])
        return load_toml(path, node, allow_insecure_auth)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 — the contract: bad input never escapes as a traceback
        raise ConfigError([f"{path}: internal error while reading the configuration: {exc!r} "
                           f"(this is a hastore bug: please report it with the file)"]) from exc
