"""Workflow of ``losa serve``: a model folder behind an OpenAI-compatible HTTP server.

bind the address (a taken port fails before the model loads) -> load the model -> the lean decoder
with the block linears and head packed per ``--kernel`` (``LOSA_FORMATS``, as ``losa generate``) -> the
limits checked against the model's context -> the worker thread (``worker.py``) and the routes
(``app.py``) -> uvicorn on the bound socket until Ctrl-C or ``Server.stop``.

    server = load_server(ServeConfig(model="out/pruned", port=0)).start()   # tests, benchmarks
    ...  # OpenAI(base_url=server.url + "/v1", api_key="-")
    server.stop()
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import uvicorn

from ...core.errors import ConfigError, ModelError, key
from ...core.modeling import load_model
from ...core.sequential import ProgressFn
from ..config import LOSA_FORMATS, Kernel, Precision, ServeConfig
from .app import Service, build_app
from .worker import Worker

#: seconds uvicorn waits for open connections at shutdown (the worker has cancelled their generations by then)
GRACEFUL_S = 3


@dataclass
class ServeResult:
    """What the server did, once it stopped."""

    model: str
    url: str
    kernel: str
    threads: int
    served: int
    failed: int
    cancelled: int  # requests whose client left before the answer ended (while waiting or generating)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


class Server:
    """A loaded model behind the routes, on a bound socket: ``run`` in the foreground, or ``start``/``stop``."""

    def __init__(self, config: ServeConfig, sock: socket.socket, service: Service, warnings: list[str]) -> None:
        self.config, self.sock, self.service, self.warnings = config, sock, service, warnings
        self.name, self.worker = service.name, service.worker
        host, port = sock.getsockname()[:2]
        self.url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
        settings = uvicorn.Config(build_app(service), log_level="info", timeout_graceful_shutdown=GRACEFUL_S,
                                  log_config=None)
        self._uvicorn = _Uvicorn(settings, self.worker)
        self._thread: threading.Thread | None = None

    def run(self) -> ServeResult:
        """Serve until Ctrl-C (or ``stop`` from another thread); the worker stops with the server."""
        try:
            self._uvicorn.run(sockets=[self.sock])
        except KeyboardInterrupt:  # uvicorn raises the Ctrl-C again once it has shut down: the normal way to stop
            pass
        finally:
            self.worker.close()
            self.sock.close()
        state = self.worker.state()
        return ServeResult(model=self.config.model, url=self.url, kernel=str(self.config.kernel),
                           threads=torch.get_num_threads(), served=state["served"], failed=state["failed"],
                           cancelled=state["cancelled"], warnings=self.warnings)

    def start(self, timeout: float = 30.0) -> Server:
        """``run`` in a background thread; returns once the server answers."""
        self._thread = threading.Thread(target=self.run, name="losa-serve", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._uvicorn.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self._uvicorn.handle_exit(0, None)
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _Uvicorn(uvicorn.Server):
    """uvicorn whose exit (Ctrl-C, ``Server.stop``) first stops the worker, so open streams end at their next
    token instead of running on through the graceful-shutdown wait."""

    def __init__(self, settings: uvicorn.Config, worker: Worker) -> None:
        super().__init__(settings)
        self.worker = worker

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.worker.close(timeout=0)
        super().handle_exit(sig, frame)


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before anything slow: a taken port or a wrong host is a one-line error."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise ConfigError(f"{key('host')} {host}: cannot listen there ({exc.strerror or exc})") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); choose another {key('port')} "
                          f"(0: any free port)") from None
    sock.set_inheritable(True)
    return sock


def load_server(config: ServeConfig, progress: ProgressFn | None = None) -> Server:
    """``losa serve`` up to the point of serving: see the module docstring."""
    from ..decode import Decoder

    sock = bind(config.host, config.port)
    try:
        if config.threads:
            torch.set_num_threads(config.threads)
        if progress:
            progress("load model", 0, 1)
        loaded = load_model(config.model, "float32", config.trust_remote_code)
        blocks, head = (None, None) if config.kernel == Kernel.OFF else LOSA_FORMATS[Precision(config.kernel.value)]
        try:
            decoder = Decoder.from_model(loaded.model.eval(), blocks, head)
        except ModelError as exc:
            raise ModelError(f"{exc}; losa serve runs the lean decoder only") from None
        context = decoder.plan.max_len
        limits = _limits(config, context)
        if progress:
            progress("load model", 1, 1)
        tokenizer = loaded.tokenizer
        worker = Worker(decoder, tokenizer, config.max_queue)
        name = config.model_name or Path(config.model).name
        service = Service(name=name, tokenizer=tokenizer, worker=worker, context=context,
                          vocab=decoder.plan.family.vocab, created=int(time.time()),
                          max_body_bytes=config.max_body_bytes, **limits)
        return Server(config, sock, service, _warnings(config, tokenizer))
    except BaseException:
        sock.close()
        raise


def _limits(config: ServeConfig, context: int) -> dict[str, int]:
    """--max-prompt-tokens and --max-tokens within the model's context (default: all of it but one position)."""
    found = []
    if config.max_prompt_tokens is not None and config.max_prompt_tokens >= context:
        found.append(f"{key('max_prompt_tokens')} {config.max_prompt_tokens} leaves no room to generate within the "
                     f"model's context of {context} tokens; give at most {context - 1}")
    if config.max_tokens is not None and config.max_tokens >= context:
        found.append(f"{key('max_tokens')} {config.max_tokens} leaves no room for a prompt within the model's context "
                     f"of {context} tokens; give at most {context - 1}")
    if found:
        raise ConfigError(found)
    room = context - 1  # a prompt of one token at least, a new token at least
    return {"max_prompt_tokens": config.max_prompt_tokens or room, "max_tokens": config.max_tokens or room}


def _warnings(config: ServeConfig, tokenizer: Any) -> list[str]:
    found = []
    if not getattr(tokenizer, "chat_template", None):
        found.append("the model has no chat template: /v1/chat/completions answers 400; /v1/completions serves")
    try:
        loopback = ipaddress.ip_address(config.host).is_loopback
    except ValueError:
        loopback = config.host == "localhost"
    if not loopback:
        found.append(f"listening on {config.host}: anyone who reaches this address can use the server "
                     "(there is no authentication)")
    return found
