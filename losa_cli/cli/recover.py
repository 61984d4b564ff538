"""``losa recover``: LoSA -- prune in stages and fine-tune masked LoRA that keeps every zero; merge at the end.

The settings most runs change are options; every other setting of ``RecoverConfig`` (ranks, the
schedule's shares, batch and length, LoSiA's ratio, ...) is given as ``KEY=VALUE`` or in a YAML file
(``--config``, the same keys as a recipe's ``recover`` section), typed and checked as a recipe's.
Options win over ``KEY=VALUE``, which wins over the file.
"""

from __future__ import annotations

from typing import Annotated

import typer

from ..core.config import DEFAULT_MODEL
from ..core.errors import ConfigError, option
from . import render
from .application import ForceOpt, JsonOpt, ModelOpt, RemoteCodeOpt, app, execute, handled

#: what only an option sets (a recipe's recover section has no such keys: losa run sets them)
OPTION_ONLY = ["model", "out", "force", "trust_remote_code", "seed", "resume"]
#: every setting with an option; the others are KEY=VALUE (or --config)
OPTIONS = {
    *OPTION_ONLY,
    "data",
    "sparsity",
    "method",
    "pattern",
    "loss",
    "allocation",
    "adapter",
    "stages",
    "total_steps",
    "lr",
    "calib",
    "nsamples",
    "seqlen",
    "dtype",
    "device",
    "reconstruct",
}


@app.command()
@handled
def recover(
    out: Annotated[str, typer.Option("--out", "-o", help="Folder for the recovered sparse model (adapters merged).")],
    settings: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="[KEY=VALUE]...",
            help="Any other setting, e.g. rank_max=32 mean_ranks=[6,8,10] batch_size=4 kd_temperature=2 "
            "(docs/commands.md lists them).",
        ),
    ] = None,
    data: Annotated[
        str | None, typer.Option(help="Fine-tuning text: instruction .jsonl (Alpaca fields) or .txt/.jsonl text.")
    ] = None,
    model: ModelOpt = DEFAULT_MODEL,
    config_file: Annotated[
        str | None, typer.Option("--config", help="YAML file of settings (the keys of a recipe's recover section).")
    ] = None,
    sparsity: Annotated[
        float | None, typer.Option(help="Target sparsity reached at the last stage [default: 0.7; N/M with --pattern].")
    ] = None,
    method: Annotated[
        str | None, typer.Option(help="wanda | sparsegpt (pruning at every stage) [default: wanda].")
    ] = None,
    pattern: Annotated[
        str | None, typer.Option(help="N:M, ramped over the stages (2:4: 1:4 then 2:4); ends exactly N:M.")
    ] = None,
    loss: Annotated[
        str | None, typer.Option(help="ce | kd | kd+ce | squarehead (kd* distil the dense input model) [default: ce].")
    ] = None,
    allocation: Annotated[
        str | None, typer.Option(help="Per-block rates each stage: rmi | owl | uniform [default: rmi].")
    ] = None,
    adapter: Annotated[
        str | None,
        typer.Option(
            help="masked-lora (LoSA) | losia (train a gradient-localised core sub-matrix of each weight) | "
            "kept-weights (train every kept weight in place) [default: masked-lora]."
        ),
    ] = None,
    stages: Annotated[
        int | None, typer.Option(help="Prune+fine-tune stages (1 = one-shot + masked LoRA) [default: 5].")
    ] = None,
    total_steps: Annotated[
        int | None, typer.Option("--total-steps", help="Optimizer steps over all stages [default: 1250].")
    ] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate [default: 2e-4].")] = None,
    calib: Annotated[
        str | None,
        typer.Option(
            help="Calibration text for pruning: .txt, .jsonl or saved dataset folder (c4/wikitext2: from the Hub)."
        ),
    ] = None,
    nsamples: Annotated[int | None, typer.Option(help="Calibration windows [default: 128].")] = None,
    seqlen: Annotated[int | None, typer.Option(help="Calibration window length [default: 2048].")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the calibration windows, the data order and the adapters.")] = 0,
    dtype: Annotated[
        str | None, typer.Option(help="Base weights: float32 | bfloat16 | float16 [default: float32].")
    ] = None,
    device: Annotated[
        str | None, typer.Option(help="auto | cpu | cuda (accelerate picks the GPU of each process) [default: auto].")
    ] = None,
    reconstruct: Annotated[
        bool | None,
        typer.Option(
            "--reconstruct/--no-reconstruct",
            help="In every stage, fit each pruned block to its outputs before the stage's pruning (MSE, zeros kept) "
            "before the training steps; reconstruct_steps=... and the other reconstruct_* keys tune it [default: off].",
        ),
    ] = None,
    resume: Annotated[bool, typer.Option(help="Continue from OUT.checkpoint.")] = False,
    force: ForceOpt = False,
    trust_remote_code: RemoteCodeOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """LoSA: prune in stages and fine-tune masked LoRA that keeps every zero; merge at the end."""
    from ..recover import run_recover
    from ..run import section_settings, stage_config

    given = section_settings("recover", config_file, settings or [], flags=OPTION_ONLY)
    options = {
        "data": data,
        "sparsity": sparsity,
        "method": method,
        "pattern": pattern,
        "loss": loss,
        "allocation": allocation,
        "adapter": adapter,
        "stages": stages,
        "total_steps": total_steps,
        "lr": lr,
        "calib": calib,
        "nsamples": nsamples,
        "seqlen": seqlen,
        "dtype": dtype,
        "device": device,
        "reconstruct": reconstruct,
    }
    given.update({name: value for name, value in options.items() if value is not None})
    try:
        config = stage_config(
            "recover",
            given,
            seed,
            model=model,
            out=out,
            resume=resume,
            force=force,
            trust_remote_code=trust_remote_code,
        )
        result = execute(run_recover, config, as_json)
    except ConfigError as exc:  # a setting without an option of its own is named as its KEY
        raise ConfigError(exc.render(name_of=lambda name: option(name) if name in OPTIONS else name)) from None
    if result is not None:
        render.recover(result)
