"""The batching engine in-process: the batched step equals each row's own step bit for bit, batched jobs return
exactly what chargpt.generate returns, the queue is bounded, cancelling frees slots, closing ends running jobs."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

from chargpt.config import GPTConfig
from chargpt.inference.decode import DecodeStep, Rows, batch_invariant
from chargpt.inference.generate import SampleConfig, generate
from chargpt.machine import precision as prec
from chargpt.model import GPT, KVCache
from chargpt.serve.engine import (
    ChoiceSpec,
    Engine,
    Job,
    Piece,
    QueueFull,
    ShuttingDown,
    StepFailed,
    batching_mode,
    share_cap,
)


class Collector:
    """A job's deliveries, gathered per choice; `done` is set when every choice has finished (or on an error)."""

    def __init__(self, n: int):
        self.texts, self.finish, self.tokens = [""] * n, [None] * n, [0] * n
        self.error: Exception | None = None
        self.done = threading.Event()

    def __call__(self, item: list[Piece] | ShuttingDown | StepFailed) -> None:
        if isinstance(item, ShuttingDown | StepFailed):
            self.error = item
            self.done.set()
            return
        for p in item:
            self.texts[p.index] += p.text
            self.finish[p.index], self.tokens[p.index] = p.finish_reason, p.completion_tokens  # type: ignore[call-overload]
        if all(self.finish):
            self.done.set()


def _job(specs: list[ChoiceSpec]) -> tuple[Job, Collector]:
    collector = Collector(len(specs))
    return Job(specs, collector), collector


def test_batched_step_reproduces_single_rows():
    torch.manual_seed(0)
    for cfg in (
        GPTConfig(vocab_size=65, block_size=16, n_embd=64, n_heads=4, n_layers=4, dropout=0.0),
        GPTConfig(vocab_size=30, block_size=40, n_embd=96, n_heads=6, n_layers=2, dropout=0.1),
    ):
        assert _batches_exactly(GPT(cfg).eval())


def _batches_exactly(model: GPT) -> bool:
    """The per-row batched step is exact (by construction, on every CPU), and the engine's choice batches."""
    mode = batching_mode(lambda per_row: batch_invariant(model, per_row=per_row))[0]
    return batch_invariant(model, per_row=True) and mode is not None


@pytest.mark.parametrize("threads", [1, 2])
def test_batched_step_reproduces_single_rows_on_more_threads(threads):
    """The seed model's widths (384 in, a 65-character head): with 2 threads an Intel Xeon's one-row product
    into 65 outputs splits its sum between the threads, which a batched product does not (the head is one-row
    products in every form), and MKL on AMD CPUs does so for every product (the per-row form)."""
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=65, block_size=32, n_embd=384, n_heads=6, n_layers=1, dropout=0.0)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert _batches_exactly(GPT(cfg).eval())
    finally:
        torch.set_num_threads(before)


def test_batching_takes_the_fused_step_where_exact_else_one_product_per_row():
    """The start-up policy, with checks that answer as a CPU would: fused products exact (Intel here), only the
    per-row form exact (MKL on AMD at 2 threads), neither (no batching)."""
    assert batching_mode(lambda per_row: True)[0] is False
    per_row, note = batching_mode(lambda per_row: per_row)
    assert per_row is True and "one product per row" in note
    per_row, note = batching_mode(lambda per_row: False)
    assert per_row is None and "one by one" in note


AVX2_ONLY = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


@pytest.mark.parametrize("env", [{}, AVX2_ONLY], ids=["native", "avx2-kernels"])
def test_the_batched_step_is_exact_at_one_and_two_threads_on_this_cpu(env):
    """In a fresh process (kernel choices are made at start-up), with this CPU's own kernels and with PyTorch, MKL
    and oneDNN told to use their AVX2 ones (as on an AVX2-only CPU): at the seed widths the per-row batched step
    equals each row's own step at 1 and at 2 threads (the fused one is reported; where it is not exact the engine
    takes the per-row form). The process starts from the user's environment, as a user's does: MKL_CBWR only as
    chargpt sets it (without it MKL on AMD CPUs rounds by memory offset and thread count, and both forms fail)."""
    code = textwrap.dedent(
        """
        import torch
        from chargpt.config import GPTConfig
        from chargpt.inference.decode import batch_invariant
        from chargpt.model import GPT
        torch.manual_seed(0)
        cfg = GPTConfig(vocab_size=65, block_size=32, n_embd=384, n_heads=6, n_layers=2, dropout=0.0)
        model = GPT(cfg).eval()
        print(torch.backends.cpu.get_cpu_capability(), end=" ")
        for threads in (1, 2):
            torch.set_num_threads(threads)
            print(batch_invariant(model, per_row=True), batch_invariant(model), end=" ")
        """
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**user_environment(), **env})  # fmt: skip
    assert r.returncode == 0, r.stderr
    capability, *exact = r.stdout.split()
    assert exact[0::2] == ["True", "True"], f"{capability}: {r.stdout}"  # the per-row form: the one-row step's calls
    print(f"{capability}: fused batched step exact at 1 and 2 threads: {exact[1::2]}")
    if env:
        assert capability == "AVX2"


