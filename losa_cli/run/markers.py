"""How ``losa run`` knows a stage is done: a marker in its folder holding the hash of its settings and inputs.

A stage's settings hash = sha256 of its resolved settings + the fingerprints of its inputs (the parent
stage's manifest hash, or the input model's files) + the sizes and times of its data files.  A stage
whose folder holds a marker with the same hash, and a manifest whose hash matches the marker's, is
skipped; anything else is redone.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..core.config import to_dict
from ..core.manifest import manifest_hash, read_manifest
from .plan import StagePlan

STAGE_MARKER = "losa_run_stage.json"
#: settings that do not change what a stage produces, or that the inputs' fingerprints already cover
HASH_FREE = ("out", "force", "resume", "model", "dense_baseline", "report")
DATA_KEYS = ("calib", "data", "per_layer")


def _stamp(path: Path) -> list:
    """Names, sizes and modification times of a file or a folder's files: cheap change detection."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())[:2000]
    return [[str(p.relative_to(path)) if p != path else p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def input_fingerprint(spec: str) -> dict:
    """The input model: its manifest's hash when it has one, else its files' sizes and times, else its id."""
    from ..core.modeling import resolve_source

    source = resolve_source(spec)
    if not source.is_local:
        return {"hub": spec}
    folder = Path(source.location)
    manifest = read_manifest(folder)
    if manifest is not None:
        return {"manifest": manifest_hash(manifest)}
    if source.gguf_file:
        return {"files": _stamp(folder / source.gguf_file)}
    return {"files": [s for s in _stamp(folder) if "/" not in s[0]]}


def _data_stamps(config: Any) -> dict:
    stamps = {}
    settings = to_dict(config)
    values = {**settings, **settings.get("calibration", {})}
    for key in DATA_KEYS:
        value = values.get(key)
        if isinstance(value, str) and value and Path(value).expanduser().exists():
            stamps[key] = _stamp(Path(value).expanduser())
    return stamps


def stage_hash(plan: StagePlan, fingerprints: dict[str, dict]) -> str:
    settings = {k: v for k, v in to_dict(plan.config).items() if k not in HASH_FREE}
    payload = {
        "stage": plan.name,
        "settings": settings,
        "data": _data_stamps(plan.config),
        "inputs": [fingerprints[p] for p in plan.parents],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def completed_marker(folder: Path, settings_sha256: str) -> dict | None:
    """The stage's marker when the folder is complete and made by these settings and inputs."""
    marker = read_json(folder / STAGE_MARKER)
    manifest = read_manifest(folder) if folder.is_dir() else None
    if marker is None or manifest is None:
        return None
    if marker.get("settings_sha256") != settings_sha256 or marker.get("manifest_sha256") != manifest_hash(manifest):
        return None
    return marker


def stage_marker(name: str, settings_sha256: str, manifest: dict, wall_time_s: float, status: str) -> dict:
    return {
        "stage": name,
        "settings_sha256": settings_sha256,
        "manifest_sha256": manifest_hash(manifest),
        "status": status,
        "wall_time_s": wall_time_s,
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def write_json(path: Path, data: dict) -> None:
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_text(json.dumps(data, indent=2, default=str) + "\n")
    staging.replace(path)
