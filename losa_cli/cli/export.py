"""``losa export``: merged safetensors and, with ``--onnx``, verified ONNX graphs (and their int8 copies)."""

from __future__ import annotations

from typing import Annotated

import typer

from ..export import ExportConfig
from . import render
from .application import ForceOpt, JsonOpt, RemoteCodeOpt, app, execute, handled


@app.command()
@handled
def export(
    model: Annotated[str, typer.Argument(help="Model folder to export (pruned or recovered).")],
    out: Annotated[str, typer.Option("--out", "-o", help="Folder to write the model (and onnx/) to.")],
    onnx: Annotated[
        bool, typer.Option("--onnx", help="Also export ONNX prefill and KV-cache decode graphs, verified.")
    ] = False,
    int8: Annotated[
        bool, typer.Option("--int8", help="With --onnx: also int8-weight graphs in onnx-int8/ (ONNX Runtime form).")
    ] = False,
    safetensors: Annotated[
        bool,
        typer.Option(
            "--safetensors/--no-safetensors",
            help="Write the model's safetensors (--no-safetensors with --onnx: graphs, config and tokenizer only).",
        ),
    ] = True,
    batch: Annotated[int | None, typer.Option(help="Fix the ONNX batch size (default: dynamic).")] = None,
    seqlen: Annotated[int | None, typer.Option(help="Fix the ONNX prompt length (default: dynamic).")] = None,
    opset: Annotated[int, typer.Option(help="ONNX opset; DeepSparse 1.8 needs 17 or lower.")] = ExportConfig.opset,
    decode: Annotated[
        bool, typer.Option("--decode/--no-decode", help="Export the KV-cache decode graph.")
    ] = ExportConfig.decode,
    tolerance: Annotated[
        float, typer.Option(help="Max |ONNX - PyTorch| logits, relative to max |logits|.")
    ] = ExportConfig.tolerance,
    force: ForceOpt = False,
    trust_remote_code: RemoteCodeOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Save safetensors and, with --onnx, export and verify ONNX graphs."""
    from ..export import run_export

    config = ExportConfig(
        model=model,
        out=out,
        onnx=onnx,
        int8=int8,
        safetensors=safetensors,
        batch=batch,
        seqlen=seqlen,
        opset=opset,
        decode=decode,
        tolerance=tolerance,
        force=force,
        trust_remote_code=trust_remote_code,
    )
    result = execute(run_export, config, as_json)
    if result is not None:
        render.export(result)
