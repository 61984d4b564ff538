"""Errors a user can act on.

Every failure the user can fix is a ``LosaError`` whose message says what to change; the CLI
prints it as one line and exits with ``exit_code``.  Anything else is a bug and gets a
traceback (with ``LOSA_DEBUG=1`` the CLI shows tracebacks for ``LosaError`` too).
"""


class LosaError(Exception):
    """Base class: a message for the user and the process exit code."""

    exit_code = 2


class ConfigError(LosaError):
    """A setting is invalid (range, combination, unknown key)."""


class ModelError(LosaError):
    """The model cannot be found, read, or is of an unsupported architecture."""


class DataError(LosaError):
    """A data file is missing, malformed or too short for the request."""


class OutputExistsError(LosaError):
    """The output folder exists and ``--force`` was not given."""


class NumericalError(LosaError):
    """A numerical step failed (Cholesky, NaN); the message names the setting to change."""

    exit_code = 3
