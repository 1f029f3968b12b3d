"""Weight-only int8 (chargpt.inference.quantize): the weights, the choice, and exactness restated for the int8 model."""

from __future__ import annotations

import json
import math
import threading

import pytest
import torch

from chargpt.config import GPTConfig
from chargpt.errors import ChargptError
from chargpt.inference import quantize as quant
from chargpt.inference.decode import DecodeStep, batch_invariant
from chargpt.inference.evaluate import evaluate
from chargpt.inference.generate import SampleConfig, generate, token_stream
from chargpt.inference.int8 import ALIGN, Int8Linear, int8_linear
from chargpt.machine import precision as prec
from chargpt.model import GPT, BigramLM, KVCache
from chargpt.serve.engine import ChoiceSpec, Engine, Job
from helpers import assert_one_line_error, call_main


@pytest.mark.parametrize("width", [96, 24, 40])  # 24 and 40: widths the kernel summed wrongly before padding
def test_int8_linear_is_within_its_rounding_of_the_float_layer(width):
    torch.manual_seed(0)
    lin = torch.nn.Linear(width, 200)
    q = Int8Linear(lin)
    assert q.qweight.dtype == torch.int8 and q.scales.dtype == torch.bfloat16 and q.qweight.abs().max() <= 127
    assert q.qweight.size(1) % ALIGN == 0 and not q.qweight[:, width:].any()
    back = q.qweight[:, :width].float() * q.scales.float()[:, None]
    assert ((back - lin.weight).abs() <= q.scales.float()[:, None] / 2 * 1.01).all()  # half a step per weight
    with torch.no_grad():
        for rows in (1, 3, 40) * 5:  # the int8 kernel for a few rows; dequantized bf16 for a batch
            x = torch.randn(rows, width)
            got, ref = q(x), lin(x)
            assert got.dtype == torch.float32 and got.shape == ref.shape
            assert (got - ref).abs().max() / ref.abs().max() < 0.02


def test_the_int8_kernel_computes_each_row_on_its_own():
    """What makes the int8 step batch-invariant with no broadcast trick: a row's result does not depend on the rows
    beside it."""
    torch.manual_seed(1)
    q = Int8Linear(torch.nn.Linear(64, 192))
    x = torch.randn(7, 64)
    together = int8_linear(x, q.qweight, q.scales, q.bias)
    alone = torch.cat([int8_linear(x[i : i + 1], q.qweight, q.scales, q.bias) for i in range(7)])
    assert torch.equal(together, alone)


def test_the_copy_is_kept_rebuilt_when_weights_change_and_the_model_untouched(tiny):
    model, _ = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    q = quant.quantized(model)
    assert quant.is_quantized(q) and not quant.is_quantized(model)
    bf16 = prec.Choice("bf16", "asked for")
    assert quant.decode_format(q, bf16).name == "fp32" and quant.decode_format(model, bf16) is bf16  # no autocast
    assert quant.quantized(model) is q  # kept
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert q.tok_emb.weight.data_ptr() != model.tok_emb.weight.data_ptr()  # a copy, not a view
    other = GPT(model.config).eval()
    other.load_state_dict(model.state_dict())
    first = quant.quantized(other)
    with torch.no_grad():
        other.head.weight.mul_(2)  # a training step would do this
    second = quant.quantized(other)
    assert second is not first and torch.equal(second.head.qweight, first.head.qweight)  # same ints,
    assert torch.allclose(second.head.scales.float(), 2 * first.head.scales.float())  # twice the scale
    assert quant.apply(other, "int8")[0] is second  # the kept copy runs
    assert quant.apply(other, "none")[0] is other and quant.quantized(other) is not second  # not kept for nothing


