"""``losa serve``: a live server on a tiny Llama (packed fp32 kernel), bound to 127.0.0.1 on a free port.

The official ``openai`` client sends completions and chats, plain and streamed; the text must be the
tokens transformers' own greedy ``generate`` gives for the same prompt on the same folder (an independent
reference: ``Decoder.generate`` shares ``Decoder.stream`` with the server).  A slowed decode step
(``slow_steps``) makes a generation last seconds where the test needs one to be in flight (a client
leaving mid-stream or while queued, a full queue).  Every test sends a bounded number of requests and
runs under a hard deadline (``serve_helpers.deadline``); the module's server is stopped by its fixture.
Bad requests and the body limit: ``test_serve_requests.py``; the streamed text alone: ``test_serve_text.py``.
"""

from __future__ import annotations

import threading
import time

import pytest
from serve_helpers import (  # noqa: F401 - fixtures
    GOOD,
    PROMPT,
    client,
    completion_request,
    deadline_fixture,
    folder_fixture,
    get,
    openai,
    post,
    reference_fixture,
    send_raw,
    server_fixture,
    slow_steps_fixture,
    wait_for,
)
from typer.testing import CliRunner

from losa_cli.cli import app
from losa_cli.core.errors import ConfigError

# ---- the decoder's token stream ------------------------------------------------------------------------------


def test_stream_is_transformers_greedy_generate(folder, reference):
    """The served decoder's greedy tokens (fp32 kernel) are transformers' own, id for id; its sampling is
    ``generate``'s, for the same seed."""
    from losa_cli.core.modeling import load_model
    from losa_cli.runtime.decode import Decoder

    decoder = Decoder.from_model(load_model(str(folder)).model.eval(), "float32", "float32")
    ids = reference.tokenizer(PROMPT)["input_ids"]
    expected = reference(ids, 40)[0]
    assert len(expected) == 40 and list(decoder.stream(ids, 40)) == expected
    sampled = dict(sample=True, temperature=0.9, top_p=0.8, seed=4)
    assert list(decoder.stream(ids, 12, **sampled)) == decoder.generate(ids, 12, **sampled).tokens
    with pytest.raises(ConfigError, match="exceed"):  # checked when asked for, before any token
        decoder.stream(ids, 10_000)


# ---- completions and chat through the openai client ----------------------------------------------------------


def test_completion_is_transformers_greedy_text(server, reference):
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


# ---- staying up: clients that leave, requests that fail, many at once ------------------------------------------


def test_a_client_leaving_mid_stream_frees_the_worker(server, slow_steps):
    stepped, _ = slow_steps
    before = server.worker.state()
    body = {**GOOD, "model": server.name, "max_tokens": 200, "temperature": 0, "stream": True}
    with send_raw(server, *completion_request(body)) as sock:  # 200 steps of 20 ms: 4 s if never stopped
        seen = b""
        while seen.count(b"data:") < 3:
            seen += sock.recv(4096)
    started = time.monotonic()
    out = client(server).completions.create(model=server.name, prompt="the river", max_tokens=4, temperature=0)
    assert out.usage.completion_tokens >= 1
    assert time.monotonic() - started < 2.0, "the next request waited for the abandoned generation"
    assert len(stepped) < 60  # the abandoned one's steps (~3 before leaving, about one after) and the next one's
    after = server.worker.state()
    assert after["generating"] is False
    counted = {what: after[what] - before[what] for what in ("served", "cancelled", "failed")}
    assert counted == {"served": 1, "cancelled": 1, "failed": 0}  # the abandoned stream was not served


def test_clients_leaving_the_queue_free_their_places(server, slow_steps):
    """Requests whose clients leave while they wait leave the queue at once (not when the worker reaches them):
    new requests take their places while the first still generates; all four count as cancelled."""
    _, delay = slow_steps
    delay[0] = 0.05  # 240 steps: 12 s if the first generation were never stopped
    state, before = server.worker.state, server.worker.state()
    body = {**GOOD, "model": server.name, "max_tokens": 240, "temperature": 0}
    first = send_raw(server, *completion_request({**body, "stream": True}))
    wait_for(lambda: state()["generating"], 10, "the first request generates")
    waiting = [send_raw(server, *completion_request(body)) for _ in range(3)]  # max_queue=3: the queue is full
    wait_for(lambda: state()["waiting"] == 3, 10, "three requests wait")
    assert post(server, "/v1/completions", body)[0] == 503
    for sock in waiting:
        sock.close()
    wait_for(lambda: state()["waiting"] == 0, 5, "the requests whose clients left leave the queue")
    statuses: list[int] = []
    threads = [threading.Thread(target=lambda: statuses.append(post(server, "/v1/completions",
                                                                     {**body, "max_tokens": 2})[0]))
               for _ in range(3)]
    for thread in threads:
        thread.start()
    wait_for(lambda: state()["waiting"] == 3, 10, "three new requests take the freed places")
    assert state()["generating"] and statuses == []  # all while the first still generates
    first.close()
    for thread in threads:
        thread.join(30)
    assert statuses == [200] * 3
    after = state()
    counted = {what: after[what] - before[what] for what in ("served", "cancelled", "failed")}
    assert counted == {"served": 3, "cancelled": 4, "failed": 0}
    assert get(server, "/health")["cancelled"] == after["cancelled"]


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


def test_cli_refuses_limits_beyond_the_context(folder):
    """Were the limits not checked, the CLI would serve in the foreground: the deadline stops it and fails."""
    result = CliRunner().invoke(app, ["serve", str(folder), "--port", "0", "--max-prompt-tokens", "999"])
    assert result.exit_code == 2 and "context of 256 tokens" in result.output
    result = CliRunner().invoke(app, ["serve", str(folder), "--port", "0", "--max-body-bytes", "0"])
    assert result.exit_code == 2 and "--max-body-bytes must be at least 1" in result.output

