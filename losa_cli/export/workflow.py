"""Workflow of ``losa export``: save safetensors, export and verify ONNX.

load model (fp32) -> count zeros ->
in a staging folder: save safetensors + config + tokenizer, export the prefill/decode ONNX
graphs into ``onnx/`` and verify them against the model (logits, greedy tokens, zeros of every
pruned weight) -> with ``--int8``, int8-weight copies in ``onnx-int8/`` compared with the fp32
graphs -> manifest -> rename into place.  A failed verification writes nothing.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..core.atomic import atomic_folder, check_output, link_identical
from ..core.config import to_dict
from ..core.errors import ConfigError, key
from ..core.manifest import build_manifest, peak_memory_mib, write_manifest
from ..core.modeling import context_length, load_model, save_model, sparsity_report
from ..core.sequential import ProgressFn
from ..runtime import DEEPSPARSE_MAX_OPSET, check_onnx_environment
from .config import ExportConfig
from .int8 import COMPARISON_TEXT, export_int8
from .onnx_graphs import export_graphs
from .verify import GREEDY_STEPS, verify_export, window_not_reached

ONNX_FOLDER = "onnx"
INT8_FOLDER = "onnx-int8"


@dataclass
class ExportResult:
    """What ``losa export`` wrote and how well the ONNX graphs match the model."""

    out: str
    model: str
    global_sparsity: float
    mask_checksum: str
    per_block_sparsity: list[float]
    onnx: dict | None
    onnx_int8: dict | None
    wall_time_s: float
    peak_memory_mib: float
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _onnx_summary(spec, verification, environment: dict) -> dict:
    """The ONNX part of the result and manifest: files, shapes, and the verification numbers."""
    checks = verification.zero_checks
    return {
        "folder": ONNX_FOLDER,
        "graphs": spec.to_dict(),
        "environment": environment,
        "verification": {
            "prefill_max_abs_diff": verification.prefill_max_abs_diff,
            "decode_max_abs_diff": verification.decode_max_abs_diff,
            "logits_max_abs": verification.logits_scale,
            "tolerance": verification.tolerance,
            "greedy_match": verification.greedy_match,
            "greedy_tokens_torch": verification.greedy_tokens_torch,
            "greedy_tokens_onnx": verification.greedy_tokens_onnx,
            "weights_checked": verification.layers_checked,
            "zero_mismatches": verification.zero_mismatches,
            "max_zero_fraction_diff": max(
                (abs(c.model_zeros - c.onnx_zeros) for c in checks if c.onnx_zeros is not None), default=0.0
            ),
            "transposed_weights": sum(c.transposed for c in checks),
        },
    }


def _comparison_ids(tokenizer, config: ExportConfig):
    """COMPARISON_TEXT as token ids fitting the graphs' fixed shapes; None (random ids) when it cannot."""
    import numpy as np

    ids = tokenizer(COMPARISON_TEXT)["input_ids"]
    length = config.seqlen or len(ids)
    if len(ids) < length:
        return None
    return np.array([ids[:length]] * (config.batch or 1), dtype=np.int64)


def _save_weights(loaded, staging: Path, safetensors: bool, progress: ProgressFn | None) -> list[str]:
    """The config and tokenizer always (an ONNX folder is evaluated with them); the safetensors
    unless graphs only were asked for, hard-linked to the input's when byte-identical."""
    if not safetensors:
        loaded.model.config.save_pretrained(staging)
        loaded.tokenizer.save_pretrained(staging)
        return []
    if progress:
        progress("save safetensors", 0, 1)
    save_model(loaded, staging)
    linked = link_identical(Path(loaded.source.location), staging) if loaded.source.is_local else []
    if progress:
        progress("save safetensors", 1, 1)
    return linked


def run_export(config: ExportConfig, progress: ProgressFn | None = None) -> ExportResult:
    """Export a (pruned, possibly recovered) model; see the module docstring for the steps."""
    started = time.perf_counter()
    out = check_output(config.out, config.force, inputs=(config.model,))
    warnings: list[str] = []
    environment = check_onnx_environment(config.opset) if config.onnx else {}
    if config.onnx and config.opset > DEEPSPARSE_MAX_OPSET:
        warnings.append(
            f"opset {config.opset} is above {DEEPSPARSE_MAX_OPSET}: DeepSparse 1.8 will refuse these graphs"
        )
    loaded = load_model(config.model, "float32", config.trust_remote_code)
    context = context_length(loaded.model.config)
    if config.seqlen is not None and context is not None and config.seqlen > context:
        raise ConfigError(f"{key('seqlen')} {config.seqlen} is beyond the model's context of {context} tokens: give "
                          f"at most {context}, or drop {key('seqlen')} for graphs of any length")
    per_layer, per_block, global_sparsity, checksum = sparsity_report(loaded.model)
    onnx_summary = int8_summary = None
    with atomic_folder(out) as staging:
        linked = _save_weights(loaded, staging, config.safetensors, progress)
        if config.onnx:
            spec, export_warnings = export_graphs(
                loaded.model, staging / ONNX_FOLDER, config.batch, config.seqlen, config.opset, config.decode, progress
            )
            warnings += export_warnings
            verification = verify_export(loaded.model, staging / ONNX_FOLDER, spec, config.tolerance, progress=progress)
            unreached = window_not_reached(spec, GREEDY_STEPS)
            if unreached:
                warnings.append(unreached)
            onnx_summary = _onnx_summary(spec, verification, environment)
        if config.int8:
            if progress:
                progress("int8 graphs", 0, 1)
            int8_summary = {
                "folder": INT8_FOLDER,
                **export_int8(staging / ONNX_FOLDER, staging / INT8_FOLDER, _comparison_ids(loaded.tokenizer, config)),
            }
            if progress:
                progress("int8 graphs", 1, 1)
        results = {
            "global_sparsity": global_sparsity,
            "per_block_sparsity": per_block,
            "per_layer_sparsity": per_layer,
            "mask_checksum": checksum,
            "onnx": onnx_summary,
            "onnx_int8": int8_summary,
            "safetensors": "hard link to the input's identical file" if linked else config.safetensors,
            "warnings": warnings,
        }
        parent = Path(loaded.source.location) if loaded.source.is_local else None
        manifest = build_manifest("export", {"model": config.model}, to_dict(config), results, parent_folder=parent)
        manifest["versions"].update({k: v for k, v in environment.items() if k in ("onnx", "onnxruntime")})
        write_manifest(staging, manifest)
    return ExportResult(
        out=str(out),
        model=config.model,
        global_sparsity=global_sparsity,
        mask_checksum=checksum,
        per_block_sparsity=per_block,
        onnx=onnx_summary,
        onnx_int8=int8_summary,
        wall_time_s=time.perf_counter() - started,
        peak_memory_mib=peak_memory_mib("cpu"),
        warnings=warnings,
    )
