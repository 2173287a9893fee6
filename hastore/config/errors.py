"""The one exception configuration loading raises, carrying every problem found."""

from __future__ import annotations

from collections.abc import Iterable


class ConfigError(Exception):
    """A configuration that cannot be used.

    `errors` lists every problem found, each prefixed with where it is:
    ``FILE:LINE: message`` (legacy files) or ``FILE: key.path: message`` (TOML).
    `warnings` carries the warnings collected up to the failure, for tools that show both.
    """

    def __init__(self, errors: Iterable[str], warnings: Iterable[str] = ()) -> None:
        self.errors: list[str] = list(errors)
        self.warnings: list[str] = list(warnings)
        super().__init__("\n".join(self.errors))

    def __str__(self) -> str:
        return "\n".join(self.errors)
