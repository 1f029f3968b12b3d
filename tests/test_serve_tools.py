"""What tools other than a completions client need from `chargpt serve`, with the official `openai` client and raw
HTTP: prompt scoring (echo + logprobs, equal to `chargpt eval`), prompts as token ids, vLLM's tokenizer routes,
chat completions on the dialogue format, OpenAI's penalties, and Prometheus' /metrics."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from chargpt.inference.generate import SampleConfig, generate
from chargpt.serve.chat import parse_speakers, render
from helpers import call_main
from serving import ServerProcess, start_server

MODEL = "tiny"
KEY = "tools-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
SPEAKERS = "user=ROMEO,assistant=JULIET"
TEXT = (
    "ROMEO:\nBut soft, what light through yonder window breaks?\nIt is the east, and Juliet is the sun.\n\n"
    "JULIET:\nO Romeo, Romeo, wherefore art thou Romeo?\n"
)


@pytest.fixture(scope="module")
def server(trained_model_dir: Path) -> Iterator[ServerProcess]:
    flags = ("--threads", "1", "--precision", "fp32", "--quantize", "none", "--api-key", KEY)
    srv = start_server(trained_model_dir, *flags, "--chat-speakers", SPEAKERS)
    yield srv
    srv.kill()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def reference(tiny, prompt: str, **settings) -> str:
    """chargpt.generate's one sample, at one thread in fp32 as the server runs."""
    model, tokenizer = tiny
    torch.set_num_threads(1)
    return generate(model, tokenizer, prompt, SampleConfig(precision="fp32", quantize="none", **settings))[0]


def post(server: ServerProcess, path: str, body: dict, **kwargs) -> httpx.Response:
    return httpx.post(server.url + path, json=body, headers=kwargs.pop("headers", AUTH), timeout=60, **kwargs)


def test_echoed_prompt_logprobs_are_chargpt_evals_loss(
    server: ServerProcess, client: openai.OpenAI, trained_model_dir: Path, tmp_path: Path, capsys
):
    """The scores lm-eval and other tools read: every character of a prompt longer than the model's context,
    scored as `chargpt eval` scores the same text, with the likeliest characters and the offsets."""
    out = client.completions.create(model=MODEL, prompt=TEXT, echo=True, logprobs=3, max_tokens=0)
    choice = out.choices[0]
    assert choice.text == TEXT and choice.finish_reason == "length"
    lp = choice.logprobs
    assert lp.tokens == list(TEXT) and lp.text_offset == list(range(len(TEXT)))
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for token, logprob, top in zip(lp.tokens[1:], lp.token_logprobs[1:], lp.top_logprobs[1:], strict=True):
        assert 3 <= len(top) <= 4 and top[token] == logprob  # the three likeliest, and the character itself
        assert sorted(top.values(), reverse=True)[:3] == list(top.values())[:3] and logprob <= max(top.values())
    path = tmp_path / "text.txt"
    path.write_text(TEXT, encoding="utf-8")
    capsys.readouterr()
    argv = ["eval", "--model", str(trained_model_dir), "--data", str(path), "--device", "cpu", "--threads", "1",
            "--precision", "fp32", "--quantize", "none", "--json", "--quiet"]  # fmt: skip
    rc, stdout, err = call_main(argv, capsys)
    assert rc == 0, err
    loss = __import__("json").loads(stdout)["loss"]
    assert -sum(lp.token_logprobs[1:]) / (len(TEXT) - 1) == pytest.approx(loss, abs=1e-4)


def test_generated_logprobs_are_the_models_and_do_not_depend_on_the_batch(client: openai.OpenAI, tiny):
    """A greedy continuation's logprobs are the model's own log-probabilities of those characters (before
    temperature), and a request's text and logprobs are the same alone and among seven concurrent ones."""
    model, tokenizer = tiny
    request = dict(model=MODEL, prompt="JULIET:\nO", max_tokens=20, temperature=0, logprobs=5)
    alone = client.completions.create(**request).choices[0]
    ids = torch.as_tensor(tokenizer.encode("JULIET:\nO" + alone.text))[None]
    with torch.no_grad():
        logp = torch.log_softmax(model(ids[:, :-1])[0].float(), -1)[0]
    expected = logp.gather(-1, ids[0, 1:, None])[-20:, 0].tolist()
    assert alone.logprobs.token_logprobs == pytest.approx(expected, abs=1e-5)
    assert alone.logprobs.text_offset == list(range(9, 29))  # without echo, after the prompt's 9 characters

    others = [dict(model=MODEL, prompt="ROMEO:\n", max_tokens=60, seed=s, logprobs=2, frequency_penalty=0.5)
              for s in range(6)]  # fmt: skip
    with ThreadPoolExecutor(8) as pool:
        crowd = [pool.submit(client.completions.create, **r) for r in others[:3]]
        together = pool.submit(client.completions.create, **request)
        crowd += [pool.submit(client.completions.create, **r) for r in others[3:]]
        mine = together.result().choices[0]
        crowded = [f.result().choices[0] for f in crowd]
    assert (mine.text, mine.logprobs.token_logprobs, mine.logprobs.top_logprobs) == (
        alone.text, alone.logprobs.token_logprobs, alone.logprobs.top_logprobs,
    )  # fmt: skip
    for r, got in zip(others, crowded, strict=True):
        solo = client.completions.create(**r).choices[0]
        assert (got.text, got.logprobs.token_logprobs) == (solo.text, solo.logprobs.token_logprobs)


