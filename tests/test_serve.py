"""`chargpt serve` end to end: the real server in a subprocess with the session's trained tiny model, spoken to
with the official `openai` client (and raw HTTP where a client would refuse to send the request): the same text
as chargpt.generate, streaming, batching across concurrent requests, every bad request, the API key, the queue,
disconnects, signals and bad flags."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch

from chargpt.inference.generate import SampleConfig, generate
from chargpt.machine import precision as prec
from chargpt.serve.app import allowed_hosts, host_name
from helpers import assert_one_line_error, call_main
from serving import ServerProcess, start_server

MODEL = "tiny"  # the model directory's name is the model id


SERVED: dict[str, str] = {"precision": "fp32"}  # and the weights' format the server chose (auto, in its process)


@pytest.fixture(scope="module")
def server(trained_model_dir: Path) -> Iterator[ServerProcess]:
    """The server at one thread in fp32, as the references below compute: what auto would pick for the formats
    and thread count depends on what else the machine runs, and the texts are compared bit for bit."""
    srv = start_server(trained_model_dir, "--threads", "1", "--precision", "fp32")
    SERVED["quantize"] = httpx.get(srv.url + "/v1/models").json()["data"][0]["meta"]["quantize"]
    yield srv
    srv.kill()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def reference(tiny, prompt: str, **settings) -> list[str]:
    """What chargpt.generate returns for the same prompt and settings."""
    model, tokenizer = tiny
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return generate(model, tokenizer, prompt, SampleConfig(**{**SERVED, **settings}))
    finally:
        torch.set_num_threads(threads)


def streamed(client: openai.OpenAI, **request) -> tuple[str, list]:
    chunks = list(client.completions.create(model=MODEL, stream=True, **request))
    return "".join(c.choices[0].text for c in chunks if c.choices), chunks


def test_ready_line_health_and_models(server: ServerProcess, client: openai.OpenAI):
    assert server.banner.count("\n") == 1 and "tiny" in server.banner
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    models = client.models.list().data
    assert [(m.id, m.object, m.owned_by) for m in models] == [(MODEL, "model", "chargpt")]
    assert isinstance(models[0].created, int) and models[0].created > 0
    assert client.models.retrieve(MODEL).id == MODEL
    meta = httpx.get(server.url + "/v1/models").json()["data"][0]["meta"]
    # the banner says the precision chosen and why, as the model card does; what auto chooses is measured in
    # the server's own process (at its own thread count), so it is read back rather than recomputed here
    assert f" in {meta['precision_reason']}" in server.banner
    assert set(meta["precision"]) == {"prefill", "decode"} and set(meta["precision"].values()) <= {"fp32", "bf16"}
    if not prec.cpu_info().native_bf16:
        assert set(meta["precision"].values()) == {"fp32"}


# inside the 32-character window and well past it; greedy, temperature, top-k, top-p; a prompt longer than the window
CASES = [
    dict(prompt="ROMEO:", max_tokens=90, temperature=0.8, seed=3),
    dict(prompt="\n", max_tokens=20, temperature=0.0, seed=0),
    dict(prompt="First Citizen:\nBefore we proceed any further, hear me speak.\n", max_tokens=70, top_p=0.9, seed=11),
    dict(prompt="KING", max_tokens=60, temperature=1.3, top_k=5, seed=2**40),
]


@pytest.mark.parametrize("case", CASES, ids=["temperature", "greedy", "long-prompt-top-p", "top-k"])
def test_completion_equals_generate_and_streaming(client: openai.OpenAI, tiny, case: dict):
    request = dict(case)
    top_k = request.pop("top_k", None)
    extra = {"top_k": top_k} if top_k is not None else None
    expected = reference(
        tiny,
        request["prompt"],
        max_new_tokens=request["max_tokens"],
        temperature=request.get("temperature", 1.0),
        top_k=top_k,
        top_p=request.get("top_p"),
        seed=request["seed"],
    )[0]
    out = client.completions.create(model=MODEL, extra_body=extra, **request)
    assert out.object == "text_completion" and out.model == MODEL and out.id.startswith("cmpl-")
    (choice,) = out.choices
    assert (choice.text, choice.index, choice.finish_reason, choice.logprobs) == (expected, 0, "length", None)
    assert len(expected) == request["max_tokens"]
    assert out.usage is not None
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(request["prompt"]), request["max_tokens"])
    assert out.usage.total_tokens == len(request["prompt"]) + request["max_tokens"]

    joined, chunks = streamed(client, extra_body=extra, **request)
    assert joined == expected
    assert [c.choices[0].finish_reason for c in chunks] == [None] * (len(chunks) - 1) + ["length"]


def test_stream_format_usage_chunk_and_done(server: ServerProcess, client: openai.OpenAI):
    body = {"model": MODEL, "prompt": "ROMEO:", "max_tokens": 12, "seed": 4, "stream": True}
    raw = httpx.post(server.url + "/v1/completions", json={**body, "stream_options": {"include_usage": True}})
    assert raw.headers["content-type"].startswith("text/event-stream")
    events = raw.text.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    data = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-2])
    *text_chunks, usage_chunk = data
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == {
        "prompt_tokens": 6,
        "completion_tokens": 12,
        "total_tokens": 18,
    }
    assert all(c["usage"] is None and c["object"] == "text_completion" for c in text_chunks)
    # the openai client sees the same, with and without the usage chunk
    joined, chunks = streamed(client, prompt="ROMEO:", max_tokens=12, seed=4, stream_options={"include_usage": True})
    assert joined == "".join(c["choices"][0]["text"] for c in text_chunks)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12
    plain = httpx.post(server.url + "/v1/completions", json=body).text
    assert '"usage"' not in plain and plain.endswith("data: [DONE]\n\n")


def test_seed_determinism(client: openai.OpenAI):
    def text(**kw) -> str:
        return client.completions.create(model=MODEL, prompt="\n", max_tokens=80, **kw).choices[0].text

    a = text(seed=7)
    assert a == text(seed=7)
    assert a != text(seed=8)
    assert text() != text()  # no seed: a fresh random one each time


def test_n_samples_and_prompt_lists(client: openai.OpenAI, tiny):
    out = client.completions.create(model=MODEL, prompt="First", max_tokens=40, n=3, seed=5, extra_body={"top_k": 20})
    texts = [c.text for c in out.choices]
    assert [c.index for c in out.choices] == [0, 1, 2] and len(set(texts)) == 3
    # sample i uses seed + i, as generate(num_samples=n) does
    assert texts == [reference(tiny, "First", max_new_tokens=40, top_k=20, seed=5 + i)[0] for i in range(3)]
    assert out.usage is not None and (out.usage.prompt_tokens, out.usage.completion_tokens) == (5, 120)

    two = client.completions.create(model=MODEL, prompt=["First", "KING"], max_tokens=30, n=2, seed=9)
    assert [c.text for c in two.choices] == [
        *reference(tiny, "First", max_new_tokens=30, seed=9, num_samples=1),
        *reference(tiny, "First", max_new_tokens=30, seed=10),
        *reference(tiny, "KING", max_new_tokens=30, seed=9),
        *reference(tiny, "KING", max_new_tokens=30, seed=10),
    ]
    streams = list(
        client.completions.create(
            model=MODEL, prompt="First", max_tokens=40, n=3, seed=5, stream=True, extra_body={"top_k": 20}
        )
    )
    by_index = ["", "", ""]
    for chunk in streams:
        by_index[chunk.choices[0].index] += chunk.choices[0].text
    assert by_index == texts


def test_stop_strings(client: openai.OpenAI, tiny):
    free = reference(tiny, "ROMEO:", max_new_tokens=120, seed=21)[0]
    stop = free[40:42]  # occurs in the text, at the latest at offset 40
    cut = free.index(stop)
    for stops in ([stop], [stop, "QQQ"], stop):
        out = client.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=120, seed=21, stop=stops)
        (choice,) = out.choices
        assert choice.text == free[:cut] and choice.finish_reason == "stop"
        assert choice.text == reference(tiny, "ROMEO:", max_new_tokens=120, seed=21, stop=(stop,))[0]
        assert out.usage is not None and out.usage.completion_tokens == cut + len(stop)  # the cut stop string counts
        joined, chunks = streamed(client, prompt="ROMEO:", max_tokens=120, seed=21, stop=stops)
        assert joined == free[:cut] and chunks[-1].choices[0].finish_reason == "stop"
    zero = client.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=0)
    assert (zero.choices[0].text, zero.choices[0].finish_reason) == ("", "length")


def _error(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


BAD_JSON_BODIES = [
    # (raw body, status, param, words in the message)
    (b'{"prompt": "a", "max_tokens": 5', 400, None, "not valid JSON"),
    (b'{"prompt": "a", "temperature": NaN}', 400, "temperature", "nan"),
    (b'{"prompt": "a", "temperature": Infinity}', 400, "temperature", "inf"),
    (b"[1, 2]", 422, None, "JSON object"),
    (b'{"max_tokens": 5}', 422, "prompt", "required"),
    (b'{"prompt": 5}', 422, "prompt", "string"),
    (b'{"prompt": "a", "max_tokens": "10"}', 422, "max_tokens", "integer"),
    (b'{"prompt": "a", "max_tokens": 2.5}', 422, "max_tokens", "integer"),
    (b'{"prompt": "a", "stream": "yes"}', 422, "stream", "true or false"),
    (b'{"prompt": "a", "temprature": 1}', 422, "temprature", "unrecognized"),
]

BAD_REQUESTS = [
    # (create() arguments, openai error type, status, param, words in the message)
    (dict(model="gpt-4"), openai.NotFoundError, 404, "model", "'gpt-4' does not exist"),
    (dict(prompt="ROMEO: €uro ✓"), openai.BadRequestError, 400, "prompt", "'€', '✓'"),
    (dict(prompt=""), openai.BadRequestError, 400, "prompt", "empty"),
    (dict(temperature=-0.5), openai.BadRequestError, 400, "temperature", ">= 0"),
    (dict(top_p=0), openai.BadRequestError, 400, "top_p", "(0, 1]"),
    (dict(top_p=1.5), openai.BadRequestError, 400, "top_p", "(0, 1]"),
    (dict(n=0), openai.BadRequestError, 400, "n", ">= 1"),
    (dict(n=40), openai.BadRequestError, 400, "n", "--max-batch"),
    (dict(max_tokens=-1), openai.BadRequestError, 400, "max_tokens", ">= 0"),
    (dict(max_tokens=4097), openai.BadRequestError, 400, "max_tokens", "4096"),
    (dict(extra_body={"top_k": 0}), openai.BadRequestError, 400, "top_k", ">= 1"),
    (dict(stop=["a", ""]), openai.BadRequestError, 400, "stop", "empty"),
    (dict(logprobs=6), openai.BadRequestError, 400, "logprobs", "0..5"),
    (dict(frequency_penalty=2.5), openai.BadRequestError, 400, "frequency_penalty", "[-2, 2]"),
    (dict(presence_penalty=-3), openai.BadRequestError, 400, "presence_penalty", "[-2, 2]"),
    (dict(prompt=[1, 2, 65]), openai.BadRequestError, 400, "prompt", "token id 65 is out of range"),
    (dict(prompt=[[1, 2], []]), openai.BadRequestError, 400, "prompt", "empty"),
    (dict(best_of=2), openai.BadRequestError, 400, "best_of", "not supported"),
    (dict(extra_body={"n": "2"}), openai.UnprocessableEntityError, 422, "n", "integer"),
]


def _good(client: openai.OpenAI) -> None:
    out = client.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=5, seed=1)
    assert len(out.choices[0].text) == 5


@pytest.mark.parametrize("body,status,param,words", BAD_JSON_BODIES)
def test_bad_bodies_then_a_good_request(server: ServerProcess, client: openai.OpenAI, body, status, param, words):
    r = httpx.post(server.url + "/v1/completions", content=body, headers={"content-type": "application/json"})
    error = _error(r)
    assert (r.status_code, error["param"], error["type"]) == (status, param, "invalid_request_error")
    assert words.lower() in error["message"].lower()
    _good(client)


@pytest.mark.parametrize("args,kind,status,param,words", BAD_REQUESTS)
def test_bad_requests_then_a_good_request(client: openai.OpenAI, args, kind, status, param, words):
    request = {"model": MODEL, "prompt": "ROMEO:", "max_tokens": 5, **args}
    with pytest.raises(kind) as caught:
        client.completions.create(**request)
    error = _error(caught.value.response)
    assert (caught.value.status_code, error["param"]) == (status, param)
    assert words in error["message"]
    _good(client)


def test_body_too_large_and_unknown_route(server: ServerProcess, client: openai.OpenAI):
    big = json.dumps({"model": MODEL, "prompt": "a" * (1 << 20)}).encode()
    r = httpx.post(server.url + "/v1/completions", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and _error(r)["code"] == "request_too_large"
    _good(client)
    r = httpx.post(server.url + "/v1/embeddings", json={})
    assert r.status_code == 404 and _error(r)["code"] == "not_found"
    with pytest.raises(openai.NotFoundError, match="POST /v1/chat/completions") as caught:  # what the client shows
        client.embeddings.create(model=MODEL, input="ROMEO:")
    assert "GET /metrics" in str(caught.value)
    _good(client)


def test_what_json_can_say_but_a_float_or_a_header_cannot_is_a_4xx(server: ServerProcess, client: openai.OpenAI):
    """A 400-digit integer for a float field, a lone surrogate in `model`, a vanishing temperature: JSON errors
    (or, for the temperature, its greedy limit), never a 500."""
    url = server.url + "/v1/completions"
    for field in ("temperature", "top_p"):
        body = '{"prompt": "ROMEO:", "max_tokens": 3, "' + field + '": 1' + "0" * 400 + "}"
        r = httpx.post(url, content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400 and _error(r)["param"] == field, r.text
    r = httpx.post(url, content='{"prompt": "a", "model": "\\ud800"}', headers={"content-type": "application/json"})
    assert r.status_code == 404 and _error(r)["code"] == "model_not_found", r.text
    greedy = httpx.post(url, json={"prompt": "ROMEO:", "max_tokens": 8, "temperature": 0}).json()
    tiny = httpx.post(url, json={"prompt": "ROMEO:", "max_tokens": 8, "temperature": 1e-45, "seed": 1}).json()
    assert tiny["choices"][0]["text"] == greedy["choices"][0]["text"]
    _good(client)


def test_sixteen_concurrent_streams_equal_their_solo_results(client: openai.OpenAI, tiny):
    """Different settings, seeds, prompts and lengths (most run past the window), all in flight at once."""
    prompts = ["ROMEO:", "\n", "KING HENRY:\nWhat", "First Citizen:\nBefore we proceed any further, hear me"]
    requests = [
        dict(
            prompt=prompts[i % 4],
            max_tokens=24 + 8 * i,
            temperature=[0.0, 0.7, 1.0, 1.4][i % 4],
            top_p=[None, 0.9][i % 2],
            seed=100 + i,
            extra_body={"top_k": [None, 10, 3][i % 3]},
            stop=["\n\n"] if i % 5 == 0 else None,
        )
        for i in range(16)
    ]
    solo = [streamed(client, **r)[0] for r in requests]
    barrier = threading.Barrier(16)

    def run(r: dict) -> tuple[str, float, float]:
        barrier.wait()
        first = last = 0.0
        text = ""
        for chunk in client.completions.create(model=MODEL, stream=True, **r):
            last = time.monotonic()
            first = first or last
            text += chunk.choices[0].text
        return text, first, last

    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(run, requests))
    assert [t for t, _, _ in together] == solo
    # ...and equal to chargpt.generate
    for r, text in zip(requests, solo, strict=True):
        top_k = r["extra_body"]["top_k"]
        stop = tuple(r["stop"] or ())
        settings = dict(temperature=r["temperature"], top_k=top_k, top_p=r["top_p"], seed=r["seed"], stop=stop)
        assert text == reference(tiny, r["prompt"], max_new_tokens=r["max_tokens"], **settings)[0]
    # they really ran together: at one moment most of them were streaming at once
    moments = sorted(first for _, first, _ in together)
    overlap = max(sum(first <= m <= last for _, first, last in together) for m in moments)
    assert overlap >= 8, together


def test_underflowing_sampling_numbers_are_greedy_and_never_fail_another_request(client: openai.OpenAI, tiny):
    """A temperature or top_p that is 0 in float32 (1e-300) is its limit, greedy decoding; sent while another
    client streams, both requests succeed and the stream is unchanged."""
    long = dict(prompt="ROMEO:", max_tokens=400, temperature=0.8, seed=5)
    solo = streamed(client, **long)[0]
    greedy = streamed(client, prompt="KING", max_tokens=30, temperature=0.0)[0]
    started = threading.Event()

    def stream() -> str:
        text = ""
        for chunk in client.completions.create(model=MODEL, stream=True, **long):
            started.set()
            text += chunk.choices[0].text
        return text

    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(stream)
        assert started.wait(60)
        tiny_t = client.completions.create(model=MODEL, prompt="KING", max_tokens=30, temperature=1e-300)
        tiny_p = client.completions.create(model=MODEL, prompt="KING", max_tokens=30, top_p=1e-300, seed=1)
        assert running.result(120) == solo
    assert tiny_t.choices[0].text == greedy and tiny_p.choices[0].text == greedy
    assert reference(tiny, "KING", max_new_tokens=30, temperature=1e-300) == [greedy]


def test_api_key(trained_model_dir: Path):
    srv = start_server(trained_model_dir, "--api-key", "s3cret-key", "--allow-host", "chargpt.test")
    try:
        key = {"Authorization": "Bearer s3cret-key"}
        for host, status in (("chargpt.test:8000", 200), ("evil.example", 421)):  # a Host the user added, one not
            assert httpx.get(srv.url + "/v1/models", headers={**key, "Host": host}).status_code == status, host
        for key in ("wrong", "s3cret-key-and-more", "s3cret-ke"):
            bad = openai.OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0)
            with pytest.raises(openai.AuthenticationError) as caught:
                bad.models.list()
            assert _error(caught.value.response)["code"] == "invalid_api_key"
            with pytest.raises(openai.AuthenticationError):
                bad.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=5)
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": "ROMEO:"})  # no header at all
        assert r.status_code == 401 and _error(r)["type"] == "invalid_request_error"
        assert httpx.get(srv.url + "/health").json() == {"status": "ok"}
        assert "<html" in httpx.get(srv.url + "/").text
        good = openai.OpenAI(base_url=srv.url + "/v1", api_key="s3cret-key", max_retries=0)
        assert good.models.list().data[0].id == MODEL
        _good(good)
        # the OpenAPI schema is published, behind the key like the API it describes
        assert httpx.get(srv.url + "/openapi.json").status_code == 401
        schema = httpx.get(srv.url + "/openapi.json", headers={"Authorization": "Bearer s3cret-key"}).json()
        body = schema["paths"]["/v1/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert {"prompt", "max_tokens", "temperature", "top_k", "stream"} <= set(body["properties"])
        fuzz_with_the_schema(srv.url, "s3cret-key")
    finally:
        srv.kill()


def fuzz_with_the_schema(url: str, key: str) -> None:
    """schemathesis, driven by the published schema: every operation, bounded in examples and time. Whatever it
    sends, the answer is never a 5xx, always JSON where JSON is declared, with a documented status and headers.
    (Its check that every schema-valid request is accepted is left out: the schema cannot say that a prompt's
    characters must be in the model's vocabulary, or that max_tokens is capped by a flag.)"""
    tool = Path(sys.executable).with_name("schemathesis")
    cmd = [str(tool), "run", f"{url}/openapi.json", "-H", f"Authorization: Bearer {key}", "--max-examples", "25",
           "--seed", "1", "--exclude-checks", "positive_data_acceptance", "--generation-database", "none"]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-4000:]
    assert " passed" in r.stdout, r.stdout[-2000:]


