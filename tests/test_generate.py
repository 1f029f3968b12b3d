"""Sampling: the KV cache is exact (same tokens, same logits as the no-cache model, inside and past the
window), the controls do what they say, streaming equals batch output, and bad input is one line, exit 2."""

from __future__ import annotations

import pytest
import torch

from chargpt.errors import ChargptError
from chargpt.inference.generate import Decoder, SampleConfig, generate, pick_next, stream, token_stream
from chargpt.model import GPT, KVCache
from helpers import assert_one_line_error, call_main


def _ids(tokenizer, text: str, batch: int = 1) -> torch.Tensor:
    return torch.as_tensor(tokenizer.encode(text))[None, :].expand(batch, -1).contiguous()  # (batch, T)


def _greedy(model, idx: torch.Tensor, n: int, use_cache: bool) -> list[list[int]]:
    steps = token_stream(model, idx, n, temperature=0, use_cache=use_cache)
    return torch.stack(list(steps), dim=1).tolist()  # (B, n)


# prompt lengths: 1, shorter than block_size (32), exactly block_size, longer than block_size
@pytest.mark.parametrize("prompt_len", [1, 9, 32, 50])
def test_greedy_with_cache_equals_without(tiny, corpus_text, prompt_len):
    model, tokenizer = tiny
    idx = _ids(tokenizer, corpus_text[1000 : 1000 + prompt_len])
    n = 70  # runs well past block_size whatever the prompt
    assert _greedy(model, idx, n, use_cache=True) == _greedy(model, idx, n, use_cache=False)


def test_greedy_with_cache_equals_without_batched(tiny, corpus_text):
    model, tokenizer = tiny
    idx = torch.stack([_ids(tokenizer, corpus_text[i : i + 12])[0] for i in (0, 500, 2000)])  # (3, 12)
    cached = _greedy(model, idx, 60, use_cache=True)
    assert cached == _greedy(model, idx, 60, use_cache=False)
    assert len({tuple(row) for row in cached}) > 1  # different prompts, different continuations


def test_cached_logits_match_uncached_at_every_step(tiny, corpus_text):
    """Teacher-forced through real text: 3 x block_size steps, so most of them are past the window."""
    model, tokenizer = tiny
    seq = _ids(tokenizer, corpus_text[3000:3100], batch=2)  # (2, 100)
    seq[1] = torch.as_tensor(tokenizer.encode(corpus_text[5000:5100]))
    cached, uncached = Decoder(model, 2, use_cache=True), Decoder(model, 2, use_cache=False)
    worst = 0.0
    with torch.inference_mode():
        for n in range(1, seq.size(1) + 1):
            diff = (cached(seq[:, :n]) - uncached(seq[:, :n])).abs().max().item()
            worst = max(worst, diff)
    assert worst < 1e-4


def test_cached_logits_match_on_the_seed_shape_with_random_weights():
    """A deeper random model (more heads and layers than the tiny one), past a short window."""
    torch.manual_seed(0)
    from chargpt.config import GPTConfig

    model = GPT(GPTConfig(vocab_size=65, block_size=16, n_embd=64, n_heads=4, n_layers=4, dropout=0.0)).eval()
    seq = torch.randint(0, 65, (1, 40))
    cached, uncached = Decoder(model, 1), Decoder(model, 1, use_cache=False)
    with torch.inference_mode():
        diffs = [(cached(seq[:, :n]) - uncached(seq[:, :n])).abs().max().item() for n in range(1, 41)]
    assert max(diffs) < 1e-4
    assert _greedy(model, seq[:, :3], 40, True) == _greedy(model, seq[:, :3], 40, False)


def test_temperature_zero_is_argmax():
    logits = torch.randn(4, 65, generator=torch.Generator().manual_seed(1))
    assert torch.equal(pick_next(logits, 0, None, None, None), logits.argmax(-1))
    # the other controls do not matter at temperature 0
    assert torch.equal(pick_next(logits, 0, 5, 0.5, torch.Generator()), logits.argmax(-1))


