"""Errors that are the user's to fix: the CLI prints them as one line and exits non-zero."""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input (config, data, paths); printed without a traceback."""


class ConfigError(UserError):
    """A config file or override that does not fit the stage's config schema."""


class DataError(UserError):
    """A malformed row: names the file, the line (or row index) and the field."""

    def __init__(self, location: str, field: str | None, message: str):
        self.location = location
        self.field = field
        self.message = message
        where = f"{location}: field '{field}'" if field else location
        super().__init__(f"{where}: {message}")