def test_queue_full_is_503_and_a_disconnect_frees_the_slot(trained_model_dir: Path):
    """One batch slot and no queue: a second request is refused while the first streams, /health still answers,
    and once the first client disconnects the slot is free again (long before its 100k characters were done)."""
    srv = start_server(trained_model_dir, "--max-batch", "1", "--max-queue", "0", "--max-tokens-limit", "100000")
    url = srv.url + "/v1/completions"
    small = {"prompt": "ROMEO:", "max_tokens": 5}
    try:
        with httpx.Client(timeout=60) as first:
            with first.stream("POST", url, json={"prompt": "ROMEO:", "max_tokens": 100000, "stream": True}) as r:
                lines = r.iter_lines()
                assert next(lines).startswith("data: ")
                busy = httpx.post(url, json=small)
                assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
                assert _error(busy)["code"] == "queue_full"
                started = time.monotonic()
                assert httpx.get(srv.url + "/health").json() == {"status": "ok"}
                assert time.monotonic() - started < 10  # the model's thread does not block the server
        # the first client has gone: its slot frees at the next step
        deadline = time.monotonic() + 30
        while (r := httpx.post(url, json=small)).status_code == 503 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert r.status_code == 200 and len(r.json()["choices"][0]["text"]) == 5
        # a non-streamed request whose client gives up frees its slot too
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url, json={"prompt": "ROMEO:", "max_tokens": 100000}, timeout=0.5)
        deadline = time.monotonic() + 30
        while (r := httpx.post(url, json=small)).status_code == 503 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert r.status_code == 200
    finally:
        srv.kill()