def test_underflowing_temperature_and_top_p_are_greedy(tiny, trained_model_dir, capsys):
    """A temperature or top_p that is 0 in float32 (or whose scaled logits overflow) is its limit, greedy: in
    pick_next, the Python API and the CLI (which printed a traceback)."""
    from helpers import call_main

    logits = torch.tensor([[0.5, 3.0, -1.0, 2.0], [1.0, -2.0, 4.0, 0.0]])
    g = torch.Generator().manual_seed(0)
    for temperature, top_p in ((1e-300, None), (1e-40, None), (0.8, 1e-300), (1e-300, 1e-300)):
        assert pick_next(logits, temperature, None, top_p, g).tolist() == [1, 2], (temperature, top_p)
    model, tokenizer = tiny
    pinned = dict(max_new_tokens=40, precision="fp32", quantize="none")  # auto's choice may differ between processes
    greedy = generate(model, tokenizer, "ROMEO:", SampleConfig(temperature=0, **pinned))
    assert generate(model, tokenizer, "ROMEO:", SampleConfig(temperature=1e-300, **pinned)) == greedy
    assert generate(model, tokenizer, "ROMEO:", SampleConfig(top_p=1e-300, seed=3, **pinned)) == greedy
    args = ["sample", "--model", str(trained_model_dir), "--prompt", "ROMEO:", "--max-new-tokens", "40", "--seed", "1"]
    args += ["--precision", "fp32", "--quantize", "none"]
    rc, out, err = call_main([*args, "--temperature", "1e-300"], capsys)
    assert rc == 0 and "Traceback" not in err, err
    assert out.rstrip("\n") == "ROMEO:" + greedy[0], (out, greedy)


def test_top_k_1_equals_greedy(tiny):
    """In fp32 (bf16 logits, which auto may choose, tie often, and top-k keeps every tied token)."""
    model, tokenizer = tiny
    fp32 = dict(precision="fp32", quantize="none")
    greedy = generate(model, tokenizer, "ROMEO:\n", max_new_tokens=60, temperature=0, **fp32)
    assert generate(model, tokenizer, "ROMEO:\n", max_new_tokens=60, temperature=1.3, top_k=1, seed=4, **fp32) == greedy


def test_top_k_restricts_the_support():
    logits = torch.randn(65, generator=torch.Generator().manual_seed(2))
    top5 = set(torch.topk(logits, 5).indices.tolist())
    drawn = pick_next(logits.expand(3000, -1), 1.0, 5, None, torch.Generator().manual_seed(0))
    assert set(drawn.tolist()) == top5  # only the top 5, and (3000 draws) all of them


def test_top_k_restricts_the_support_in_generation(tiny):
    model, tokenizer = tiny
    idx = _ids(tokenizer, "KING:\n")
    g = torch.Generator().manual_seed(0)
    decoder = Decoder(model, 1)
    seq = idx
    with torch.inference_mode():
        for _ in range(80):
            logits = decoder(seq)[0]
            nxt = pick_next(logits[None], 1.5, 3, None, g)
            assert nxt.item() in torch.topk(logits, 3).indices.tolist()
            seq = torch.cat([seq, nxt[:, None]], dim=1)


def test_top_p_samples_from_the_nucleus():
    probs = torch.tensor([0.05, 0.5, 0.1, 0.2, 0.15])
    logits = probs.log()
    # sorted: 0.5 (id 1), 0.2 (id 3), 0.15 (id 4), 0.1 (id 2), 0.05 (id 0)
    # top_p 0.45: 0.5 alone reaches it; 0.6: 0.5 + 0.2; 0.8: 0.5 + 0.2 + 0.15; 1: everything
    for top_p, nucleus in [(0.45, {1}), (0.6, {1, 3}), (0.8, {1, 3, 4}), (1.0, {0, 1, 2, 3, 4})]:
        drawn = pick_next(logits.expand(4000, -1), 1.0, None, top_p, torch.Generator().manual_seed(0))
        assert set(drawn.tolist()) == nucleus, top_p
    # within the nucleus the probabilities are renormalised: 0.5 / 0.7 of the draws are id 1
    drawn = pick_next(logits.expand(20000, -1), 1.0, None, 0.6, torch.Generator().manual_seed(1))
    assert abs((drawn == 1).float().mean().item() - 0.5 / 0.7) < 0.02


def test_seed_reproduces_and_different_seeds_differ(tiny):
    model, tokenizer = tiny
    a = generate(model, tokenizer, "\n", max_new_tokens=120, seed=11)
    assert a == generate(model, tokenizer, "\n", max_new_tokens=120, seed=11)
    assert a != generate(model, tokenizer, "\n", max_new_tokens=120, seed=12)
    assert a != generate(model, tokenizer, "\n", max_new_tokens=120)  # no seed: a fresh random one