def test_token_id_prompts_and_the_tokenizer_routes(server: ServerProcess, client: openai.OpenAI, tiny):
    """vLLM's /tokenize, /detokenize and /tokenizer_info; a prompt as token ids is the prompt as text."""
    ids = post(server, "/tokenize", {"prompt": "ROMEO:\n"}).json()
    assert ids["count"] == 7 and ids["max_model_len"] == 32 and len(ids["tokens"]) == 7
    assert post(server, "/detokenize", {"tokens": ids["tokens"]}).json() == {"prompt": "ROMEO:\n"}
    as_text = client.completions.create(model=MODEL, prompt="ROMEO:\n", max_tokens=30, seed=4)
    as_ids = client.completions.create(model=MODEL, prompt=ids["tokens"], max_tokens=30, seed=4)
    assert as_ids.choices[0].text == as_text.choices[0].text
    both = client.completions.create(model=MODEL, prompt=[ids["tokens"], ids["tokens"][:6]], max_tokens=30, seed=4)
    assert both.choices[0].text == as_text.choices[0].text and len(both.choices) == 2
    echoed = client.completions.create(model=MODEL, prompt=ids["tokens"], max_tokens=0, echo=True)
    assert echoed.choices[0].text == "ROMEO:\n"

    info = httpx.get(server.url + "/tokenizer_info", headers=AUTH).json()
    assert info["eos_token"] == "\n\n" and info["model_max_length"] == 32
    assert list(info["vocab"]) == tiny[1].to_list() and info["vocab_size"] == len(info["vocab"])
    assert all(post(server, "/tokenize", {"prompt": c}).json()["tokens"] == [i] for c, i in info["vocab"].items())


def test_chat_is_the_next_speakers_turn(server: ServerProcess, client: openai.OpenAI, tiny):
    """The openai client's chat, plain and streamed: the reply is the assistant's speaker's turn of the play the
    conversation makes, ended by the blank line that ends a turn; a message's name wins over its role's speaker;
    the Jinja template of /tokenizer_info renders the same text."""
    messages = [
        {"role": "system", "content": "A street in Verona."},
        {"role": "user", "content": "Good morrow, lady."},
        {"role": "assistant", "content": "Good morrow.", "name": "NURSE"},
        {"role": "user", "content": "Where goest thou?"},
    ]
    text = render(messages, parse_speakers(SPEAKERS), add_generation_prompt=True)
    assert text.endswith("NURSE:\nGood morrow.\n\nROMEO:\nWhere goest thou?\n\nJULIET:\n")
    # a seed whose turn ends within 400 characters (the tiny model's turns are long; which seeds end depends on
    # the CPU's kernels): the reply must end there too, with finish_reason stop
    seed, expected = next(
        (s, t) for s in range(16) if len(t := reference(tiny, text, seed=s, max_new_tokens=400, stop=["\n\n"])) < 400
    )
    out = client.chat.completions.create(model=MODEL, messages=messages, seed=seed, max_tokens=400)  # type: ignore[arg-type]
    reply = out.choices[0]
    assert reply.message.role == "assistant" and reply.finish_reason == "stop"
    assert reply.message.content == expected
    assert "\n\n" not in reply.message.content and out.usage.prompt_tokens == len(text)
    chunks = list(
        client.chat.completions.create(model=MODEL, messages=messages, seed=seed, max_tokens=400, stream=True)
    )  # type: ignore[arg-type]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == reply.message.content
    assert chunks[-1].choices[0].finish_reason == "stop" and chunks[-1].object == "chat.completion.chunk"
    short = client.chat.completions.create(model=MODEL, messages=messages, seed=seed, max_completion_tokens=3)  # type: ignore[arg-type]
    assert short.choices[0].finish_reason == "length" and len(short.choices[0].message.content or "") == 3

    from lm_eval.utils import RemoteTokenizer  # lm-eval renders chats itself with the served template

    rendered = RemoteTokenizer(server.url, auth_token=KEY).apply_chat_template(messages)
    ids = post(server, "/tokenize", {"messages": messages}).json()["tokens"]
    assert rendered == text == post(server, "/detokenize", {"tokens": ids}).json()["prompt"]


