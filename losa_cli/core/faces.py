"""Public faces of the stage packages, loaded on first use.

Each stage package (``prune``, ``recover``, ``export``, ``runtime``, ``run``) names in its
``__init__`` what other packages may call, and they import those names from the package itself
(``from ..prune import run_prune``), never from its modules -- a test holds every import to that.
The names are loaded when first asked for, so importing a package for its light config classes
(the CLI builds its options from them at start-up) does not import torch or transformers.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import import_module
from typing import Any


def public_face(package: str, names: dict[str, str]) -> tuple[list[str], Callable[[str], Any]]:
    """``__all__`` and the module ``__getattr__`` of ``package``: ``names`` maps each public name to the
    module (relative to the package) that defines it."""

    def __getattr__(name: str) -> Any:
        if name not in names:
            raise AttributeError(f"module {package!r} has no public name {name!r}")
        return getattr(import_module(f"{package}.{names[name]}"), name)

    return sorted(names), __getattr__
