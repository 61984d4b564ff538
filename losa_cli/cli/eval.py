"""``losa eval``: perplexity, multiple-choice accuracy (lm-eval) and the zero fractions of any model."""

from __future__ import annotations

from typing import Annotated

import typer

from ..core.config import DEFAULT_MODEL
from ..runtime import EvalConfig
from . import render
from .application import ENCODING_HELP, JsonOpt, ModelOpt, RemoteCodeOpt, app, execute, handled


@app.command("eval")
@handled
def eval_(
    model: ModelOpt = DEFAULT_MODEL,
    data: Annotated[str | None, typer.Option(help="Evaluation text (.txt/.jsonl/saved dataset, or wikitext2).")] = None,
    encoding: Annotated[str, typer.Option(help=ENCODING_HELP)] = EvalConfig.encoding,
    seqlen: Annotated[
        int, typer.Option(help="Tokens per window (clipped to the model's context).")
    ] = EvalConfig.seqlen,
    max_windows: Annotated[int | None, typer.Option("--max-windows", help="Use at most this many windows.")] = None,
    batch_size: Annotated[
        int, typer.Option("--batch-size", help="Windows (or --tasks choices) per forward pass.")
    ] = EvalConfig.batch_size,
    dtype: Annotated[str, typer.Option(help="float32 | bfloat16 | float16")] = EvalConfig.dtype,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = EvalConfig.device,
    sparsity: Annotated[bool, typer.Option("--sparsity", help="Report per-layer and global zero fractions.")] = False,
    trust_remote_code: RemoteCodeOpt = False,
    tokenizer: Annotated[
        str | None, typer.Option(help="ONNX --model only: tokenizer folder, when none is beside the graphs.")
    ] = None,
    tasks: Annotated[
        str | None,
        typer.Option(
            help="Multiple-choice accuracy through lm-eval: comma-separated task names (hellaswag, arc_easy: from the "
            "Hub) "
            "or local .jsonl files."
        ),
    ] = None,
    num_fewshot: Annotated[
        int, typer.Option("--num-fewshot", help="--tasks: solved examples before each question.")
    ] = EvalConfig.num_fewshot,
    limit: Annotated[int | None, typer.Option(help="--tasks: score only the first N questions of each task.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Perplexity over non-overlapping windows, multiple-choice accuracy (lm-eval), and/or a model's zero fractions.

    --model may also be an ONNX export (folder or .onnx file): its prefill graph then runs on
    ONNX Runtime, so an int8 export is measured on the same windows as the PyTorch model.
    """
    from ..runtime import run_eval

    task_list = None if tasks is None else [name.strip() for name in tasks.split(",")]
    config = EvalConfig(
        model=model,
        data=data,
        seqlen=seqlen,
        max_windows=max_windows,
        dtype=dtype,
        device=device,
        batch_size=batch_size,
        sparsity=sparsity,
        trust_remote_code=trust_remote_code,
        tokenizer=tokenizer,
        tasks=task_list,
        num_fewshot=num_fewshot,
        limit=limit,
        encoding=encoding,
    )
    result = execute(run_eval, config, as_json)
    if result is not None:
        render.evaluation(result)
