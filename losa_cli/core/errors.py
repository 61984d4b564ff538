"""Errors a user can act on.

Every failure the user can fix is a ``LosaError`` whose message says what to change; the CLI
prints it as one line and exits with ``exit_code``.  Anything else is a bug and gets a
traceback (with ``LOSA_DEBUG=1`` the CLI shows tracebacks for ``LosaError`` too).
"""

import re
from collections.abc import Callable

_KEY = re.compile("\x1f([A-Za-z0-9_]+)\x1f")


def key(name: str) -> str:
    """A setting inside a problem message, shown as ``--name-with-dashes`` on the command line and as
    ``section.name`` in a recipe (``ConfigError.render``), so one message serves both."""
    return f"\x1f{name}\x1f"


def option(name: str) -> str:
    """A setting as its command-line option: ``rank_max`` -> ``--rank-max``."""
    return "--" + name.replace("_", "-")


def render(message: str, section: str | None = None, name_of: Callable[[str], str] = option) -> str:
    """``message`` with its settings named as keys of the recipe ``section``, else by ``name_of`` (options)."""
    return _KEY.sub(lambda match: f"{section}.{match[1]}" if section else name_of(match[1]), message)


class LosaError(Exception):
    """Base class: a message for the user and the process exit code."""

    exit_code = 2


class ConfigError(LosaError):
    """Settings are invalid (range, combination, unknown key): every problem found, not only the first.

    A problem names settings with ``key(name)``; ``str()`` renders them as command-line options
    (``--rank-max``), ``render(section)`` as recipe keys (``recover.rank_max``).
    """

    def __init__(self, problems: str | list[str]) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__(self.render())

    def render(self, section: str | None = None, name_of: Callable[[str], str] = option) -> str:
        return "; ".join(render(problem, section, name_of) for problem in self.problems)


class ModelError(LosaError):
    """The model cannot be found, read, or is of an unsupported architecture."""


class DataError(LosaError):
    """A data file is missing, malformed or too short for the request."""


class OutputExistsError(LosaError):
    """The output folder exists and ``--force`` was not given."""


class NumericalError(LosaError):
    """A numerical step failed (Cholesky, NaN); the message names the setting to change."""

    exit_code = 3
