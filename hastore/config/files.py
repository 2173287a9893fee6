"""Reading configuration files without ever raising: problems become error strings."""

from __future__ import annotations

import os
import stat


def read_text(path: str, errors: list[str], *, required: bool = True, raw: bool = False) -> str | None:
    """Return the file's text, or None after appending an error (or nothing, if optional and absent).

    With `raw`, undecodable bytes survive as surrogates (authkeys secrets are bytes, not text).
    """
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        if required:
            errors.append(f"{path}: cannot read: no such file")
        return None
    except IsADirectoryError:
        errors.append(f"{path}: cannot read: it is a directory, not a file")
        return None
    except OSError as exc:
        errors.append(f"{path}: cannot read: {exc.strerror or exc}")
        return None
    if raw:
        return data.decode("utf-8", errors="surrogateescape")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        errors.append(
            f"{path}:{line}: not valid UTF-8 (byte 0x{data[exc.start]:02x}); save the file as UTF-8"
        )
        return None


def check_private(path: str, errors: list[str], what: str) -> None:
    """Refuse a secret-bearing file that group or others may read or write (Heartbeat's authkeys rule)."""
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return  # the read already reported it
    if mode & 0o077:
        errors.append(
            f"{path}: mode {mode:04o} lets group or others read or write it, and it holds {what}; "
            f"hastore (like Heartbeat) refuses it: run chmod 600 {path}"
        )
