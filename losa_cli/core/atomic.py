"""Atomic output folders: write into a temporary sibling, then rename (standard library only).

A crash or Ctrl-C leaves no half-written output: the temporary folder is removed and the
destination is either absent or the previous complete one.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import ConfigError, LosaError, OutputExistsError


def check_output(path: str | Path, force: bool, inputs: tuple[str | Path, ...] = (), option: str = "--out",
                 folder: bool = True) -> Path:
    """Refuse, before any work starts: an output that clashes with an input or cannot be written
    (``output_problem``), and an existing one without ``force`` or of the wrong kind."""
    out = Path(path).expanduser().resolve()
    problem = output_problem(out, inputs, option)
    if problem:
        raise ConfigError(problem)
    refusal = existing_output(out, path, force, option, folder)
    if refusal:
        raise OutputExistsError(refusal)
    return out


def existing_output(
    out: Path, given: str | Path, force: bool, option: str = "--out", folder: bool = True
) -> str | None:
    """Why an existing output may not be replaced (without ``force``, or of the wrong kind); None when it may."""
    if out.exists() and not force:
        return f"output {given} already exists; pass --force to replace it or choose another {option}"
    if out.exists() and out.is_dir() != folder:
        kind = "not a folder" if folder else "a folder"
        return f"output {given} exists and is {kind}; remove it or choose another {option}"
    return None


def output_problem(out: Path, inputs: tuple[str | Path, ...] = (), option: str = "--out") -> str | None:
    """Why ``out`` may not be written (None when it may).

    It must not be an input, hold one, or lie inside an input folder (writing there would change
    the input); and its nearest existing ancestor must be a folder we can create a file in --
    probed with a real temporary file, so the answer holds for root and for /proc alike.
    """
    out = out.expanduser().resolve()
    for given in inputs:
        source = Path(given).expanduser()
        if not source.exists():
            continue
        source = source.resolve()
        if out == source or source.is_relative_to(out) or (source.is_dir() and out.is_relative_to(source)):
            return f"{option} {out} would overwrite the input {given} or write inside it; choose a path outside it"
    ancestor = out.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return f"{option} {out} lies under {ancestor}, which is a file, not a folder; choose another {option}"
    try:
        handle, probe = tempfile.mkstemp(prefix=".losa-write-test-", dir=ancestor)
    except OSError as exc:
        return f"{option} {out} cannot be written ({exc.strerror or exc} in {ancestor}); choose a folder you can write"
    os.close(handle)
    os.unlink(probe)
    return None


#: a write that failed because of the disk, not of losa: full, over a file-size limit (ulimit -f), over quota
DISK_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


class WriteFailed(LosaError):
    """An output could not be written for lack of space (or a size limit); nothing half-written was left."""


def disk_problem(exc: BaseException) -> str | None:
    """Why a write failed when the disk is to blame (None otherwise).  safetensors and torch wrap the
    OSError in their own error types, so their message is searched for the system's text too."""
    if isinstance(exc, OSError) and exc.errno in DISK_ERRNOS:
        return os.strerror(exc.errno)
    return next((os.strerror(code) for code in DISK_ERRNOS if os.strerror(code) in str(exc)), None)


@contextmanager
def disk_errors(path: Path) -> Iterator[None]:
    """A full disk or a file-size limit while writing under ``path`` becomes one line (``WriteFailed``)."""
    try:
        yield
    except Exception as exc:
        if (reason := disk_problem(exc)) is None:
            raise
        raise WriteFailed(f"cannot write {path}: {reason}; nothing half-written was left -- free space (or raise "
                          "the file-size limit) and run again, or choose another --out") from exc


@contextmanager
def atomic_folder(path: Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it replaces ``path`` in one rename.  On any
    failure the temporary folder is removed; a full disk is reported in one line (``disk_errors``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp makes it private; the output should not be
    try:
        with disk_errors(path):
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


def link_identical(source_folder: Path, staging: Path, pattern: str = "*.safetensors") -> list[str]:
    """Replace staged files byte-identical to the same-named file in ``source_folder`` by hard links.

    ``losa export`` of a recovered model writes the very weights the recover stage wrote; linking
    keeps one copy on disk.  Safe because losa never writes a file in place (every output is
    a new file renamed over the old), so neither folder can change the other's file.  Files on
    another file system, or where links are not allowed, stay copies.
    """
    linked = []
    for staged in sorted(staging.glob(pattern)):
        original = source_folder / staged.name
        if not original.is_file() or original.stat().st_size != staged.stat().st_size:
            continue
        if file_sha256(original) != file_sha256(staged):
            continue
        temporary = staged.with_name(staged.name + ".link")
        try:
            os.link(original, temporary)
        except OSError:
            continue
        os.replace(temporary, staged)
        linked.append(staged.name)
    return linked


def file_sha256(path: Path) -> str:
    """A file's SHA-256, read in 1 MiB blocks (files here can be larger than memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