def user_environment() -> dict[str, str]:
    """This process's environment less what chargpt's import set in it (MKL_CBWR, unless the user had)."""
    import chargpt

    return {k: v for k, v in os.environ.items() if k != "MKL_CBWR" or chargpt.MKL_CBWR_FROM_USER}


@pytest.mark.parametrize(("given", "expected"), [(None, "AUTO"), ("COMPATIBLE", "COMPATIBLE"), ("", "")])
def test_chargpt_sets_mkl_reproducibility_unless_the_environment_names_a_mode(given, expected):
    """Importing chargpt turns on MKL's reproducibility mode before anything runs in torch (MKL reads it at its first
    call), and leaves a mode the user chose, "" (off) included; `info --machine` says which and who chose it."""
    env = user_environment()
    env.pop("MKL_CBWR", None)
    if given is not None:
        env["MKL_CBWR"] = given
    code = (
        "import torch, chargpt, os; from chargpt.cli import machine; "
        "print(repr(os.environ['MKL_CBWR'])); print(machine.describe(measure=False)['cpu']['mkl_cbwr'])"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    value, report = r.stdout.splitlines()
    assert value == repr(expected)
    assert report == f"{expected or 'off'} ({'set by chargpt' if given is None else 'from the environment'})"


@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_engine_jobs_equal_generate(tiny, quantize):
    """More rows than the batch holds (so jobs queue), prompts shorter and longer than the window, n > 1; with the
    weights as trained and as int8."""
    model, tokenizer = tiny
    engine = Engine(model, tokenizer, max_batch=5, max_queue=20, quantize=quantize)
    assert engine.batched
    engine.start()
    cases = []
    for i, prompt in enumerate(["\n", "ROMEO:", "First Citizen:\nBefore we proceed any further, hear me", "KING"]):
        settings = dict(max_new_tokens=25 + 17 * i, temperature=[0.0, 0.8, 1.0, 1.5][i], top_k=[None, 7][i % 2])
        settings |= dict(top_p=[None, 0.85][i // 2], seed=40 + i, stop=("\n\n",) if i == 2 else ())
        n = 2 if i % 2 else 1  # sample j uses seed + j
        per_sample = [{**settings, "seed": 40 + i + j} for j in range(n)]
        job, got = _job([ChoiceSpec(tokenizer.encode(prompt).tolist(), **kw) for kw in per_sample])
        cases.append((prompt, per_sample, job, got))
    for _, _, job, _ in cases:
        engine.submit(job)
    for prompt, per_sample, _, got in cases:
        assert got.done.wait(120)
        expected = [generate(model, tokenizer, prompt, SampleConfig(**kw, quantize=quantize))[0] for kw in per_sample]
        assert got.texts == expected
        assert all(f in ("stop", "length") for f in got.finish)
    engine.close()
    engine.join(10)


def test_queue_bound_cancel_and_close(tiny):
    model, tokenizer = tiny
    engine = Engine(model, tokenizer, max_batch=1, max_queue=1)
    engine.start()
    ids = tokenizer.encode("ROMEO:").tolist()
    long_job, long_out = _job([ChoiceSpec(ids, 10**6, seed=1)])
    short_job, short_out = _job([ChoiceSpec(ids, 5, seed=2)])
    engine.submit(long_job)
    engine.submit(short_job)  # waits: the one slot is busy
    with pytest.raises(QueueFull):
        engine.submit(_job([ChoiceSpec(ids, 5)])[0])
    time.sleep(0.2)
    assert not short_out.done.is_set() and long_out.texts[0]  # the long job streams, the short one waits
    engine.cancel(long_job)  # its client went away
    assert short_out.done.wait(60) and len(short_out.texts[0]) == 5
    assert short_out.finish == ["length"] and short_out.tokens == [5]

    running, running_out = _job([ChoiceSpec(ids, 10**6, seed=3)])
    engine.submit(running)
    time.sleep(0.2)
    engine.close(grace=0.2)
    with pytest.raises(ShuttingDown):
        engine.submit(_job([ChoiceSpec(ids, 5)])[0])
    assert running_out.done.wait(30) and isinstance(running_out.error, ShuttingDown)
    engine.join(10)
    assert not engine._thread.is_alive()


def test_a_failing_step_ends_its_jobs_and_the_engine_goes_on(tiny):
    """A row whose sampling raises (top_k 0, which the HTTP layer would have refused) fails its step."""
    model, tokenizer = tiny
    engine = Engine(model, tokenizer, max_batch=4, max_queue=4)
    engine.start()
    ids = tokenizer.encode("ROMEO:").tolist()
    bad, bad_out = _job([ChoiceSpec(ids, 50, top_k=0)])
    engine.submit(bad)
    assert bad_out.done.wait(60) and isinstance(bad_out.error, StepFailed)
    good, good_out = _job([ChoiceSpec(ids, 30, seed=4), ChoiceSpec(ids, 30, seed=5)])
    engine.submit(good)
    assert good_out.done.wait(60) and good_out.error is None
    assert good_out.texts == [generate(model, tokenizer, "ROMEO:", max_new_tokens=30, seed=s)[0] for s in (4, 5)]
    engine.close()
    engine.join(10)


def test_engine_in_bf16_equals_generate_in_bf16(tiny):
    """--precision bf16: the engine resolves the name as generate does, and a seeded job still returns exactly
    generate's text in that precision (batched where the bf16 batched step is bit-exact here, else row by row)."""
    model, tokenizer = tiny
    engine = Engine(model, tokenizer, max_batch=3, max_queue=3, precision="bf16", quantize="none")
    assert (engine.prefill.name, engine.decode.name) == ("bf16", "bf16")
    assert engine.batched == batch_invariant(model, engine.prefill, engine.decode)
    engine.start()
    cases = []
    for i, prompt in enumerate(["\n", "ROMEO:"]):
        kw = dict(max_new_tokens=30, temperature=0.9, seed=7 + i, precision="bf16", quantize="none")
        spec = {k: kw[k] for k in kw if k not in ("precision", "quantize")}
        job, got = _job([ChoiceSpec(tokenizer.encode(prompt).tolist(), **spec)])
        engine.submit(job)
        cases.append((prompt, kw, got))
    for prompt, kw, got in cases:
        assert got.done.wait(120)
        assert got.texts == generate(model, tokenizer, prompt, SampleConfig(**kw))
    engine.close()


def test_the_batched_step_runs_in_the_precision_asked(tiny):
    """The bf16 choice reaches the batched step: its logits differ from the fp32 step's by bf16 rounding, not more."""
    model, _ = tiny
    bf16 = prec.Choice("bf16", "asked for")
    logits = {}
    with torch.inference_mode():
        for name, choice in (("fp32", prec.FP32), ("bf16", bf16)):
            pool = KVCache(model.config, 2, torch.device("cpu"), torch.float32)
            seqs = [torch.tensor([[1, 2, 3, 4]]), torch.tensor([[5, 6]])]
            with prec.autocast("cpu", choice):
                for slot, seq in enumerate(seqs):
                    model(seq[:, :-1], cache=pool.row(slot))
                logits[name] = DecodeStep(model, invariant=True)(torch.tensor([4, 6]), pool, Rows([0, 1], [3, 1]))
    assert logits["bf16"].dtype == torch.bfloat16 and logits["fp32"].dtype == torch.float32
    diff = (logits["bf16"].float() - logits["fp32"]).abs().max().item()
    assert 0 < diff < 0.25


def test_one_request_never_holds_every_slot(tiny):
    """A request of n = max_batch long choices takes at most share_cap(max_batch) slots: a short request sent
    after it starts at once and finishes long before it, and the long request's choices, started in two goes,
    are still exactly generate's."""
    model, tokenizer = tiny
    engine = Engine(model, tokenizer, max_batch=4, max_queue=4)
    assert share_cap(4) == 3 and share_cap(32) == 24 and share_cap(1) == 1
    engine.start()
    ids = tokenizer.encode("ROMEO:").tolist()
    big, big_out = _job([ChoiceSpec(ids, 300, seed=10 + j) for j in range(4)])
    engine.submit(big)
    deadline = time.monotonic() + 60
    while not any(big_out.texts):  # it runs
        assert time.monotonic() < deadline
        time.sleep(0.005)
    short, short_out = _job([ChoiceSpec(ids, 4, seed=1)])
    engine.submit(short)
    assert short_out.done.wait(60) and len(short_out.texts[0]) == 4
    assert not big_out.done.is_set() and max(big_out.tokens) < 300, big_out.tokens  # it did not wait for them
    assert big_out.done.wait(120) and big_out.error is None
    expected = [generate(model, tokenizer, "ROMEO:", max_new_tokens=300, seed=10 + j)[0] for j in range(4)]
    assert big_out.texts == expected
    engine.close()
    engine.join(10)
