"""``losa serve``: a live server on a tiny Llama (packed int8), bound to 127.0.0.1 on a free port.

The official ``openai`` client sends completions and chats, plain and streamed; the text must be the
tokens ``Decoder.generate`` gives for the same prompt on a decoder built independently from the same
folder.  Bad requests go over raw HTTP (``http.client``), so the exact status and body are checked.
A slowed decode step (``slow_steps``) makes a generation last seconds where the test needs one to be
in flight (a client leaving mid-stream, a full queue).  Every test sends a bounded number of requests;
the module's server is stopped by its fixture.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import build_tiny_model
from losa_cli.cli import app
from losa_cli.core.errors import ConfigError
from losa_cli.runtime import ServeConfig, load_server

openai = pytest.importorskip("openai")

CHAT_TEMPLATE = ("{% for m in messages %}<{{ m.role }}> {{ m.content }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant> {% endif %}")
PROMPT = "the river and the mountain"
MAX_PROMPT = 64


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A tiny Llama whose tokenizer has a chat template."""
    from transformers import AutoTokenizer

    folder = build_tiny_model(tmp_path_factory.mktemp("serve") / "tiny-llama", "llama", seed=5)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def server(folder):
    server = load_server(ServeConfig(model=str(folder), port=0, kernel="int8", max_prompt_tokens=MAX_PROMPT,
                                     max_queue=3)).start()
    yield server
    server.stop()
    assert not server._thread.is_alive()


@pytest.fixture(scope="module")
def reference(folder):
    """``generate(prompt_ids, n)`` -> (tokens, text) on a decoder of its own (int8 blocks and head, as served)."""
    from losa_cli.core.modeling import load_model
    from losa_cli.runtime.decode import Decoder

    loaded = load_model(str(folder))
    decoder = Decoder.from_model(loaded.model.eval(), "int8", "int8")

    def generate(prompt_ids: list[int], new: int) -> tuple[list[int], str]:
        tokens = decoder.generate(prompt_ids, new).tokens
        return tokens, loaded.tokenizer.decode(tokens, skip_special_tokens=True)

    generate.tokenizer = loaded.tokenizer
    generate.decoder = decoder
    return generate


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


@pytest.fixture
def slow_steps(server, monkeypatch):
    """Each decode step of the served decoder sleeps ``delay[0]`` s first; returns (positions stepped, delay)."""
    decoder, stepped, delay = server.worker.decoder, [], [0.02]
    original = decoder.step

    def slow(token: int, position: int):
        stepped.append(position)
        time.sleep(delay[0])
        return original(token, position)

    monkeypatch.setattr(decoder, "step", slow)
    return stepped, delay


# ---- the decoder's token stream ------------------------------------------------------------------------------


def test_stream_yields_generates_tokens(reference):
    decoder = reference.decoder
    ids = reference.tokenizer(PROMPT)["input_ids"]
    assert list(decoder.stream(ids, 12)) == decoder.generate(ids, 12).tokens
    sampled = dict(sample=True, temperature=0.9, top_p=0.8, seed=4)
    assert list(decoder.stream(ids, 12, **sampled)) == decoder.generate(ids, 12, **sampled).tokens
    with pytest.raises(ConfigError, match="exceed"):  # checked when asked for, before any token
        decoder.stream(ids, 10_000)


# ---- completions and chat through the openai client ----------------------------------------------------------


def test_completion_is_the_decoders_greedy_text(server, reference):
    ids = reference.tokenizer(PROMPT)["input_ids"]
    tokens, text = reference(ids, 12)
    out = client(server).completions.create(model=server.name, prompt=PROMPT, max_tokens=12, temperature=0)
    assert out.choices[0].text == text
    assert out.choices[0].finish_reason == ("stop" if tokens[-1] in server.worker.decoder.eos else "length")
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(ids), len(tokens))
    assert out.usage.total_tokens == len(ids) + len(tokens)
    by_ids = client(server).completions.create(model=server.name, prompt=ids, max_tokens=12, temperature=0)
    assert by_ids.choices[0].text == text


def test_streamed_completion_equals_the_whole_one(server, reference):
    ids = reference.tokenizer(PROMPT)["input_ids"]
    _, text = reference(ids, 20)
    chunks = list(client(server).completions.create(model=server.name, prompt=PROMPT, max_tokens=20, temperature=0,
                                                     stream=True, stream_options={"include_usage": True}))
    pieces = [c.choices[0].text for c in chunks if c.choices]
    assert len([p for p in pieces if p]) > 1 and "".join(pieces) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage.prompt_tokens == len(ids) and not chunks[-1].choices


