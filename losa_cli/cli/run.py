"""``losa run``: prune -> recover -> export -> bench (+ eval) from one recipe; finished stages are skipped."""

from __future__ import annotations

from typing import Annotated

import typer

from ..core.errors import ConfigError
from ..run import RunConfig
from . import render
from .application import JsonOpt, app, execute, handled


@app.command("run")
@handled
def run_command(
    args: Annotated[list[str] | None, typer.Argument(
        metavar="[CONFIG.yaml] [SECTION.KEY=VALUE]...",
        help="A recipe (see examples/; none: the default recipe), then overrides such as recover.total_steps=40 or "
             "prune=null.")] = None,
    out: Annotated[str, typer.Option("--out", "-o", help="Folder for the stages, report.md and PNGs.")] = RunConfig.out,
    restart: Annotated[bool, typer.Option("--restart", help="Redo every stage, even those already finished.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """prune -> recover -> export -> bench (+ eval) from one recipe; finished stages are skipped on re-runs."""
    from ..run import run_pipeline

    files = [a for a in args or [] if "=" not in a]
    if len(files) > 1:
        raise ConfigError(f"give one recipe file, got {', '.join(files)} (overrides are section.key=value)")
    config = RunConfig(recipe=files[0] if files else None, overrides=[a for a in args or [] if "=" in a], out=out,
                       restart=restart)
    result = execute(run_pipeline, config, as_json)
    if result is not None:
        render.run(result)
