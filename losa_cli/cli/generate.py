"""``losa generate``: continue a prompt (greedy or sampled), the pruned layers on losa's sparse kernel."""

from __future__ import annotations

from typing import Annotated

import typer

from ..core.config import DEFAULT_MODEL
from ..runtime import GenerateConfig
from . import render
from .application import JsonOpt, ModelOpt, RemoteCodeOpt, app, execute, handled


@app.command()
@handled
def generate(
    prompt: Annotated[str, typer.Option(help="The text to continue.")],
    model: ModelOpt = DEFAULT_MODEL,
    max_new_tokens: Annotated[int, typer.Option(
        "--max-new-tokens", help="Tokens to generate.")] = GenerateConfig.max_new_tokens,
    sample: Annotated[bool, typer.Option(
        "--sample", help="Sample (with --temperature, --top-p, --seed) instead of greedy.")] = False,
    temperature: Annotated[float, typer.Option(help="Sampling temperature.")] = GenerateConfig.temperature,
    top_p: Annotated[float, typer.Option(
        "--top-p", help="Nucleus sampling: keep the smallest token set of this probability.")] = GenerateConfig.top_p,
    seed: Annotated[int, typer.Option(help="Seed for sampling.")] = GenerateConfig.seed,
    kernel: Annotated[str, typer.Option(
        help="Block linears on losa's sparse kernel: fp32 | bf16 | int8 values + bitmask, or off (dense PyTorch).")]
    = GenerateConfig.kernel,
    threads: Annotated[int | None, typer.Option(help="CPU threads (default: torch's).")] = None,
    trust_remote_code: RemoteCodeOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Continue a prompt (greedy or sampled, KV cache), the pruned layers on losa's sparse kernel."""
    from ..runtime import run_generate

    config = GenerateConfig(model=model, prompt=prompt, max_new_tokens=max_new_tokens, sample=sample,
                            temperature=temperature, top_p=top_p, seed=seed, kernel=kernel, threads=threads,
                            trust_remote_code=trust_remote_code)
    result = execute(run_generate, config, as_json)
    if result is not None:
        render.generate(result)
