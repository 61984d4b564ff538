"""Export: merged safetensors, ONNX prefill and decode graphs (verified through ``runtime``'s ONNX Runtime
sessions), their int8 copies, and the graphs a bench needs made first.  Imports ``core`` and ``runtime``."""

from ..core.faces import public_face

__all__, __getattr__ = public_face(__name__, {
    "ExportConfig": "config", "ExportResult": "workflow", "run_export": "workflow",
    "export_graphs": "onnx_graphs", "verify_export": "verify", "quantize_graph": "int8",
    "bench_graphs": "bench_inputs",
})
