"""Settings of ``losa export`` (validated when built: ``core/config.py``)."""

from __future__ import annotations

from dataclasses import dataclass

from ..core.config import raise_problems
from ..core.errors import key
from ..runtime import DEFAULT_OPSET

#: the lowest opset whose operators the exporter's graphs use
EXPORT_MIN_OPSET = 14


@dataclass
class ExportConfig:
    """Settings of ``losa export``."""

    model: str = ""
    out: str = ""
    onnx: bool = False
    int8: bool = False
    #: False: graphs only (``losa run``'s dense baseline, whose weights are the input model's)
    safetensors: bool = True
    batch: int | None = None
    seqlen: int | None = None
    opset: int = DEFAULT_OPSET
    decode: bool = True
    tolerance: float = 1e-3
    force: bool = False
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        found = []
        if not self.model:
            found.append("give the model folder to export")
        if not self.out:
            found.append(f"{key('out')} is required: the folder to write the exported model to")
        if self.batch is not None and self.batch < 1:
            found.append(f"{key('batch')} must be at least 1 (or omitted for a dynamic batch), got {self.batch}")
        if self.seqlen is not None and self.seqlen < 1:
            found.append(f"{key('seqlen')} must be at least 1 (or omitted for a dynamic length), got {self.seqlen}")
        if self.opset < EXPORT_MIN_OPSET:
            found.append(f"{key('opset')} must be at least {EXPORT_MIN_OPSET}, got {self.opset}")
        if not 0.0 < self.tolerance < 1.0:
            found.append(f"{key('tolerance')} must be in (0, 1), got {self.tolerance}")
        if not self.safetensors and not self.onnx:
            found.append(f"{key('safetensors')} off leaves nothing to write: add {key('onnx')}")
        if not self.onnx and (self.batch is not None or self.seqlen is not None):
            found.append(f"{key('batch')} and {key('seqlen')} shape the ONNX graphs; add {key('onnx')} or drop them")
        if self.int8 and not self.onnx:
            found.append(f"{key('int8')} quantizes the ONNX graphs; add {key('onnx')}")
        raise_problems(found)
