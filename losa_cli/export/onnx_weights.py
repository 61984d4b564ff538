"""One weight file shared by an export's prefill and decode graphs.

The two graphs are traced from the same model, so they hold the same weight tensors (under
different initializer names); saved separately, each graph carried a full copy, and an export
took three times the model's size.  Here every initializer of both graphs moves to one external
data file, ``weights.data``, and identical tensors (found by their bytes, not their names) are
stored once and referenced from both graphs by offset, as the ONNX external-data format allows.
ONNX Runtime, DeepSparse and ``onnx.load`` read such graphs unchanged.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from ..runtime import external_files

SHARED_WEIGHTS = "weights.data"
#: offsets are page-aligned so a runtime can memory-map each tensor in place
ALIGNMENT = 4096
#: smaller tensors (shapes, scalars) stay inside the graph, as onnx's own saver does
INLINE_BELOW = 1024


def share_weights(folder: Path, sources: dict[str, Path]) -> dict:
    """Write each graph of ``sources`` (file name in ``folder`` -> where the graph is now, which may be
    that same file, or an exporter's staging copy with its own external data) into ``folder``, reading
    its weights from one deduplicated file.

    Returns what the manifest records: the file, its size, and how many tensors were stored once
    for several references.  The external data files the sources used are removed.
    """
    import onnx
    from onnx import TensorProto

    old_data = {source.parent / file for source in sources.values() for file in external_files(source)}
    protos = {name: onnx.load(str(source), load_external_data=True) for name, source in sources.items()}
    stored: dict[bytes, tuple[int, int]] = {}
    references = 0
    staging = folder / (SHARED_WEIGHTS + ".tmp")
    with open(staging, "wb") as data:
        for proto in protos.values():
            for tensor in proto.graph.initializer:
                raw = tensor.raw_data
                if len(raw) < INLINE_BELOW:
                    continue
                key = hashlib.sha256(raw).digest() + bytes([tensor.data_type])
                if key not in stored:
                    offset = -data.tell() % ALIGNMENT + data.tell()
                    data.seek(offset)
                    data.write(raw)
                    stored[key] = (offset, len(raw))
                references += 1
                offset, length = stored[key]
                tensor.ClearField("raw_data")
                del tensor.external_data[:]
                for field, value in (("location", SHARED_WEIGHTS), ("offset", str(offset)), ("length", str(length))):
                    entry = tensor.external_data.add()
                    entry.key, entry.value = field, value
                tensor.data_location = TensorProto.EXTERNAL
    os.replace(staging, folder / SHARED_WEIGHTS)
    for name, proto in protos.items():
        onnx.save_model(proto, str(folder / name))
    for path in old_data - {folder / SHARED_WEIGHTS}:
        path.unlink(missing_ok=True)
    return {"file": SHARED_WEIGHTS, "bytes": (folder / SHARED_WEIGHTS).stat().st_size, "tensors": len(stored),
            "references": references, "graphs": list(sources)}
