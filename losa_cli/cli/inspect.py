"""``losa inspect``: per-block sparsity (and rates, ranks, similarity, lineage from the manifest) of any model."""

from __future__ import annotations

from typing import Annotated

import typer

from . import render
from .application import JsonOpt, RemoteCodeOpt, app, emit_json, handled


@app.command()
@handled
def inspect(
    model: Annotated[str, typer.Argument(help="Model folder (pruned or not), .gguf file, or smollm2-135m.")],
    plot: Annotated[str | None, typer.Option(help="Write a PNG: per-block bars and the RMI heatmap.")] = None,
    force: Annotated[bool, typer.Option(help="Replace an existing --plot file.")] = False,
    trust_remote_code: RemoteCodeOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Per-block sparsity (and rates, ranks, similarity, lineage from the manifest) of any model."""
    from ..run import run_inspect

    result = run_inspect(model, plot, force, trust_remote_code)
    if as_json:
        emit_json(result.to_dict())
    else:
        render.inspect(result, model)