CHAT_ERRORS = [
    # (request fields, status, param, words in the message)
    ({"messages": []}, 400, "messages", "empty"),
    ({"messages": [{"role": "tool", "content": "x"}]}, 400, "messages.0.role", "'tool' is not supported"),
    ({"messages": [{"role": "user", "content": "€"}]}, 400, "messages.0.content", "'€'"),
    ({"messages": [{"role": "user", "content": "hi", "name": "A:B"}]}, 400, "messages.0.name", "colon"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "text": "x"}]}]}, 400, "messages.0.content",
     "'image_url'"),
    ({"messages": [{"role": "user", "content": 3}]}, 422, "messages.0.content", "a string or a list"),
    ({"messages": [{"role": "user"}]}, 422, "messages", "required"),
    ({"max_tokens": 5, "max_completion_tokens": 6}, 400, "max_completion_tokens", "differ"),
    ({"top_logprobs": 2}, 400, "top_logprobs", "logprobs: true"),
    ({"presence_penalty": 9}, 400, "presence_penalty", "[-2, 2]"),
    ({"tools": []}, 422, "tools", "unrecognized"),
]  # fmt: skip


@pytest.mark.parametrize("fields,status,param,words", CHAT_ERRORS)
def test_bad_chat_requests_name_the_field(server: ServerProcess, fields, status, param, words):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **fields}
    r = post(server, "/v1/chat/completions", body)
    error = r.json()["error"]
    assert (r.status_code, error["param"]) == (status, param), error
    assert words in error["message"]


def test_bad_tokenizer_requests_name_the_field(server: ServerProcess):
    cases = [
        ("/tokenize", {}, 400, "prompt", "either prompt"),
        ("/tokenize", {"prompt": "a", "messages": []}, 400, "prompt", "either prompt"),
        ("/tokenize", {"prompt": "€"}, 400, "prompt", "'€'"),
        ("/detokenize", {"tokens": [0, 99]}, 400, "tokens", "token id 99"),
        ("/detokenize", {"tokens": "abc"}, 422, "tokens", "token ids"),
        ("/detokenize", {"tokens": [1], "model": "gpt-4"}, 404, "model", "does not exist"),
    ]
    for path, body, status, param, words in cases:
        r = post(server, path, body)
        error = r.json()["error"]
        assert (r.status_code, error["param"]) == (status, param), (path, body, error)
        assert words in error["message"], error
    r = httpx.post(server.url + "/tokenize", content=b'{"prompt": "a"}', headers={**AUTH, "content-type": "text/plain"})
    assert r.status_code == 415


def test_penalties_cure_the_greedy_loop_as_generate_does(server: ServerProcess, client: openai.OpenAI, tiny, capsys):
    """A greedy character model loops; OpenAI's frequency and presence penalties break the loop, on the server
    and in `chargpt sample`, with the same text."""
    prompt = "ROMEO:\nI will"
    plain = client.completions.create(model=MODEL, prompt=prompt, max_tokens=200, temperature=0).choices[0].text
    cured = (
        client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=200, temperature=0, frequency_penalty=0.8, presence_penalty=0.4
        )
        .choices[0]
        .text
    )

    def repeated(text: str) -> float:  # the share of 6-character pieces seen before
        grams = [text[i : i + 6] for i in range(len(text) - 5)]
        return 1 - len(set(grams)) / len(grams)

    assert repeated(plain) > 0.5 and repeated(cured) < repeated(plain) - 0.2, (plain, cured)
    assert cured == reference(tiny, prompt, max_new_tokens=200, temperature=0, frequency_penalty=0.8,
                              presence_penalty=0.4)  # fmt: skip
    seeded = dict(max_tokens=80, seed=11, presence_penalty=1.5)
    text = client.completions.create(model=MODEL, prompt=prompt, **seeded).choices[0].text  # type: ignore[arg-type]
    model_dir = server.proc.args[server.proc.args.index("--model") + 1]
    rc, out, err = call_main(
        ["sample", "--model", model_dir, "--prompt", prompt, "--max-new-tokens", "80", "--seed", "11",
         "--presence-penalty", "1.5", "--precision", "fp32", "--quantize", "none", "--threads", "1", "--device",
         "cpu", "--no-stream"], capsys,
    )  # fmt: skip
    assert rc == 0, err
    assert text in out
    rc, out, err = call_main(["sample", "--model", model_dir, "--frequency-penalty", "3"], capsys)
    assert rc == 2 and "frequency_penalty must be a number in [-2, 2]" in err and "Traceback" not in err