def test_clients_that_vanish_mid_body_leave_no_traceback(trained_model_dir: Path):
    """Twenty clients send half a body and close: the server answers the next request and its log holds no
    traceback (each was ~64 lines, a flood anyone could cause without a key)."""
    srv = start_server(trained_model_dir)
    try:
        port = int(srv.url.rsplit(":", 1)[1])
        for _ in range(20):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                head = "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                sock.sendall((head + "Content-Length: 1000\r\n\r\n" + '{"prompt": "RO').encode())
        time.sleep(1)
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": "ROMEO:", "max_tokens": 5}, timeout=60)
        assert r.status_code == 200
        code, err, _ = srv.stop()
        assert code == 0 and "Traceback" not in err and err.count("\n") <= 3, err
    finally:
        srv.kill()


def test_sigint_and_sigterm_with_requests_in_flight_exit_0_quickly(trained_model_dir: Path):
    servers = {
        sig: start_server(trained_model_dir, "--max-tokens-limit", "100000") for sig in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        readers = []
        for srv in servers.values():
            for _ in range(2):
                stream = httpx.Client(timeout=60).stream(
                    "POST", srv.url + "/v1/completions", json={"prompt": "\n", "max_tokens": 100000, "stream": True}
                )
                response = stream.__enter__()
                lines = response.iter_lines()
                assert next(lines).startswith("data: ")  # in flight
                readers.append((stream, lines))
        for sig, srv in servers.items():
            srv.proc.send_signal(sig)
        sent = time.monotonic()
        for sig, srv in servers.items():
            _, err = srv.proc.communicate(timeout=60)
            assert srv.proc.returncode == 0, (sig, err)
            assert time.monotonic() - sent < 5, sig
            assert "Traceback" not in err, err
        for stream, lines in readers:  # each in-flight stream ended with the shutting-down error, not a hang
            rest = [line for line in lines if line]
            assert "shutting down" in rest[-1], rest[-3:]
            stream.__exit__(None, None, None)
    finally:
        for srv in servers.values():
            srv.kill()


def _busy_port() -> tuple[socket.socket, int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock, sock.getsockname()[1]


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--max-batch", "0"], "--max-batch must be"),
        (["--precision", "fp16"], "invalid choice: 'fp16'"),
        (["--api-key", "key\n"], "--api-key must be printable ASCII"),
    ],
)
def test_bad_settings_are_refused_before_the_model_loads(trained_model_dir: Path, flags, words: str, capsys):
    rc, out, err = call_main(["serve", "--model", str(trained_model_dir), *flags], capsys)
    assert_one_line_error(rc, out, err, words)