def test_num_samples_is_one_batch_of_independent_samples(tiny):
    model, tokenizer = tiny
    texts = generate(model, tokenizer, "First", max_new_tokens=70, seed=5, num_samples=4, top_k=20)
    assert len(texts) == 4 and all(len(t) == 70 for t in texts)
    assert all(set(t) <= set(tokenizer.to_list()) for t in texts)
    assert len(set(texts)) == 4
    # sample i of a batch with seed s is the single sample with seed s + i
    for i in (0, 3):
        assert texts[i] == generate(model, tokenizer, "First", max_new_tokens=70, seed=5 + i, top_k=20)[0]


def test_stop_strings_end_the_sample_and_are_not_included(tiny):
    model, tokenizer = tiny
    kw = dict(max_new_tokens=150, seed=3, temperature=0.8)
    full = generate(model, tokenizer, "\n", **kw)[0]
    stop = full[40:43]  # a string the sample certainly produces
    cut = full[: full.index(stop)]
    assert generate(model, tokenizer, "\n", stop=[stop], **kw) == [cut]
    assert "".join(stream(model, tokenizer, "\n", stop=[stop], **kw)) == cut
    # several stop strings: the first one to be completed wins
    other = full[60:62]
    winner = min((stop, other), key=lambda s: full.index(s) + len(s))
    first = full[: full.index(winner)]
    assert generate(model, tokenizer, "\n", stop=[other, stop], **kw) == [first]
    assert "".join(stream(model, tokenizer, "\n", stop=[other, stop], **kw)) == first
    # a stop string that never appears changes nothing
    assert "".join(stream(model, tokenizer, "\n", stop=["\x00never"], **kw)) == full


def test_stop_strings_in_a_batch_end_each_sample_separately(tiny):
    model, tokenizer = tiny
    kw = dict(max_new_tokens=100, seed=8, num_samples=3)
    full = generate(model, tokenizer, "\n", **kw)
    stopped = generate(model, tokenizer, "\n", stop=["e"], **kw)
    assert stopped == [t.split("e")[0] for t in full]


def test_stream_yields_chunks_that_concatenate_to_generate(tiny):
    model, tokenizer = tiny
    kw = dict(max_new_tokens=80, seed=21, temperature=0.9, top_p=0.95)
    chunks = list(stream(model, tokenizer, "QUEEN:", **kw))
    assert len(chunks) > 1  # streamed as produced, not all at the end
    assert "".join(chunks) == generate(model, tokenizer, "QUEEN:", **kw)[0]


def test_generation_past_the_window_with_a_long_prompt(tiny, corpus_text):
    model, tokenizer = tiny
    prompt = corpus_text[:100]  # longer than block_size: only the last 32 characters matter
    a = generate(model, tokenizer, prompt, max_new_tokens=40, temperature=0)
    b = generate(model, tokenizer, prompt[-32:], max_new_tokens=40, temperature=0)
    assert a == b and len(a[0]) == 40


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(temperature=-0.5),
        dict(temperature=float("nan")),
        dict(top_p=0.0),
        dict(top_p=1.5),
        dict(top_k=0),
        dict(max_new_tokens=-1),
        dict(num_samples=0),
        dict(stop=[""]),
    ],
)
def test_api_rejects_bad_settings(tiny, kwargs):
    model, tokenizer = tiny
    with pytest.raises(ChargptError):
        generate(model, tokenizer, "\n", **kwargs)


def test_cli_streams_and_no_stream_gives_the_same_text(tiny, trained_model_dir, capsys):
    model, tokenizer = tiny
    args = ["sample", "--model", str(trained_model_dir), "--prompt", "ROMEO:", "--max-new-tokens", "60"]
    args += ["--seed", "2", "--temperature", "0.8", "--top-k", "30", "--device", "cpu", "--quantize", "none"]
    rc, streamed, err = call_main(args, capsys)  # quantize pinned: auto's measured choice may differ between loads
    assert rc == 0, err
    same = dict(max_new_tokens=60, seed=2, temperature=0.8, top_k=30, quantize="none")
    expected = "ROMEO:" + generate(model, tokenizer, "ROMEO:", **same)[0]
    assert streamed == expected + "\n"
    rc, batch, _ = call_main([*args, "--no-stream"], capsys)
    assert rc == 0 and batch == streamed