def _scrape(server: ServerProcess, headers: dict | None = None) -> dict[str, float]:
    r = httpx.get(server.url + "/metrics", headers=AUTH if headers is None else headers)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "le")
            if "le" not in s.labels:
                samples[s.name + (f"{{{labels}}}" if labels else "")] = s.value
    return samples


def test_metrics_count_what_was_served(server: ServerProcess, client: openai.OpenAI):
    before = _scrape(server)
    for seed in (1, 2):
        client.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=12, seed=seed)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=-1)
    list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                        stream=True))  # fmt: skip
    after = _scrape(server)

    def moved(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert moved("chargpt_requests_total{route=/v1/completions,status=200}") == 2
    assert moved("chargpt_requests_total{route=/v1/completions,status=400}") == 1
    assert moved("chargpt_requests_total{route=/v1/chat/completions,status=200}") == 1
    assert moved("chargpt_generated_characters_total") == 2 * 12 + 5
    assert moved("chargpt_prompt_characters_total") == 2 * 6 + len("ROMEO:\nhi\n\nJULIET:\n")
    assert moved("chargpt_time_to_first_token_seconds_count") == 3
    assert moved("chargpt_batch_size_count") >= 12 and moved("chargpt_time_per_output_token_seconds_count") >= 12
    assert after["chargpt_queue_depth"] == 0 and after["chargpt_running_rows"] == 0


def test_every_new_route_needs_the_key_and_metrics_public_opens_only_metrics(
    server: ServerProcess, trained_model_dir: Path
):
    for method, path in [("GET", "/metrics"), ("GET", "/tokenizer_info"), ("POST", "/tokenize"),
                         ("POST", "/detokenize"), ("POST", "/v1/chat/completions")]:  # fmt: skip
        r = httpx.request(method, server.url + path, json={"prompt": "a"})
        assert r.status_code == 401, (path, r.text)
    assert httpx.get(server.url + "/health").status_code == 200
    srv = start_server(
        trained_model_dir, "--api-key", KEY, "--metrics-public", "--chat-speakers", "assistant=JULIÉT", "--threads", "1"
    )
    try:
        _scrape(srv, headers={})
        assert httpx.post(srv.url + "/tokenize", json={"prompt": "a"}).status_code == 401
        r = post(srv, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})
        error = r.json()["error"]
        assert (
            r.status_code == 400 and error["param"] == "messages" and "--chat-speakers assistant=" in error["message"]
        )
    finally:
        srv.kill()


def test_the_docs_chat_example_runs(server: ServerProcess):
    """docs/serving.md's chat and scoring example, pointed at this server and model."""
    page = (Path(__file__).resolve().parents[1] / "docs" / "serving.md").read_text(encoding="utf-8")
    (code,) = [c for c in (b.split("```")[0] for b in page.split("```python\n")[1:]) if "chat.completions" in c]
    code = code.replace("http://127.0.0.1:8000", server.url).replace('"demo"', repr(MODEL))
    code = code.replace('api_key="unused"', f"api_key={KEY!r}")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    first, rest = r.stdout.split("\n", 1)[0], r.stdout
    assert first and rest.strip().splitlines()[-1].startswith("-")  # a log-likelihood, below 0


def test_scores_line_up_with_the_text_they_score(client: openai.OpenAI):
    """Each choice's logprobs tokens are its text, character for character: with stop strings cut off (their
    characters are not scored), with n samples, streamed with the echoed prompt, and in chat."""
    out = client.completions.create(model=MODEL, prompt="ROMEO:\n", max_tokens=60, n=3, seed=5, stop=["e", "\n\n"],
                                    logprobs=1)  # fmt: skip
    for choice in out.choices:
        assert "".join(choice.logprobs.tokens) == choice.text
        assert choice.logprobs.text_offset == list(range(7, 7 + len(choice.text)))
    chunks = list(client.completions.create(model=MODEL, prompt="JULIET:", max_tokens=30, seed=2, echo=True,
                                            logprobs=2, stream=True, stop=["o"]))  # fmt: skip
    text = "".join(c.choices[0].text for c in chunks)
    tokens = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    offsets = [o for c in chunks if c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset]
    assert text.startswith("JULIET:") and "".join(tokens) == text and offsets == list(range(len(text)))
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Speak."}],
                                          max_tokens=40, seed=1, logprobs=True, top_logprobs=2)  # fmt: skip
    scored = chat.choices[0].logprobs.content
    assert "".join(s.token for s in scored) == chat.choices[0].message.content
    assert all(len(s.top_logprobs) == 2 and s.logprob <= s.top_logprobs[0].logprob for s in scored)
