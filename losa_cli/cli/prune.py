"""``losa prune``: one-shot pruning of a model's block linears (Wanda, SparseGPT or magnitude)."""

from __future__ import annotations

from typing import Annotated

import typer

from ..core.config import DEFAULT_MODEL, CalibrationConfig
from ..prune import PruneConfig
from . import render
from .application import ENCODING_HELP, SAMPLING_HELP, ForceOpt, JsonOpt, ModelOpt, RemoteCodeOpt, app, execute, handled


@app.command()
@handled
def prune(
    out: Annotated[str, typer.Option("--out", "-o", help="Folder to write the pruned model to.")],
    model: ModelOpt = DEFAULT_MODEL,
    method: Annotated[str, typer.Option(help="wanda | sparsegpt | magnitude")] = PruneConfig.method,
    sparsity: Annotated[float, typer.Option(help="Unstructured sparsity in [0, 1).")] = PruneConfig.sparsity,
    pattern: Annotated[str | None, typer.Option(help="N:M pattern (zero N of every M inputs), e.g. 2:4.")] = None,
    prune_lm_head: Annotated[
        bool,
        typer.Option(
            "--prune-lm-head",
            help="Also prune the output head at the blocks' mean rate (untied from a tied embedding).",
        ),
    ] = False,
    per_layer: Annotated[
        str | None,
        typer.Option("--per-layer", help="JSON list of per-block rates, or a losa manifest (or its folder) to replay."),
    ] = None,
    allocation: Annotated[str, typer.Option(help="Per-block rates: uniform | rmi | owl.")] = PruneConfig.allocation,
    delta: Annotated[float | None, typer.Option(help="RMI: max deviation from --sparsity (default by band).")] = None,
    beta: Annotated[
        float | None, typer.Option(help="RMI: importance temperature (default 1 Wanda, 100 SparseGPT).")
    ] = None,
    rmi_samples: Annotated[
        int, typer.Option("--rmi-samples", help="RMI: calibration windows used for similarity.")
    ] = PruneConfig.rmi_samples,
    owl_lambda: Annotated[
        float, typer.Option("--owl-lambda", help="OWL: rates span 2 x lambda around --sparsity.")
    ] = PruneConfig.owl_lambda,
    owl_m: Annotated[
        float, typer.Option("--owl-m", help="OWL: outlier threshold, multiple of the mean score.")
    ] = PruneConfig.owl_m,
    calib: Annotated[
        str, typer.Option(help="Calibration text: .txt, .jsonl or saved dataset folder (c4/wikitext2: from the Hub).")
    ] = CalibrationConfig.calib,
    nsamples: Annotated[int, typer.Option(help="Calibration windows.")] = CalibrationConfig.nsamples,
    seqlen: Annotated[
        int, typer.Option(help="Tokens per window (clipped to the model's context).")
    ] = CalibrationConfig.seqlen,
    seed: Annotated[int, typer.Option(help="Seed for sampling the windows.")] = CalibrationConfig.seed,
    sampling: Annotated[str, typer.Option(help=SAMPLING_HELP)] = CalibrationConfig.sampling,
    encoding: Annotated[str, typer.Option(help=ENCODING_HELP)] = CalibrationConfig.encoding,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = PruneConfig.device,
    dtype: Annotated[
        str, typer.Option(help="float32 | bfloat16 | float16 (statistics are fp32 always).")
    ] = PruneConfig.dtype,
    damp: Annotated[float, typer.Option(help="SparseGPT damping, fraction of mean(diag H).")] = PruneConfig.damp,
    blocksize: Annotated[int, typer.Option(help="SparseGPT column block size.")] = PruneConfig.blocksize,
    low_memory: Annotated[
        bool | None,
        typer.Option(
            "--low-memory/--in-memory",
            help="Read one block at a time from the memory-mapped safetensors and write the "
            "output block by block (default: when the model would take over half the free memory).",
        ),
    ] = None,
    activations_on_disk: Annotated[
        bool | None,
        typer.Option(
            "--activations-on-disk/--activations-in-memory",
            help="Keep the calibration windows' hidden states in files "
            "beside --out (default: when they would take over a quarter of the free memory).",
        ),
    ] = None,
    reconstruct: Annotated[
        bool,
        typer.Option(
            "--reconstruct",
            help="Fit each pruned block's kept weights to the dense block's outputs (MSE) before the next "
            "block is calibrated; pruned weights stay zero.",
        ),
    ] = False,
    reconstruct_steps: Annotated[
        int,
        typer.Option("--reconstruct-steps", help="Reconstruction: Adam steps per block (per half with the split)."),
    ] = PruneConfig.reconstruct_steps,
    reconstruct_batch: Annotated[
        int, typer.Option("--reconstruct-batch", help="Reconstruction: calibration windows per step.")
    ] = PruneConfig.reconstruct_batch,
    reconstruct_lr: Annotated[
        float, typer.Option("--reconstruct-lr", help="Reconstruction: Adam learning rate.")
    ] = PruneConfig.reconstruct_lr,
    reconstruct_params: Annotated[
        str,
        typer.Option(
            "--reconstruct-params",
            help="Reconstruction trains: weights (kept weights, masked, with norms and biases) | norms (norms and "
            "biases only).",
        ),
    ] = PruneConfig.reconstruct_params,
    reconstruct_split: Annotated[
        bool,
        typer.Option(
            "--reconstruct-split", help="Reconstruction: fit the attention half's output first, then the MLP half."
        ),
    ] = PruneConfig.reconstruct_split,
    reconstruct_inputs: Annotated[
        str,
        typer.Option(
            "--reconstruct-inputs",
            help="Reconstruction inputs: dense (the dense model's own, one more forward per block) | sparse "
            "(the outputs of the pruned blocks before).",
        ),
    ] = PruneConfig.reconstruct_inputs,
    force: ForceOpt = False,
    trust_remote_code: RemoteCodeOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Prune a model's linear layers block by block (Wanda, SparseGPT or magnitude)."""
    from ..prune import run_prune

    config = PruneConfig(
        model=model,
        out=out,
        method=method,
        sparsity=sparsity,
        pattern=pattern,
        prune_lm_head=prune_lm_head,
        per_layer=per_layer,
        allocation=allocation,
        delta=delta,
        beta=beta,
        rmi_samples=rmi_samples,
        owl_lambda=owl_lambda,
        owl_m=owl_m,
        calibration=CalibrationConfig(
            calib=calib, nsamples=nsamples, seqlen=seqlen, seed=seed, sampling=sampling, encoding=encoding
        ),
        device=device,
        dtype=dtype,
        damp=damp,
        blocksize=blocksize,
        low_memory=low_memory,
        activations_on_disk=activations_on_disk,
        reconstruct=reconstruct,
        reconstruct_steps=reconstruct_steps,
        reconstruct_batch=reconstruct_batch,
        reconstruct_lr=reconstruct_lr,
        reconstruct_params=reconstruct_params,
        reconstruct_split=reconstruct_split,
        reconstruct_inputs=reconstruct_inputs,
        force=force,
        trust_remote_code=trust_remote_code,
    )
    result = execute(run_prune, config, as_json)
    if result is not None:
        render.prune(result)