def test_cli_num_samples_and_stop(trained_model_dir, capsys):
    rc, out, err = call_main([
        "sample", "--model", str(trained_model_dir), "--prompt", "A", "--max-new-tokens", "40", "--seed", "1",
        "--num-samples", "2", "--stop", "\n", "--device", "cpu",
    ], capsys)  # fmt: skip
    assert rc == 0, err
    lines = out.split("\n")
    assert lines[0] == "--- sample 1 ---" and lines[2] == "--- sample 2 ---" and lines[4:] == [""]
    assert all(line.startswith("A") and len(line) <= 41 for line in (lines[1], lines[3]))


@pytest.mark.parametrize(
    "flags",
    [
        ["--temperature", "-1"],
        ["--top-p", "0"],
        ["--top-p", "1.1"],
        ["--top-k", "0"],
        ["--max-new-tokens", "-5"],
        ["--num-samples", "0"],
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(trained_model_dir, flags, capsys):
    rc, out, err = call_main(["sample", "--model", str(trained_model_dir), *flags], capsys)
    assert_one_line_error(rc, out, err, "chargpt: error:")


@pytest.mark.parametrize("block_size", [16, 20])
def test_static_decode_step_equals_the_ordinary_step(block_size):
    """The fixed-shape step that a CUDA graph replays on a GPU, run eagerly here: the same logits, bit for bit, at
    every step, inside the window and past it (rebuilds). It attends over the whole cache (32 slots at block 20),
    the ordinary step over 16 or 32 (chargpt.model.span): the masked slots change no bit."""
    torch.manual_seed(0)
    from chargpt.config import GPTConfig

    model = GPT(GPTConfig(vocab_size=65, block_size=block_size, n_embd=64, n_heads=4, n_layers=4, dropout=0.0))
    model.eval()
    seq = torch.randint(0, 65, (2, 40))
    ordinary, static = Decoder(model, 2), Decoder(model, 2, static=True)
    assert static.graph is not None and not static.graph.graphed and ordinary.graph is None  # no graph on a CPU
    with torch.inference_mode():
        for n in range(1, 41):
            assert torch.equal(ordinary(seq[:, :n]), static(seq[:, :n])), n


def test_one_token_step_continues_the_prefill():
    """The one-token step after a prefill of 5 tokens gives the logits of the whole 6-token forward (to float
    rounding), in all three of its modes: same position, fixed shapes, rows at their own positions."""
    torch.manual_seed(0)
    from chargpt.config import GPTConfig
    from chargpt.inference.decode import DecodeStep, Rows

    model = GPT(GPTConfig(vocab_size=65, block_size=16, n_embd=64, n_heads=4, n_layers=4, dropout=0.0)).eval()
    seq = torch.randint(0, 65, (2, 6))
    with torch.inference_mode():
        full = model(seq)[0][:, -1]
        prefilled = KVCache(model.config, 2, torch.device("cpu"), torch.float32)
        model(seq, cache=prefilled)  # what a 6-token prefill stores at position 5
        for invariant in (False, True):
            step = DecodeStep(model, invariant=invariant)
            for at in (5, torch.tensor(5), Rows([0, 1], [5, 5])):
                cache = KVCache(model.config, 2, torch.device("cpu"), torch.float32)
                model(seq[:, :5], cache=cache)
                got = step(seq[:, 5], cache, at)
                assert (got - full).abs().max().item() < 1e-5
                for layer in range(4):  # the new position's keys and values are stored
                    assert (cache.k[layer][:, :, 5] - prefilled.k[layer][:, :, 5]).abs().max().item() < 1e-5
                    assert (cache.v[layer][:, :, 5] - prefilled.v[layer][:, :, 5]).abs().max().item() < 1e-5
                assert cache.length == 5  # the caller advances it


@pytest.mark.parametrize("precision", ["bf16", "auto"])
def test_generation_in_other_precisions(tiny, precision):
    """bf16 (forced here, whatever the CPU) runs prefill and decode under autocast; the text is still text."""
    model, tokenizer = tiny
    text = generate(model, tokenizer, "\n", max_new_tokens=40, seed=1, precision=precision)[0]
    assert len(text) == 40 and set(text) <= set(tokenizer.to_list())
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast: the weights are untouched
