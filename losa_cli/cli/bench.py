"""``losa bench --cpu``: latency of a sparse model vs its dense counterpart on ONNX Runtime, DeepSparse and
losa's own kernel.  The graphs the ONNX engines time are made here first (``export.bench_graphs``)."""

from __future__ import annotations

from typing import Annotated

import typer

from ..runtime import BenchConfig
from . import render
from .application import JsonOpt, RemoteCodeOpt, app, execute, handled


@app.command()
@handled
def bench(
    model: Annotated[str, typer.Argument(help="Model folder, losa export folder, or prefill .onnx file.")],
    cpu: Annotated[
        bool, typer.Option("--cpu", help="Benchmark on the CPU (the only target so far, so the default).")
    ] = True,
    dense_baseline: Annotated[
        str | None, typer.Option("--dense-baseline", help="Dense model to compare with (default: densified copy).")
    ] = None,
    engines: Annotated[
        str, typer.Option(help="Comma-separated: onnxruntime,deepsparse,losa (losa: its own sparse kernel in PyTorch).")
    ] = "onnxruntime,deepsparse,losa",
    batch: Annotated[int, typer.Option(help="Sequences per run.")] = BenchConfig.batch,
    seqlen: Annotated[int, typer.Option(help="Prompt tokens (prefill) and past length (decode).")] = BenchConfig.seqlen,
    decode_tokens: Annotated[
        int, typer.Option("--decode-tokens", help="Decode steps per iteration (0: prefill only).")
    ] = BenchConfig.decode_tokens,
    threads: Annotated[int | None, typer.Option(help="Engine threads (default: cores - 1).")] = None,
    warmup: Annotated[int, typer.Option(help="Untimed runs before timing.")] = BenchConfig.warmup,
    iterations: Annotated[int, typer.Option(help="Timed runs.")] = BenchConfig.iterations,
    report: Annotated[str | None, typer.Option(help="Write a PNG bar chart of the latencies.")] = None,
    force: Annotated[bool, typer.Option(help="Replace an existing --report file.")] = False,
    trust_remote_code: RemoteCodeOpt = False,
    precisions: Annotated[
        str,
        typer.Option(
            help="Comma-separated weight precisions: fp32,bf16,int8 (int8 quantized for the run; bf16: losa engine "
            "only)."
        ),
    ] = "fp32",
    data: Annotated[str | None, typer.Option(
        help="Also measure each row's perplexity and top-1 agreement with the fp32 sparse model on this text "
             "(.txt/.jsonl).")] = None,
    data_seqlen: Annotated[int, typer.Option("--data-seqlen", help="--data: tokens per window.")] = 512,
    data_windows: Annotated[int, typer.Option("--data-windows", help="--data: windows.")] = BenchConfig.data_windows,
    compile_models: Annotated[
        bool,
        typer.Option(
            "--compile", help="losa engine: run its models under torch.compile (about a minute per timing to compile)."
        ),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Latency and throughput of a sparse model vs its dense counterpart on CPU engines.

    Decode rows (batch 1) also show the bandwidth ceiling: the bytes a step must read in the
    format the engine uses, over this machine's measured read bandwidth, and the share reached.
    """
    from ..export import bench_graphs
    from ..runtime import run_bench

    config = BenchConfig(
        model=model,
        dense_baseline=dense_baseline,
        engines=engines,
        batch=batch,
        seqlen=seqlen,
        decode_tokens=decode_tokens,
        threads=threads,
        warmup=warmup,
        iterations=iterations,
        report=report,
        force=force,
        trust_remote_code=trust_remote_code,
        precisions=precisions,
        compile=compile_models,
        data=data,
        data_seqlen=data_seqlen,
        data_windows=data_windows,
    )

    def timed(config: BenchConfig, progress):
        with bench_graphs(config, progress) as graphs:
            return run_bench(config, graphs, progress)

    result = execute(timed, config, as_json)
    if result is not None:
        render.bench(result)
