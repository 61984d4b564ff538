"""What every stage's settings share: the default model, devices and dtypes, calibration windows, and
the checks that turn settings into problems.

Each stage owns its config beside its workflow (``prune/config.py``, ``recover/config.py``,
``export/config.py``, ``runtime/config.py``, ``run/recipe.py``).  A config validates itself when it
is built: every problem is collected (named with ``key``, so the CLI shows ``--rank-max`` and a recipe
``recover.rank_max``) and raised together in one ``ConfigError``, so a user fixes a run in one go.
Choices are ``StrEnum``s: they compare equal to their strings, and an unknown string is a problem.
"""

from __future__ import annotations

import codecs
from dataclasses import asdict, dataclass
from enum import Enum, StrEnum
from typing import Any, TypeVar

from .errors import ConfigError, key
from .hub import LOCAL_DATA

DEFAULT_MODEL = "smollm2-135m"
AUTO_ENCODING = "auto"  # text files: a byte-order mark, else UTF-8, else detected and named in a warning (core/data.py)

E = TypeVar("E", bound=Enum)


class Device(StrEnum):
    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"


class DType(StrEnum):
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"


class Sampling(StrEnum):
    """Calibration windows: from the documents joined by blank lines, or one per document (Wanda/SparseGPT)."""

    STREAM = "stream"
    DOCUMENT = "document"


def choice(value: Any, choices: type[E], name: str, found: list[str]) -> E | Any:
    """``value`` as a member of ``choices``; an unknown value adds its problem to ``found`` and is kept as is."""
    try:
        return choices(value)
    except ValueError:
        found.append(f"{key(name)} {value!r} is unknown; choose one of {', '.join(str(c.value) for c in choices)}")
        return value


def choices(values: Any, kinds: type[E], name: str, found: list[str]) -> list[E]:
    """A list of choices given as a list or a comma-separated string, in order, without duplicates."""
    items = values.split(",") if isinstance(values, str) else list(values or [])
    names = list(dict.fromkeys(str(item).strip().lower() for item in items if str(item).strip()))
    picked = [kinds(n) for n in names if n in {str(c.value) for c in kinds}]
    if not names or len(picked) != len(names):
        given = values if isinstance(values, str) else ",".join(str(v) for v in values or [])
        found.append(f"{key(name)} {given!r}: choose from {', '.join(str(c.value) for c in kinds)} (comma-separated)")
    return picked


def raise_problems(found: list[str]) -> None:
    """Raise every problem found at once."""
    if found:
        raise ConfigError(found)


def check_encoding(encoding: str) -> list[str]:
    """[] for ``auto`` or a Python text codec; a typo is caught here, before any model is loaded."""
    if encoding == AUTO_ENCODING:
        return []
    try:
        codecs.lookup(encoding)
        b"a".decode(encoding)  # bytes-to-bytes codecs (base64, zlib) are found but are no text encoding
    except LookupError:
        return [f"{key('encoding')} {encoding!r} is not a text encoding Python knows; give auto or a codec such as "
                "utf-8, latin-1, cp1252"]
    except ValueError:
        pass  # a text codec that cannot decode this one byte (utf-16): fine
    return []


@dataclass
class CalibrationConfig:
    """Where calibration windows come from and how many (prune and recover)."""

    calib: str = ""  # no default: a Hub name (c4, wikitext2) would reach the network unasked
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0
    sampling: Sampling = Sampling.STREAM
    encoding: str = AUTO_ENCODING  # of the calibration file (and of recover's --data: one --encoding per command)

    def __post_init__(self) -> None:
        self._found: list[str] = []
        self.sampling = choice(self.sampling, Sampling, "sampling", self._found)

    def problems(self, needs_data: bool = True) -> list[str]:
        found = list(self._found) + check_encoding(self.encoding)
        if needs_data and not self.calib:
            found.append(
                f"{key('calib')} is required: {LOCAL_DATA}; {key('calib')} c4 or wikitext2 downloads from the Hub"
            )
        if not 0 <= self.seed < 2**32:
            found.append(f"{key('seed')} must be in [0, 2**32), got {self.seed}")
        if self.nsamples < 1:
            found.append(f"{key('nsamples')} must be at least 1, got {self.nsamples}")
        if self.seqlen < 2:
            found.append(f"{key('seqlen')} must be at least 2, got {self.seqlen}")
        return found


def to_dict(config: object) -> dict:
    """Plain-dict view of a config dataclass (for manifests and ``--json``); enums become their strings."""

    def plain(value: Any) -> Any:
        if isinstance(value, Enum):
            return value.value
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, list):
            return [plain(v) for v in value]
        return value

    return plain(asdict(config))  # type: ignore[arg-type]