def test_bad_flags_are_one_line_and_exit_2(trained_model_dir: Path, tmp_path: Path):
    """In real processes: what needs the model, the network or memory fails in one line too."""
    sock, port = _busy_port()
    base = [sys.executable, "-m", "chargpt", "serve"]
    cases = {
        "does not exist": ["--model", str(tmp_path / "nope"), "--port", "0"],
        "already in use": ["--model", str(trained_model_dir), "--port", str(port)],
        "not an address": ["--model", str(trained_model_dir), "--host", "no-such-host.invalid", "--port", "0"],
        "use a smaller --max-batch": ["--model", str(trained_model_dir), "--max-batch", str(10**9), "--port", "0"],
        "use a smaller --max-tokens-limit": [
            "--model",
            str(trained_model_dir),
            "--max-tokens-limit",
            str(10**12),
            "--port",
            "0",
        ],  # fmt: skip
    }
    try:
        procs = {
            words: subprocess.Popen([*base, *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for words, flags in cases.items()
        }
        for words, proc in procs.items():
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 2, (words, err)
            assert err.startswith(("chargpt: error:", "chargpt serve: error:")) and words in err, err
            assert len(err.strip().splitlines()) == 1, err
            assert "Traceback" not in err and out == ""
    finally:
        sock.close()


def test_readme_client_example_runs(server: ServerProcess):
    """docs/serving.md's `openai` example, pointed at this server and model."""
    readme = (Path(__file__).resolve().parents[1] / "docs" / "serving.md").read_text(encoding="utf-8")
    codes = [b.split("```")[0] for b in readme.split("```python\n")[1:]]
    (code,) = [c for c in codes if "OpenAI(" in c and "chat" not in c]
    code = code.replace("http://127.0.0.1:8000", server.url).replace('"demo"', repr(MODEL))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == MODEL and "completion_tokens=200" in r.stdout and len(r.stdout) > 400


def test_web_pages_cannot_drive_the_local_server(server: ServerProcess):
    """Any web page the user visits can send requests to 127.0.0.1: a cross-site POST with a body that is not
    declared JSON (no CORS preflight) gets 415, and a request whose Host names another site (DNS rebinding) 421,
    before any work is done; this machine's own names are served."""
    body = json.dumps({"prompt": "ROMEO:", "max_tokens": 2})
    for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
        headers = {"content-type": kind} if kind else {}
        r = httpx.post(server.url + "/v1/completions", content=body, headers=headers)
        assert r.status_code == 415 and _error(r)["code"] == "unsupported_media_type", (kind, r.text)
    port = server.url.rsplit(":", 1)[1]
    for path in ("/", "/v1/models", "/health"):
        for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example", "[::2]"):
            r = httpx.get(server.url + path, headers={"Host": host})
            assert r.status_code == 421 and _error(r)["code"] == "host_not_allowed", (path, host, r.text)
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", "LOCALHOST", f"[::1]:{port}"):
            assert httpx.get(server.url + path, headers={"Host": host}).status_code == 200, (path, host)
    r = httpx.post(
        server.url + "/v1/completions",
        content=body,
        headers={"Host": "evil.example", "content-type": "application/json"},
    )
    assert r.status_code == 421
    r = httpx.post(server.url + "/v1/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text


def test_the_host_names_a_server_answers_to():
    loopback = {"localhost", "127.0.0.1", "::1"}
    assert allowed_hosts("127.0.0.1") == loopback
    assert allowed_hosts("::1", ["My.Box."]) == loopback | {"my.box"}
    assert allowed_hosts("localhost") == loopback
    assert allowed_hosts("192.168.1.5") == {"192.168.1.5"}
    assert allowed_hosts("0.0.0.0") is None and allowed_hosts("::") is None  # every interface: any name
    assert allowed_hosts("0.0.0.0", ["box.lan"]) == loopback | {"box.lan"}
    assert [host_name(h) for h in ("Example.com:80", "[::1]:8000", "[::1]", "a.b.", "1.2.3.4")] == [
        "example.com",
        "::1",
        "::1",
        "a.b",
        "1.2.3.4",
    ]
