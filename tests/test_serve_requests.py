"""``losa serve`` refusing what it should: bad requests (OpenAI's error object over raw HTTP, so the exact status
and body are checked), a body over ``--max-body-bytes`` (413 before the body is read whole), bad settings.

The server and helpers are ``serve_helpers``'s; every test runs under its hard deadline.
"""

from __future__ import annotations

import socket

import pytest
from serve_helpers import (  # noqa: F401 - fixtures
    GOOD,
    MAX_BODY,
    MAX_PROMPT,
    client,
    completion_request,
    deadline_fixture,
    folder_fixture,
    openai,
    post,
    read_response,
    send_raw,
    server_fixture,
)
from typer.testing import CliRunner

from losa_cli.cli import app
from losa_cli.core.errors import ConfigError
from losa_cli.runtime import ServeConfig

# ---- bad requests ----------------------------------------------------------------------------------------------

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


# ---- the body limit --------------------------------------------------------------------------------------------


def too_large(status: int, answer: dict) -> bool:
    error = answer["error"]
    return status == 413 and error["code"] == "request_too_large" and "--max-body-bytes" in error["message"]


def test_a_declared_body_over_the_limit_is_refused_unread(server):
    """A Content-Length over the limit gets its 413 before a byte of the body is sent (an unlimited server waits
    for the gigabyte, and the read times out)."""
    head = b"POST /v1/completions HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: %d" % 10**9
    with send_raw(server, head, b'{"model": ') as sock:
        assert too_large(*read_response(sock))


def test_a_chunked_body_is_counted_as_it_arrives(server):
    """A chunked body is refused as soon as it passes the limit, though its last chunk never comes."""
    head = b"POST /v1/completions HTTP/1.1\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked"
    chunk = b"400\r\n" + b" " * 0x400 + b"\r\n"
    with send_raw(server, head, b"1\r\n{\r\n" + chunk * (MAX_BODY // 0x400 + 1)) as sock:
        assert too_large(*read_response(sock))


def test_a_body_at_the_limit_is_served(server):
    body = {**GOOD, "model": server.name, "temperature": 0, "user": ""}
    size = len(completion_request(body)[1])
    body["user"] = "u" * (MAX_BODY - size)
    head, data = completion_request(body)
    assert len(data) == MAX_BODY
    with send_raw(server, head, data) as sock:
        status, answer = read_response(sock)
    assert status == 200 and answer["usage"]["completion_tokens"] >= 1
    body["user"] += "u"
    assert too_large(*post(server, "/v1/completions", body))
    with pytest.raises(openai.APIStatusError, match="max-body-bytes") as caught:  # what a client sees
        client(server).completions.create(model=server.name, prompt="x" * MAX_BODY, max_tokens=1)
    assert caught.value.status_code == 413


# ---- configuration ---------------------------------------------------------------------------------------------


def test_config_collects_every_problem():
    with pytest.raises(ConfigError) as caught:
        ServeConfig(model="m", port=70000, kernel="int4", max_queue=-1, max_tokens=0, max_body_bytes=0)
    message = str(caught.value)
    for option in ("--port", "--kernel", "--max-queue", "--max-tokens", "--max-body-bytes"):
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
