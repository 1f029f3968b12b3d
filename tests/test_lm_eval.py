"""EleutherAI's lm-evaluation-harness, the real one, against a running `chargpt serve`: `local-completions` with
the server's own tokenizer (vLLM's /tokenizer_info, /tokenize and /detokenize) and `local-chat-completions` with
--apply_chat_template, on the tasks in tests/lm_eval_tasks (their texts written here from the held-out end of
the test corpus; nothing from the network). Each result is checked against what chargpt itself says: the
perplexity task's bits per character against `chargpt eval` on the same passages, the multiple choice against
the model's own log-likelihoods, the generations against chargpt.generate."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from chargpt.inference.generate import SampleConfig, generate
from chargpt.serve.chat import parse_speakers, render
from helpers import call_main
from serving import ServerProcess, start_server

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # the tasks' texts are local files
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TASKS = Path(__file__).parent / "lm_eval_tasks"
KEY = "lm-eval-key"
BLOCK = 32  # the tiny model's context


@pytest.fixture(scope="module")
def server(trained_model_dir: Path) -> Iterator[ServerProcess]:
    srv = start_server(
        trained_model_dir, "--threads", "1", "--precision", "fp32", "--quantize", "none", "--api-key", KEY
    )
    yield srv
    srv.kill()


@pytest.fixture(scope="module")
def held_out(corpus_text: str) -> str:
    """The last tenth of the corpus (the training run's validation text), its lines with letters."""
    return corpus_text[int(len(corpus_text) * 0.9) :]


def task(name: str, data: list[dict[str, Any]], folder: Path) -> dict[str, Any]:
    """A task of tests/lm_eval_tasks with its documents written to a JSON lines file."""
    path = folder / f"{name}.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in data), encoding="utf-8")
    config = yaml.safe_load((TASKS / f"{name}.yaml").read_text(encoding="utf-8"))
    config["dataset_kwargs"] = {"data_files": {"test": str(path)}}
    return config


def run_lm_eval(model: str, model_args: dict[str, Any], tasks: list[dict[str, Any]], **kwargs: Any) -> dict:
    import lm_eval

    os.environ["OPENAI_API_KEY"] = KEY  # lm-eval's completions send it as the bearer token
    return lm_eval.simple_evaluate(
        model=model, model_args=model_args, tasks=tasks, log_samples=True, limit=None, **kwargs
    )  # type: ignore[return-value]


def completions_args(server: ServerProcess) -> dict[str, Any]:
    # max_length: lm-eval keeps one place for a generated token and scores windows of max_length - 2 characters
    # after the one before them: the model's context plus two makes each window one context of the model
    return {
        "model": "tiny", "base_url": f"{server.url}/v1/completions", "tokenizer_backend": "remote",
        "auth_token": KEY, "max_length": BLOCK + 2, "num_concurrent": 1, "max_retries": 1,
    }  # fmt: skip


@pytest.mark.end_to_end
def test_perplexity_multiple_choice_and_generation_through_lm_eval(
    server: ServerProcess, trained_model_dir: Path, held_out: str, tiny, tmp_path: Path, capsys
):
    model, tokenizer = tiny
    # passages of one and two contexts of held-out text: lm-eval scores them in the windows `chargpt eval` uses
    starts = range(1000, 1000 + 6 * 97, 97)
    passages = [held_out[s : s + (BLOCK if i % 2 else 2 * BLOCK)] for i, s in enumerate(starts)]
    lines = [ln for ln in held_out.splitlines() if len(ln) >= 30][:8]
    choice_docs = []
    for i, line in enumerate(lines):  # the true continuation against the same characters reversed and rotated
        context, true = line[:12], line[12:28]
        choices = [true[::-1], true[5:] + true[:5], true]
        choices.insert(0, choices.pop(i % 3)) if i % 2 else None
        choice_docs.append({"context": context, "choices": choices, "label": choices.index(true)})
    # lm-eval keeps a generation's prompt and max_gen_toks (24) within max_length - 1 (33): prompts of 9 characters
    prompts = [held_out[s : s + 9] for s in range(3000, 3000 + 4 * 131, 131)]
    greedy = SampleConfig(max_new_tokens=24, temperature=0, stop=["\n", "\n\n"], precision="fp32", quantize="none")
    torch.set_num_threads(1)
    gen_docs = [{"prompt": p, "target": generate(model, tokenizer, p, greedy)[0]} for p in prompts]

    tasks = [
        task("chargpt_perplexity", [{"text": p} for p in passages], tmp_path),
        task("chargpt_choice", choice_docs, tmp_path),
        task("chargpt_generate", gen_docs, tmp_path),
    ]
    out = run_lm_eval("local-completions", completions_args(server), tasks)
    results = out["results"]

    # bits per character of `chargpt eval` on each passage after the character lm-eval puts before a text
    # (the server's eos_token's first character, a newline), summed over the passages
    nats, chars = 0.0, 0
    for i, passage in enumerate(passages):
        path = tmp_path / f"passage{i}.txt"
        path.write_text("\n" + passage, encoding="utf-8")
        argv = ["eval", "--model", str(trained_model_dir), "--data", str(path), "--device", "cpu", "--threads",
                "1", "--precision", "fp32", "--quantize", "none", "--json", "--quiet"]  # fmt: skip
        capsys.readouterr()
        rc, stdout, err = call_main(argv, capsys)
        assert rc == 0, err
        scored = json.loads(stdout)
        assert scored["chars"] == len(passage)
        nats, chars = nats + scored["loss"] * scored["chars"], chars + scored["chars"]
    bits = results["chargpt_perplexity"]["bits_per_byte,none"]
    assert bits == pytest.approx(nats / chars / math.log(2), abs=1e-4 / math.log(2)), (bits, nats / chars)
    assert 1.0 < bits < 6.0

    # the multiple choice: lm-eval's pick is the choice the model itself finds likeliest
    def loglik(context: str, continuation: str) -> float:
        ids = torch.as_tensor(tokenizer.encode(context + continuation))[None]
        with torch.no_grad():
            logp = torch.log_softmax(model(ids[:, :-1])[0].float(), -1)[0]
        picked = logp.gather(-1, ids[0, 1:, None])[:, 0]
        return float(picked[len(context) - 1 :].sum())

    expected = [
        float(max(range(3), key=lambda j: loglik(d["context"], d["choices"][j])) == d["label"]) for d in choice_docs
    ]
    assert results["chargpt_choice"]["acc,none"] == pytest.approx(sum(expected) / len(expected))
    assert results["chargpt_choice"]["acc,none"] >= 0.75  # real text beats its own characters scrambled
    for sample in out["samples"]["chargpt_choice"]:
        doc = sample["doc"]
        for j, resp in enumerate(sample["filtered_resps"]):
            assert resp[0] == pytest.approx(loglik(doc["context"], doc["choices"][j]), abs=1e-4)

    # greedy generations: the server's text is chargpt.generate's
    got = [(s["doc"]["target"], s["filtered_resps"], s["arguments"]) for s in out["samples"]["chargpt_generate"]]
    assert results["chargpt_generate"]["exact_match,none"] == 1.0, got


@pytest.mark.end_to_end
def test_chat_generation_through_lm_eval(server: ServerProcess, tiny, held_out: str, tmp_path: Path):
    """local-chat-completions with --apply_chat_template: lm-eval sends the prompt as a user's message; the reply
    is the assistant's turn, the same text chargpt.generate writes after the rendered conversation."""
    model, tokenizer = tiny
    prompts = [held_out[s : s + 16] for s in range(5000, 5000 + 3 * 151, 151)]
    speakers = parse_speakers("user=USER")
    greedy = SampleConfig(max_new_tokens=24, temperature=0, stop=["\n", "\n\n"], precision="fp32", quantize="none")
    torch.set_num_threads(1)
    docs = []
    for p in prompts:
        text = render([{"role": "user", "content": p}], speakers, add_generation_prompt=True)
        docs.append({"prompt": p, "target": generate(model, tokenizer, text, greedy)[0]})
    args = {"model": "tiny", "base_url": f"{server.url}/v1/chat/completions", "max_retries": 1}
    out = run_lm_eval(
        "local-chat-completions", args, [task("chargpt_generate", docs, tmp_path)], apply_chat_template=True
    )
    chats = [s["arguments"][0][0] for s in out["samples"]["chargpt_generate"]]  # lm-eval's JsonChatStr each
    sent = [json.loads(c[0])[-1]["content"] for c in chats]
    assert sorted(sent) == sorted(prompts)  # lm-eval sent each prompt as the user's message
    assert out["results"]["chargpt_generate"]["exact_match,none"] == 1.0
