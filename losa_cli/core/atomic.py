"""Atomic output folders: write into a temporary sibling, then rename (standard library only).

A crash or Ctrl-C leaves no half-written output: the temporary folder is removed and the
destination is either absent or the previous complete one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import OutputExistsError


def check_output(path: str | Path, force: bool, inputs: tuple[str | Path, ...] = ()) -> Path:
    """Refuse an existing output without ``force``, and an output that is one of the inputs."""
    out = Path(path).expanduser().resolve()
    for given in inputs:
        source = Path(given).expanduser()
        if source.exists() and (out == source.resolve() or source.resolve().is_relative_to(out)):
            raise OutputExistsError(f"--out {path} would overwrite the input {given}; choose another folder")
    if out.exists() and not force:
        raise OutputExistsError(f"output {path} already exists; pass --force to replace it or choose another --out")
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"output {path} exists and is not a folder; remove it or choose another --out")
    return out


@contextmanager
def atomic_folder(path: Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it replaces ``path`` in one rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp makes it private; the output should not be
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = path.parent / f".{path.name}.old-{staging.name.rsplit('-', 1)[-1]}"
        path.rename(old)
    staging.rename(path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