def test_auto_takes_int8_only_where_measured_faster(tmp_path, tiny):
    model, _ = tiny
    plain = prec.CPUInfo("Old CPU", frozenset({"avx2"}), "AVX2")  # no native bf16: timed all the same
    timed = quant.resolve("auto", "cpu", model, tmp_path, info=plain)
    assert "measured" in timed.reason and timed == quant.choose(quant.measured_speedup(plain, model, tmp_path))
    for f in tmp_path.iterdir():
        f.unlink()
    assert quant.choose(1.7).name == "int8" and "1.7x" in quant.choose(1.7).reason
    assert quant.choose(1.05).name == "none"
    assert quant.resolve("auto", "meta", model, tmp_path).name == "none"
    assert quant.resolve("int8", "cpu", model).name == "int8" and quant.resolve("none", "cpu", model).name == "none"
    bf16 = prec.CPUInfo("New CPU", frozenset({"avx512_bf16"}), "AVX512")
    measured = quant.resolve("auto", "cpu", model, tmp_path, info=bf16)  # measured here, then cached
    assert measured == quant.choose(quant.measured_speedup(bf16, model, tmp_path))
    assert len(list(tmp_path.iterdir())) == 1
    # the step of this model's shape is what is timed (and cached): another shape is measured on its own
    other = GPT(GPTConfig(vocab_size=7, block_size=8, n_embd=32, n_heads=2, n_layers=1, dropout=0.0)).eval()
    assert quant.measured_speedup(bf16, other, tmp_path) > 0
    assert len(list(tmp_path.iterdir())) == 2
    with pytest.raises(ChargptError, match="runs on the CPU"):
        quant.resolve("int8", "meta", model)
    with pytest.raises(ChargptError, match="unknown quantization 'int4'"):
        quant.resolve("int4", "cpu", model)
    bigram = BigramLM(GPTConfig(vocab_size=5, block_size=4, arch="bigram"))
    assert quant.apply(bigram, "auto")[0] is bigram
    with pytest.raises(ChargptError, match="bigram"):
        quant.apply(bigram, "int8")


@pytest.mark.parametrize("saved", ["NaN", "Infinity", "-1.5", "0", "true", '"2.0"', "1e400"])
def test_a_tampered_measurement_cache_is_measured_again(tmp_path, tiny, saved):
    """The int8 cache file with a value that is not a finite positive ratio (NaN, Infinity, negative, zero, a
    boolean, a string) is measured again and rewritten; a real ratio is used as saved."""
    model, _ = tiny
    info = prec.CPUInfo("Some CPU", frozenset({"avx2"}), "AVX2")
    fresh = quant.measured_speedup(info, model, tmp_path)
    (path,) = tmp_path.iterdir()
    path.write_text(path.read_text().replace(json.dumps(fresh), saved))
    again = quant.measured_speedup(info, model, tmp_path)
    assert 0 < again < math.inf and json.loads(path.read_text())["int8"] == again
    path.write_text(path.read_text().replace(json.dumps(again), "7.5"))
    assert quant.measured_speedup(info, model, tmp_path) == 7.5  # a usable ratio is trusted