def test_chat_uses_the_template_plain_and_streamed(server, reference):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": PROMPT}]
    ids = reference.tokenizer(reference.tokenizer.apply_chat_template(messages, tokenize=False,
                                                                      add_generation_prompt=True),
                              add_special_tokens=False)["input_ids"]
    tokens, text = reference(ids, 10)
    chat = client(server).chat.completions
    whole = chat.create(model=server.name, messages=messages, max_tokens=10, temperature=0)
    assert whole.choices[0].message.role == "assistant" and whole.choices[0].message.content == text
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (len(ids), len(tokens))
    chunks = list(chat.create(model=server.name, messages=messages, max_tokens=10, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_seeded_sampling_repeats_and_stop_cuts(server, reference):
    completions = client(server).completions
    sampled = [completions.create(model=server.name, prompt=PROMPT, max_tokens=16, temperature=0.9, top_p=0.9,
                                  seed=7).choices[0].text for _ in range(2)]
    assert sampled[0] == sampled[1]
    _, text = reference(reference.tokenizer(PROMPT)["input_ids"], 16)
    stop = text.strip("\ufffd")[3:5]  # two characters from inside the greedy text
    cut = completions.create(model=server.name, prompt=PROMPT, max_tokens=16, temperature=0, stop=[stop])
    assert cut.choices[0].text == text[:text.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = completions.create(model=server.name, prompt=PROMPT, max_tokens=16, temperature=0, stop=stop,
                                  stream=True)
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text


def test_models_and_health(server):
    models = client(server).models.list()
    assert [m.id for m in models.data] == [server.name]
    health = get(server, "/health")
    assert health["status"] == "ok" and health["model"] == server.name and health["generating"] is False


# ---- bad requests ----------------------------------------------------------------------------------------------

GOOD = {"model": "tiny-llama", "prompt": "the river", "max_tokens": 4}
BAD = {
    "malformed JSON": (b'{"model": "tiny-llama", "prompt": ', 400, None),
    "not an object": (b"[1, 2]", 400, None),
    "unknown model": ({**GOOD, "model": "gpt-4"}, 404, "model"),
    "negative max_tokens": ({**GOOD, "max_tokens": -3}, 400, "max_tokens"),
    "max_tokens as a string": ({**GOOD, "max_tokens": "4"}, 400, "max_tokens"),
    "temperature out of range": ({**GOOD, "temperature": 3.0}, 400, "temperature"),
    "prompt of the wrong type": ({**GOOD, "prompt": {"text": "x"}}, 400, "prompt"),
    "prompt over --max-prompt-tokens": ({**GOOD, "prompt": [5] * (MAX_PROMPT + 1)}, 400, "prompt"),
    "prompt + max_tokens over the context": ({**GOOD, "prompt": [5] * 60, "max_tokens": 250}, 400, "max_tokens"),
    "token id outside the vocabulary": ({**GOOD, "prompt": [5, 10**6]}, 400, "prompt"),
    "two prompts": ({**GOOD, "prompt": ["a", "b"]}, 400, "prompt"),
    "empty prompt": ({**GOOD, "prompt": ""}, 400, "prompt"),
    "unknown field": ({**GOOD, "temprature": 0.5}, 400, "temprature"),
    "unsupported n": ({**GOOD, "n": 3}, 400, "n"),
    "five stop sequences": ({**GOOD, "stop": list("abcde")}, 400, "stop"),
}


@pytest.mark.parametrize("body,status,param", BAD.values(), ids=BAD.keys())
def test_a_bad_request_gets_an_openai_error(server, body, status, param):
    code, answer = post(server, "/v1/completions", body)
    assert code == status
    assert set(answer) == {"error"} and answer["error"]["message"] and answer["error"]["param"] == param


def test_bad_chat_requests(server, monkeypatch):
    base = {"model": server.name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    assert post(server, "/v1/chat/completions", {**base, "messages": []})[0] == 400
    assert post(server, "/v1/chat/completions", {**base, "messages": [{"role": "robot", "content": "x"}]})[0] == 400
    monkeypatch.setattr(server.service.tokenizer, "chat_template", None)
    code, answer = post(server, "/v1/chat/completions", base)
    assert code == 400 and "no chat template" in answer["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="no chat template"):  # what a client sees
        client(server).chat.completions.create(model=server.name, messages=base["messages"], max_tokens=4)


def test_unknown_route_is_a_json_404(server):
    code, answer = post(server, "/v1/embeddings", {"model": server.name, "input": "x"})
    assert code == 404 and "no route" in answer["error"]["message"]


# ---- staying up: clients that leave, requests that fail, many at once ------------------------------------------


def test_a_client_leaving_mid_stream_frees_the_worker(server, slow_steps):
    stepped, _ = slow_steps
    host, port = server.sock.getsockname()[:2]
    body = json.dumps({**GOOD, "model": server.name, "max_tokens": 200, "temperature": 0, "stream": True}).encode()
    with socket.create_connection((host, port), timeout=10) as sock:  # 200 steps of 20 ms: 4 s if never stopped
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body) + body)
        seen = b""
        while seen.count(b"data:") < 3:
            seen += sock.recv(4096)
    started = time.monotonic()
    out = client(server).completions.create(model=server.name, prompt="the river", max_tokens=4, temperature=0)
    assert out.usage.completion_tokens >= 1
    assert time.monotonic() - started < 2.0, "the next request waited for the abandoned generation"
    assert len(stepped) < 60  # the abandoned one's steps (~3 before leaving, about one after) and the next one's
    assert server.worker.state()["generating"] is False


def test_the_server_survives_a_failing_generation(server, monkeypatch):
    before = server.worker.state()

    def boom(token: int, position: int):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(server.worker.decoder, "step", boom)
    code, answer = post(server, "/v1/completions", {**GOOD, "model": server.name})
    assert code == 500 and answer["error"]["message"] == "generation failed: RuntimeError: boom"
    with pytest.raises(openai.APIError, match="boom"):  # mid-stream: one error event
        list(client(server).completions.create(model=server.name, prompt="the river", max_tokens=4, stream=True))
    monkeypatch.undo()
    out = client(server).completions.create(model=server.name, prompt="the river", max_tokens=4, temperature=0)
    assert out.choices[0].finish_reason in ("stop", "length")
    after = server.worker.state()
    assert (after["failed"] - before["failed"], after["served"] - before["served"]) == (2, 1)


def test_concurrent_clients_all_get_their_answer(server, reference):
    ids = reference.tokenizer(PROMPT)["input_ids"]
    _, expected = reference(ids, 8)
    texts: list[str] = []

    def ask(stream: bool) -> None:
        completions = client(server).completions
        for _ in range(2):
            if stream:
                chunks = completions.create(model=server.name, prompt=PROMPT, max_tokens=8, temperature=0,
                                            stream=True)
                texts.append("".join(c.choices[0].text for c in chunks))
            else:
                texts.append(completions.create(model=server.name, prompt=PROMPT, max_tokens=8,
                                                temperature=0).choices[0].text)

    threads = [threading.Thread(target=ask, args=(i % 2 == 0,)) for i in range(4)]  # the queue holds 1 + 3
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert texts == [expected] * 8


def test_a_full_queue_answers_503(server, slow_steps):
    stepped, delay = slow_steps
    delay[0] = 0.1  # 8 steps: ~0.8 s per request, so all six arrive while the first generates
    statuses: list[int] = []

    def ask() -> None:
        statuses.append(post(server, "/v1/completions", {**GOOD, "model": server.name, "max_tokens": 8})[0])

    threads = [threading.Thread(target=ask) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(statuses) == [200] * statuses.count(200) + [503] * statuses.count(503)
    assert statuses.count(200) >= 4 and statuses.count(503) >= 1  # 1 generating + 3 waiting (max_queue=3)


# ---- configuration and the command line ------------------------------------------------------------------------


def test_config_collects_every_problem():
    with pytest.raises(ConfigError) as caught:
        ServeConfig(model="m", port=70000, kernel="int4", max_queue=-1, max_tokens=0)
    message = str(caught.value)
    for option in ("--port", "--kernel", "--max-queue", "--max-tokens"):
        assert option in message


def test_cli_refuses_a_taken_port_before_loading(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(app, ["serve", str(tmp_path / "no-model-here"), "--port", str(port)])
    assert result.exit_code == 2
    assert f"cannot listen on 127.0.0.1:{port}" in result.output and "--port" in result.output
    assert "Traceback" not in result.output


def test_cli_refuses_limits_beyond_the_context(folder):
    result = CliRunner().invoke(app, ["serve", str(folder), "--port", "0", "--max-prompt-tokens", "999"])
    assert result.exit_code == 2 and "context of 256 tokens" in result.output

