"""``losa serve``: an OpenAI-compatible HTTP server on losa's sparse decode path."""

from __future__ import annotations

import logging
from typing import Annotated

import typer

from ..runtime import ServeConfig
from .application import RemoteCodeOpt, app, handled, line, progress_bars, stderr, warn


@app.command()
@handled
def serve(
    model: Annotated[str, typer.Argument(help="Model folder (or smollm2-135m) to serve.")],
    host: Annotated[str, typer.Option(help="Address to listen on (127.0.0.1: this machine only).")]
    = ServeConfig.host,
    port: Annotated[int, typer.Option(help="Port to listen on (0: any free port).")] = ServeConfig.port,
    kernel: Annotated[str, typer.Option(
        help="Block linears and head on losa's sparse kernel: int8 | bf16 | fp32 values + bitmask, or off (dense).")]
    = ServeConfig.kernel,
    threads: Annotated[int | None, typer.Option(help="CPU threads (default: torch's).")] = None,
    model_name: Annotated[str | None, typer.Option(
        "--model-name", help="The model id clients send (default: the folder's name).")] = None,
    max_prompt_tokens: Annotated[int | None, typer.Option(
        "--max-prompt-tokens", help="Longest prompt in tokens (default and most: the model's context less one).")]
    = None,
    max_tokens: Annotated[int | None, typer.Option(
        "--max-tokens", help="Most new tokens a request may ask for (default: the model's context less one).")]
    = None,
    max_queue: Annotated[int, typer.Option(
        "--max-queue", help="Requests that may wait behind the one generating; more get 503.")]
    = ServeConfig.max_queue,
    max_body_bytes: Annotated[int, typer.Option(
        "--max-body-bytes", help="Largest request body in bytes; a larger one gets 413 unread.")]
    = ServeConfig.max_body_bytes,
    trust_remote_code: RemoteCodeOpt = False,
) -> None:
    """Serve a model over HTTP in OpenAI's API (/v1/completions, /v1/chat/completions, /v1/models, /health);
    requests queue for one generator, streamed or whole."""
    from ..runtime import load_server

    config = ServeConfig(model=model, host=host, port=port, kernel=kernel, threads=threads, model_name=model_name,
                         max_prompt_tokens=max_prompt_tokens, max_tokens=max_tokens, max_queue=max_queue,
                         max_body_bytes=max_body_bytes, trust_remote_code=trust_remote_code)
    with progress_bars() as progress:
        server = load_server(config, progress)
    warn(server.warnings)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")  # request log, stderr
    line(f"serving {server.name} at {server.url}/v1 ({config.kernel} kernel); Ctrl-C stops")
    result = server.run()
    stderr.print(f"stopped: {result.served} requests served, {result.failed} failed, "
                 f"{result.cancelled} cancelled (client left)", highlight=False)
