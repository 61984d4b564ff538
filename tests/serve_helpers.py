"""What the ``losa serve`` tests share: a live server on a tiny Llama, an independent reference, raw HTTP, and a
hard deadline for every test.

The server runs the fp32 kernel so its greedy tokens can be checked against transformers' own
``model.generate(do_sample=False)`` on the same folder, a reference that shares no code with losa's decoder
(int8 values change the tokens, fp32 ones do not on this model).  A test module imports the fixtures it uses
(``*_fixture``, each registered under its short name; ``deadline`` is autouse: importing it arms it for every
test of that module).
"""

from __future__ import annotations

import http.client
import json
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from conftest import tiny_config, tiny_tokenizer
from losa_cli.runtime import ServeConfig, load_server
from losa_cli.runtime.serve import Server

openai = pytest.importorskip("openai")

CHAT_TEMPLATE = ("{% for m in messages %}<{{ m.role }}> {{ m.content }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant> {% endif %}")
PROMPT = "the river and the mountain"
MAX_PROMPT = 64
MAX_BODY = 16 * 1024
#: a good completion request (the model's id is the folder's name)
GOOD = {"model": "tiny-llama", "prompt": "the river", "max_tokens": 4}
#: seconds a test may run before its servers are stopped and it fails; then seconds for it to end on its own
DEADLINE_S, GRACE_S = 90, 10
#: servers started in this session (the module's, and any a test starts): the deadline stops them all
STARTED: list[Server] = []


@pytest.fixture(autouse=True, name="deadline")
def deadline_fixture(monkeypatch):
    """Fail the test after ``DEADLINE_S`` s instead of hanging: stop every server first (a server the CLI runs
    in the foreground then returns, and the test fails once it does), and if the test is still stuck
    ``GRACE_S`` s later, raise in it.  SIGALRM, as pytest-timeout's signal method: it interrupts a blocking
    join, socket read or event loop in the main thread."""
    if threading.current_thread() is not threading.main_thread():  # pragma: no cover - signals need it
        yield
        return
    run = Server.run

    def tracked(self: Server):
        STARTED.append(self)
        return run(self)

    monkeypatch.setattr(Server, "run", tracked)
    expired: list[float] = []

    def alarm(signum: int, frame: object) -> None:
        expired.append(time.monotonic())
        if len(expired) == 1:
            for server in STARTED:
                server._uvicorn.handle_exit(0, None)
            signal.setitimer(signal.ITIMER_REAL, GRACE_S)
            return
        pytest.fail(f"still running {GRACE_S} s after its {DEADLINE_S} s deadline stopped its servers")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, DEADLINE_S)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    if expired:
        pytest.fail(f"the test ran past its {DEADLINE_S} s deadline; its servers were stopped")


@pytest.fixture(scope="module", name="folder")
def folder_fixture(tmp_path_factory) -> Path:
    """A tiny Llama whose tokenizer has a chat template, its weights drawn 10x the usual scale: attention then
    picks positions sharply, so a decoder that attends to the wrong place (a token stepped one position late)
    picks other tokens than transformers does (at the usual 0.02 the attention is near uniform and it does not)."""
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("serve") / "tiny-llama"
    tokenizer = tiny_tokenizer(add_bos=False)
    tokenizer.chat_template = CHAT_TEMPLATE
    config = tiny_config("llama", len(tokenizer))
    config.initializer_range = 0.2
    torch.manual_seed(5)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", name="server")
def server_fixture(folder):
    server = load_server(ServeConfig(model=str(folder), port=0, kernel="fp32", max_prompt_tokens=MAX_PROMPT,
                                     max_queue=3, max_body_bytes=MAX_BODY))
    STARTED.append(server)
    server.start()
    yield server
    server.stop()
    assert not server._thread.is_alive()


@pytest.fixture(scope="module", name="reference")
def reference_fixture(folder):
    """``generate(prompt_ids, n)`` -> (tokens, text): transformers' greedy ``generate`` on the same folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)

    def generate(prompt_ids: list[int], new: int) -> tuple[list[int], str]:
        ids = torch.tensor([prompt_ids])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        tokens = out[0, len(prompt_ids):].tolist()
        return tokens, tokenizer.decode(tokens, skip_special_tokens=True)

    generate.tokenizer = tokenizer
    return generate


@pytest.fixture(name="slow_steps")
def slow_steps_fixture(server, monkeypatch):
    """Each decode step of the served decoder sleeps ``delay[0]`` s first; returns (positions stepped, delay)."""
    decoder, stepped, delay = server.worker.decoder, [], [0.02]
    original = decoder.step

    def slow(token: int, position: int):
        stepped.append(position)
        time.sleep(delay[0])
        return original(token, position)

    monkeypatch.setattr(decoder, "step", slow)
    return stepped, delay


def client(server, **settings) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=30, **settings)


def post(server, path: str, body: dict | bytes, timeout: float = 30) -> tuple[int, dict]:
    """(status, JSON body) of a raw POST."""
    host, port = server.sock.getsockname()[:2]
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("POST", path, body if isinstance(body, bytes) else json.dumps(body),
                     {"Content-Type": "application/json"})
        response = conn.getresponse()
        raw = response.read().decode()
        assert "Traceback" not in raw
        return response.status, json.loads(raw)
    finally:
        conn.close()


def get(server, path: str) -> dict:
    host, port = server.sock.getsockname()[:2]
    conn = http.client.HTTPConnection(host, port, timeout=30)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        assert response.status == 200
        return json.loads(response.read())
    finally:
        conn.close()


def send_raw(server, head: bytes, body: bytes = b"", timeout: float = 10) -> socket.socket:
    """A socket that has sent a request's ``head`` (request line and headers, no blank line) and ``body``."""
    sock = socket.create_connection(server.sock.getsockname()[:2], timeout=timeout)
    sock.sendall(head + b"\r\nHost: x\r\n\r\n" + body)
    return sock


def completion_request(body: dict) -> tuple[bytes, bytes]:
    """(head, body) of a raw POST /v1/completions."""
    data = json.dumps(body).encode()
    return b"POST /v1/completions HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: %d" % len(data), data


def read_response(sock: socket.socket) -> tuple[int, dict]:
    """(status, JSON body) of the response on ``sock``."""
    response = http.client.HTTPResponse(sock)
    response.begin()
    return response.status, json.loads(response.read())


def wait_for(condition: Callable[[], bool], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, f"not within {within} s: {what}"
        time.sleep(0.02)