def test_int8_step_continues_the_int8_prefill(tiny):
    """The one-token step on int8 weights gives the logits of the int8 model's whole forward, to rounding (the
    step's few rows run the int8 kernel, a long forward the dequantized weights), and is batch-invariant."""
    model, _ = tiny
    q = quant.quantized(model)
    seq = torch.randint(0, model.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        cache = KVCache(model.config, 2, torch.device("cpu"), torch.float32)
        q(seq[:, :19], cache=cache)
        step = DecodeStep(q)(seq[:, 19], cache, 19)
        full = q(seq)[0][:, -1]
        fp32 = model(seq)[0][:, -1]
    assert (step - full).abs().max() < 0.02 * full.abs().max()
    assert 0 < (full - fp32).abs().max() < 0.05 * fp32.abs().max()  # int8 changes the numbers, a little
    assert batch_invariant(q)


def test_int8_text_is_the_same_from_generate_the_cli_and_the_server(tiny, trained_model_dir, capsys):
    """Exactness restated for int8 weights: one seed, one text, whichever way it is asked for, batched or not."""
    model, tokenizer = tiny
    kw = dict(max_new_tokens=40, temperature=0.9, top_k=20, seed=11, quantize="int8")
    text = generate(model, tokenizer, "ROMEO:", **kw)[0]
    assert len(text) == 40
    rc, out, _ = call_main([
        "sample", "--model", str(trained_model_dir), "--prompt", "ROMEO:", "--max-new-tokens", "40",
        "--temperature", "0.9", "--top-k", "20", "--seed", "11", "--quantize", "int8", "--device", "cpu",
    ], capsys)  # fmt: skip
    assert rc == 0 and out == "ROMEO:" + text + "\n"
    engine = Engine(model, tokenizer, max_batch=4, max_queue=4, quantize="int8")
    assert engine.batched and engine.quantize.name == "int8"
    engine.start()
    got: dict[int, str] = {}
    finished = threading.Event()

    def deliver(item):
        if not isinstance(item, list):  # the engine closing while the neighbours still run
            return
        for piece in item:
            got[piece.index] = got.get(piece.index, "") + piece.text
            if piece.finish_reason and piece.index == 0:
                finished.set()

    ids = tokenizer.encode("ROMEO:").tolist()
    others = [ChoiceSpec(tokenizer.encode("KING").tolist(), 60, 1.0, None, None, 5 + i) for i in range(2)]
    engine.submit(Job([*others, ChoiceSpec(ids, 40, 0.9, 20, None, 11)][::-1], deliver))  # busy neighbours
    assert finished.wait(120)
    engine.close()
    engine.join(10)
    assert got[0] == text


def test_eval_reports_the_loss_with_and_without_int8(tiny, tmp_path, trained_model_dir, corpus_text, capsys):
    model, tokenizer = tiny
    text = corpus_text[-3000:]
    plain = evaluate(model, tokenizer, text, precision="fp32")
    both = evaluate(model, tokenizer, text, precision="fp32", quantize="int8")
    assert plain["quantize"] == "none" and "loss_unquantized" not in plain
    assert both["quantize"] == "int8" and both["loss_unquantized"] == plain["loss"]
    assert both["loss"] != plain["loss"] and abs(both["loss"] - plain["loss"]) < 0.05
    path = tmp_path / "held.txt"
    path.write_text(text)
    threads = str(torch.get_num_threads())  # as in this process: the sums' order depends on it on AVX2 kernels
    args = ["eval", "--model", str(trained_model_dir), "--data", str(path), "--quantize", "int8", "--quiet"]
    rc, out, err = call_main([*args, "--precision", "fp32", "--device", "cpu", "--threads", threads], capsys)
    assert rc == 0, err
    result = json.loads(out)
    assert result["quantize"] == "int8" and result["loss"] == pytest.approx(both["loss"], rel=1e-9)
    assert result["loss_unquantized"] == pytest.approx(plain["loss"], rel=1e-9)


def test_bad_quantize_flag_is_one_line(trained_model_dir, capsys):
    for command in ("sample", "eval"):
        extra = ["--data", str(trained_model_dir / "config.json")] if command == "eval" else []
        rc, out, err = call_main([command, "--model", str(trained_model_dir), "--quantize", "int4", *extra], capsys)
        assert_one_line_error(rc, out, err, "--quantize")


def test_token_stream_takes_quantize_and_keeps_the_model(tiny):
    model, _ = tiny
    idx = torch.zeros(1, 1, dtype=torch.long)
    ints = torch.stack(list(token_stream(model, idx, 30, temperature=0, quantize="int8")))
    floats = torch.stack(list(token_stream(model, idx, 30, temperature=0, quantize="none")))
    assert ints.shape == floats.shape == (30, 1)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert SampleConfig().quantize == "auto"
