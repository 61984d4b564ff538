"""``losa_manifest.json``: how an output folder was made (standard library only).

Records the command, inputs, settings, seed, library versions, machine, results and timing,
so that anyone can reproduce or audit a number.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import resource
import sys
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from .errors import ModelError

MANIFEST_NAME = "losa_manifest.json"
TRACKED_PACKAGES = ("losa", "torch", "transformers", "accelerate", "safetensors", "datasets", "numpy", "gguf")


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries that can change a result."""
    versions = {"python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def machine_info() -> dict[str, Any]:
    """CPU, OS and core count of the machine that ran the job, and torch's thread count: a CPU run's
    float sums depend on how many threads split them, and a recovery amplifies that (the same recipe
    and seed gave wiki 75.76 on 1 thread and 78.45 on 2), so a result is reproduced only with it."""
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    torch = sys.modules.get("torch")  # not imported here: this module stays standard library only
    threads = torch.get_num_threads() if torch is not None else None
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": threads, "platform": platform.platform()}


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, in MiB.

    Linux: VmHWM, since ``ru_maxrss`` survives exec and reports a large parent's peak in a child."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 if sys.platform != "darwin" else peak / 2**20


def peak_memory_mib(device) -> float:
    """The peak memory a run used where its tensors lived: the GPU's allocations when ``device`` is
    CUDA, else this process's peak resident memory (one rule for every command)."""
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return peak_rss_mib()


def manifest_hash(manifest: dict) -> str:
    """SHA-256 of a manifest's canonical JSON: how a child names its parent."""
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


def build_manifest(
    command: str, inputs: dict, settings: dict, results: dict, parent_folder: Path | None = None
) -> dict:
    """Assemble a manifest; ``parent_folder`` is the input model's folder, linked by its manifest's hash."""
    parent = read_manifest(parent_folder) if parent_folder is not None else None
    return {
        "losa_manifest_version": 1,
        "command": command,
        "argv": sys.argv,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "inputs": inputs,
        "settings": settings,
        "results": results,
        "versions": library_versions(),
        "machine": machine_info(),
        "parent_manifest": None
        if parent is None
        else {
            "command": parent.get("command"),
            "sha256": manifest_hash(parent),
            "path": str(Path(parent_folder).resolve()),
        },
    }


def write_manifest(folder: Path, manifest: dict) -> Path:
    """Write ``losa_manifest.json`` into ``folder``."""
    path = folder / MANIFEST_NAME
    path.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return path


def lineage(folder: Path) -> list[dict]:
    """The chain of manifests from ``folder`` back through its parents, newest first.

    Stops where a parent folder is gone or its manifest no longer matches the recorded hash.
    """
    chain = []
    manifest = read_manifest(folder)
    while manifest is not None and len(chain) < 100:
        chain.append(manifest)
        parent = manifest.get("parent_manifest")
        if not parent or not parent.get("path"):
            break
        try:
            candidate = read_manifest(Path(parent["path"]))
        except ModelError:
            break
        if candidate is None or manifest_hash(candidate) != parent.get("sha256"):
            break
        manifest = candidate
    return chain


def read_manifest(folder: Path) -> dict | None:
    """The folder's manifest, or None when it has none; a ModelError when it is not a JSON object."""
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # JSON and UTF-8 errors are ValueErrors
        raise ModelError(f"{path} is unreadable ({exc}); repair or delete it") from None
    if not isinstance(manifest, dict):
        raise ModelError(f"{path} is not a losa manifest (a JSON object); repair or delete it")
    return manifest
