"""Reading and running models: ONNX graphs and sessions, the CPU engines (ONNX Runtime, DeepSparse,
losa's own kernel), ``losa bench``, ``losa eval`` (perplexity, multiple-choice accuracy), ``losa generate``
and ``losa serve``.  Imports ``core`` only; ``export`` verifies what it writes through this package."""

from ..core.faces import public_face

__all__, __getattr__ = public_face(
    __name__,
    {
        # losa bench
        "BenchConfig": "config",
        "Engine": "config",
        "Precision": "config",
        "BenchGraphs": "graph_sets",
        "GraphSet": "graph_sets",
        "read_graph_set": "graph_sets",
        "BenchResult": "bench",
        "run_bench": "bench",
        "onnx_engines_to_run": "bench_plan",
        "plot_report": "bench",
        # losa eval
        "EvalConfig": "config",
        "EvalResult": "evaluate",
        "run_eval": "evaluate",
        "ZeroShotResult": "zeroshot",
        "resolve_tasks": "zeroshot",  # losa run checks eval.tasks before any stage runs
        "run_zeroshot": "zeroshot",  # a model already in memory (benchmarks score pruned copies without saving)
        # losa generate
        "GenerateConfig": "config",
        "Kernel": "config",
        "GenerateResult": "generate",
        "run_generate": "generate",
        # losa serve
        "ServeConfig": "config",
        "ServeResult": "serve",
        "Server": "serve",
        "load_server": "serve",
        # ONNX reading (export writes, then verifies through these)
        "GraphSpec": "onnx_io",
        "DEFAULT_OPSET": "onnx_io",
        "DEEPSPARSE_MAX_OPSET": "onnx_io",
        "check_onnx_environment": "onnx_io",
        "kv_names": "onnx_io",
        "onnx_greedy": "onnx_io",
        "onnx_matmul_weights": "onnx_io",
        "ort_session": "onnx_io",
        "read_graph_spec": "onnx_io",
        "write_graph_spec": "onnx_io",
        "external_files": "onnx_io",
        "PREFILL_FILE": "onnx_io",
        "DECODE_FILE": "onnx_io",
        "SIDECAR_FILE": "onnx_io",
    },
)
