"""--precision: what `auto` picks for each CPU and kind of work, the cached micro-benchmark, bf16 training that
really runs (and, on a CPU with native bf16, agrees with fp32), and the loop that reads the loss only now and then."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from chargpt.errors import ChargptError
from chargpt.inference.evaluate import evaluate
from chargpt.inference.generate import generate
from chargpt.machine import precision as prec
from chargpt.storage import checkpoint as ckpt
from chargpt.storage import layout
from chargpt.training.distributed import sum_dtype
from chargpt.training.loop import RunState, save_due, train
from conftest import tiny_config
from helpers import assert_one_line_error, assert_same_tensors, call_main, final_state, metrics

ZEN5 = prec.CPUInfo("AMD EPYC 9R45", frozenset({"avx2", "avx512f", "avx512_bf16", "avx512_vnni"}), "AVX512")
ZEN3 = prec.CPUInfo("AMD EPYC 7B13", frozenset({"avx2", "fma"}), "AVX2")
SAPPHIRE = prec.CPUInfo("Intel Xeon 8480", frozenset({"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}), "AVX512")


# ---------------------------------------------------------------------------------------------
# selection


def test_auto_without_native_bf16_is_fp32_for_every_kind():
    for kind in prec.KINDS:
        choice = prec.choose_cpu(kind, ZEN3, None)
        assert choice.name == "fp32" and "no native bf16" in choice.reason


def test_auto_with_bf16_follows_the_measurement_per_kind():
    """The issue's Zen 5: bf16 matmuls 4x faster, bf16 matrix-vector 7x slower -> bf16 batched, fp32 decode."""
    measured = prec.Speedups(matmul=4.0, matvec=0.14)
    for kind in prec.BATCHED:
        choice = prec.choose_cpu(kind, ZEN5, measured)
        assert choice.name == "bf16" and "avx512_bf16" in choice.reason and "4.0x" in choice.reason
    decode = prec.choose_cpu("decode", ZEN5, measured)
    assert decode.name == "fp32" and "matrix-vector" in decode.reason and "0.14x" in decode.reason
    # a CPU whose bf16 kernels are fast for both shapes decodes in bf16 too
    assert prec.choose_cpu("decode", SAPPHIRE, prec.Speedups(matmul=8.0, matvec=1.6)).name == "bf16"
    # the flag alone is not enough: a bf16 matmul that is not clearly faster keeps fp32
    assert prec.choose_cpu("train", ZEN5, prec.Speedups(matmul=1.05, matvec=1.0)).name == "fp32"


def test_asked_for_precision_is_used_on_any_device():
    assert prec.resolve("fp32", "cpu", "train").name == "fp32"
    forced = prec.resolve("bf16", "cpu", "decode")
    assert forced.name == "bf16" and forced.dtype == torch.bfloat16
    if not prec.cpu_info().native_bf16:
        assert "much slower" in forced.reason  # said, not refused
    with pytest.raises(ChargptError, match="unknown precision 'fp16'; use one of auto, fp32, bf16"):
        prec.resolve("fp16", "cpu", "train")


def test_auto_on_this_machine_matches_its_flags(tmp_path):
    """Target 3's other half: on a CPU without native bf16, auto is fp32 (no regression), measured nothing."""
    info = prec.cpu_info()
    choices = {kind: prec.resolve("auto", "cpu", kind, cache=tmp_path) for kind in prec.KINDS}
    if not info.native_bf16:
        assert {c.name for c in choices.values()} == {"fp32"}
        assert not list(tmp_path.iterdir())  # no benchmark ran, none was cached
    else:
        assert len(list(tmp_path.iterdir())) == 1  # one measurement, shared by every kind


def test_cpu_flags_are_read_from_proc_cpuinfo():
    info = prec.cpu_info()
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    if "flags" in text:
        assert "fpu" in info.flags or "sse2" in info.flags  # every x86 CPU has these
    assert info.capability  # torch's kernel level, e.g. AVX2


def test_describe_is_one_phrase():
    same = {"train": prec.Choice("fp32", "no bf16"), "eval": prec.Choice("fp32", "no bf16")}
    assert prec.describe(same) == "fp32 (no bf16)"
    mixed = {"prefill": prec.Choice("bf16", "fast"), "decode": prec.Choice("fp32", "slow")}
    assert prec.describe(mixed) == "prefill bf16 (fast); decode fp32 (slow)"


# ---------------------------------------------------------------------------------------------
# the micro-benchmark cache


def test_measurement_is_cached_per_machine_and_invalidated_when_the_machine_changes(tmp_path, monkeypatch):
    first = prec.measured_speedups(ZEN5, tmp_path)  # measured here, whatever this CPU is
    path = prec.cache_file(ZEN5, tmp_path)
    assert path.is_file() and first.matmul > 0 and first.matvec > 0
    saved = json.loads(path.read_text())
    assert saved["matmul"] == first.matmul and saved["cpu"] == ZEN5.model
    path.write_text(json.dumps({"matmul": 3.25, "matvec": 0.5}))  # what an earlier run measured
    assert prec.measured_speedups(ZEN5, tmp_path) == prec.Speedups(3.25, 0.5)  # read back, not re-measured
    # another CPU model, other flags or another torch: another key, so another file
    assert prec.cache_file(SAPPHIRE, tmp_path) != path
    assert prec.cache_file(prec.CPUInfo(ZEN5.model, ZEN5.flags | {"amx_bf16"}, "AVX512"), tmp_path) != path
    # MKL or oneDNN told to use other kernels (or to round otherwise) than this process was: another file
    for name, values in [("MKL_ENABLE_INSTRUCTIONS", ("AVX2", "AVX512")), ("ONEDNN_MAX_CPU_ISA", ("AVX2", "AVX512")),
                         ("MKL_CBWR", ("", "AUTO"))]:  # fmt: skip
        monkeypatch.setenv(name, next(v for v in values if os.environ.get(name) != v))
        assert prec.cache_file(ZEN5, tmp_path) != path, name
        monkeypatch.undo()
    assert prec.cache_file(ZEN5, tmp_path) == path
    path.write_text("{not json")  # a damaged cache is measured again and rewritten
    again = prec.measured_speedups(ZEN5, tmp_path)
    assert again != prec.Speedups(3.25, 0.5) and json.loads(path.read_text())["matmul"] == again.matmul


def test_an_unwritable_cache_only_costs_a_measurement(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    speed = prec.measured_speedups(ZEN3, blocker / "sub")  # the cache dir cannot be created
    assert speed.matmul > 0


# ---------------------------------------------------------------------------------------------
# training in bf16


def test_forced_bf16_training_runs_and_stays_close_to_fp32(tmp_path, text_file, caplog):
    caplog.set_level("INFO", logger="chargpt")
    kw = dict(n_updates=10, eval_interval=10)
    fp32 = train(tiny_config(tmp_path / "fp32", text_file, precision="fp32", **kw), progress=False)
    bf16 = train(tiny_config(tmp_path / "bf16", text_file, precision="bf16", **kw), progress=False)
    assert "in bf16 (asked for with --precision bf16" in caplog.text  # the run's announcement
    assert math.isfinite(bf16.best_val_loss) and abs(bf16.best_val_loss - fp32.best_val_loss) < 0.1
    # autocast: the weights stay fp32, so the saved model and resumable state are the same format
    assert all(t.dtype == torch.float32 for t in ckpt.load_model(tmp_path / "bf16")[0].state_dict().values())
    state = torch.load(tmp_path / "bf16" / layout.TRAIN_STATE, weights_only=True)
    assert state["config"]["precision"] == "bf16"


@pytest.mark.skipif(
    not prec.cpu_info().native_bf16,
    reason="this CPU has no native bf16 (avx512_bf16/amx_bf16): emulated bf16 is far too slow for 2 x 200 steps",
)
def test_bf16_and_fp32_loss_curves_agree(tmp_path, text_file):
    """Quality is not traded away: 200 steps each, the same batches; the curves agree within 0.05 nats."""
    curves = {}
    for name in ("fp32", "bf16"):
        history: list[float] = []
        cfg = tiny_config(tmp_path / name, text_file, precision=name, n_updates=200, eval_interval=50)
        train(cfg, progress=False, loss_history=history)
        curves[name] = history
    means = {k: [sum(v[i : i + 20]) / 20 for i in range(0, 200, 20)] for k, v in curves.items()}  # smoothed
    assert max(abs(a - b) for a, b in zip(means["fp32"], means["bf16"], strict=True)) < 0.05


# ---------------------------------------------------------------------------------------------
# the loop without a per-step host-device sync


def test_reading_the_loss_now_and_then_changes_nothing(tmp_path, text_file):
    """The loss read every 5th step (and before every eval and save) gives the same per-step losses, metrics,
    weights and optimizer state as a read every step (what the loop did before: .item() after each step)."""
    runs = {}
    for every in (1, 5):
        history: list[float] = []
        out = tmp_path / f"every{every}"
        cfg = tiny_config(out, text_file, n_updates=16, eval_interval=8, checkpoint_interval=8)
        train(cfg, progress=False, loss_history=history, loss_read_every=every)
        runs[every] = (history, metrics(out), final_state(out))  # metrics without the clock
    (h1, m1, s1), (h7, m7, s7) = runs[1], runs[5]
    assert len(h1) == 16 and all(math.isfinite(x) for x in h1)
    assert h1 == h7 and m1 == m7 and [m["step"] for m in m1 if m["kind"] == "eval"] == [0, 8, 16]
    assert_same_tensors(s1["model"], s7["model"])
    assert_same_tensors(s1["optimizer"]["state"], s7["optimizer"]["state"])


def test_loss_sums_kept_on_the_device_have_a_dtype_it_has():
    """The loop sums losses on the training device in float64, which MPS (Apple GPUs) does not have: there the
    sums are float32 (a float64 tensor on MPS is an error, at the first step). No MPS here: the rule is checked,
    and the float64 it keeps on CPU and CUDA is what the test above runs."""
    assert sum_dtype(torch.device("mps")) == torch.float32
    assert sum_dtype(torch.device("cpu")) == sum_dtype(torch.device("cuda")) == torch.float64


def test_a_diverged_step_read_late_is_named_and_nothing_after_it_is_saved(tmp_path, text_file):
    errors = {}
    for every in (1, 7):
        out = tmp_path / f"every{every}"
        cfg = tiny_config(out, text_file, learning_rate=1e30, n_updates=20, checkpoint_interval=3)
        with pytest.raises(ChargptError) as e:
            train(cfg, progress=False, loss_read_every=every)
        errors[every] = str(e.value)
        if (out / layout.TRAIN_STATE).exists():
            saved = torch.load(out / layout.TRAIN_STATE, weights_only=True)
            assert all(torch.isfinite(t).all() for t in saved["model"].values())  # diverged weights never saved
    assert errors[1].replace("every1", "") == errors[7].replace("every7", "")  # the same step, the same line
    assert "the loss became" in errors[1] and "\n" not in errors[1]


def test_state_saved_by_time_and_on_exit(tmp_path, text_file):
    cfg = tiny_config(tmp_path / "m", text_file, checkpoint_interval=0, checkpoint_seconds=60.0, n_updates=12)
    assert not save_due(cfg, RunState(step=20, elapsed=59.0, saved_at=0.0))
    assert save_due(cfg, RunState(step=21, elapsed=70.0, saved_at=9.0))
    steps = tiny_config(tmp_path / "m", text_file, checkpoint_interval=5)
    assert save_due(steps, RunState(step=10)) and not save_due(steps, RunState(step=11))
    result = train(cfg, progress=False)  # a 12-step run never reaches 60 s: saved once, at the end
    assert torch.load(tmp_path / "m" / layout.TRAIN_STATE, weights_only=True)["step"] == result.step == 12


# ---------------------------------------------------------------------------------------------
# sampling and eval


def test_sample_and_eval_take_precision(trained_model_dir, corpus_text, capsys):
    model, tokenizer = ckpt.load_model(trained_model_dir)
    text = corpus_text[:3000]
    scores = {name: evaluate(model, tokenizer, text, precision=name)["loss"] for name in ("fp32", "bf16", "auto")}
    assert abs(scores["fp32"] - scores["bf16"]) < 0.05 and scores["fp32"] != scores["bf16"]  # bf16 really ran
    if not prec.cpu_info().native_bf16:
        assert scores["auto"] == scores["fp32"]
    texts = {
        name: generate(model, tokenizer, "\n", max_new_tokens=30, seed=3, precision=name) for name in ("fp32", "bf16")
    }
    assert all(len(t[0]) == 30 for t in texts.values())
    rc, out, err = call_main(["sample", "--model", str(trained_model_dir), "--seed", "3", "--max-new-tokens", "20",
                              "--precision", "bf16", "--no-stream"], capsys)  # fmt: skip
    assert rc == 0 and len(out) > 20, err
    rc, out, err = call_main(["eval", "--model", str(trained_model_dir), "--data", "x.txt", "--precision", "fp16"],
                             capsys)  # fmt: skip
    assert_one_line_error(rc, out, err, "fp16")


# ---------------------------------------------------------------------------------------------
# auto timed on the real work (a Probe), and a CPU with native bf16 simulated on any machine


def _sleeper(fp32_s: float, bf16_s: float, calls: list[str]) -> prec.Probe:
    """Work whose speed in each format is known: it sleeps that long (a real callable, timed for real)."""

    def run(choice: prec.Choice) -> None:
        calls.append(choice.name)
        time.sleep(fp32_s if choice.name == "fp32" else bf16_s)

    return prec.Probe(f"sleep {fp32_s} {bf16_s}", run, budget_s=0.05)


def test_the_probe_times_both_formats_alternating_and_keeps_the_faster(tmp_path):
    calls: list[str] = []
    ratio = prec.time_probe(_sleeper(0.004, 0.002, calls))
    assert 1.5 < ratio < 2.5 and calls[:4] == ["fp32", "bf16", "fp32", "bf16"]
    assert prec.choose_measured("train", ZEN5, ratio).name == "bf16"
    slow_ratio = prec.time_probe(_sleeper(0.002, 0.004, []))
    slow = prec.choose_measured("train", ZEN5, slow_ratio)
    assert 0.35 < slow_ratio < 0.65, slow_ratio  # sleeps overshoot on a busy machine: 0.49 seen, not always 0.5
    assert slow.name == "fp32" and f"a training step of this model measured only {slow_ratio:.2f}x" in slow.reason


def test_auto_with_a_probe_is_measured_once_per_machine_and_shape(tmp_path, monkeypatch):
    """On a CPU with native bf16 (simulated here: the choice needs only its description) auto times the probe,
    caches the ratio under the probe's key, and reads it back next time without running the work."""
    monkeypatch.setattr(prec, "cpu_info", lambda: ZEN5)
    calls: list[str] = []
    first = prec.resolve("auto", "cpu", "train", cache=tmp_path, probe=_sleeper(0.004, 0.002, calls))
    assert first.name == "bf16" and calls
    calls.clear()
    again = prec.resolve("auto", "cpu", "train", cache=tmp_path, probe=_sleeper(0.004, 0.002, calls))
    assert again == first and not calls  # from the cache
    other = prec.resolve("auto", "cpu", "train", cache=tmp_path, probe=_sleeper(0.002, 0.004, calls))
    assert other.name == "fp32" and calls  # another shape: another key, measured
    assert len(list(tmp_path.iterdir())) == 2
    # asked for explicitly, or on a CPU without native bf16: nothing is timed
    calls.clear()
    assert prec.resolve("fp32", "cpu", "train", cache=tmp_path, probe=_sleeper(1, 1, calls)).name == "fp32"
    monkeypatch.setattr(prec, "cpu_info", lambda: ZEN3)
    assert prec.resolve("auto", "cpu", "train", cache=tmp_path, probe=_sleeper(1, 1, calls)).name == "fp32"
    assert not calls


def test_a_short_runs_quick_measurement_does_not_decide_a_longer_runs_format(tmp_path, monkeypatch):
    """A probe times for as long as its run can afford (a 10 s run a tenth of a second, not seconds): its ratio is
    cached with that time, reused by runs that afford no more, and measured again by a run that affords more."""
    monkeypatch.setattr(prec, "cpu_info", lambda: ZEN5)
    calls: list[str] = []
    quick = dataclasses.replace(_sleeper(0.004, 0.002, calls), budget_s=0.005)
    assert prec.resolve("auto", "cpu", "train", cache=tmp_path, probe=quick).name == "bf16"
    assert calls == ["fp32", "bf16"] * 2  # the warm-ups, then the one round that 0.005 s allows
    (entry,) = tmp_path.iterdir()
    assert json.loads(entry.read_text())["budget_s"] == 0.005
    calls.clear()
    assert prec.resolve("auto", "cpu", "train", cache=tmp_path, probe=quick).name == "bf16" and not calls
    longer = dataclasses.replace(quick, budget_s=0.05)
    assert prec.resolve("auto", "cpu", "train", cache=tmp_path, probe=longer).name == "bf16"
    assert len(calls) > 4 and json.loads(entry.read_text())["budget_s"] == 0.05  # measured again, and kept
    calls.clear()
    assert prec.resolve("auto", "cpu", "train", cache=tmp_path, probe=quick).name == "bf16" and not calls
    saved = json.loads(entry.read_text())
    for damaged in (True, -1, "long", None):
        entry.write_text(json.dumps({**saved, "budget_s": damaged}))
        calls.clear()
        prec.resolve("auto", "cpu", "train", cache=tmp_path, probe=quick)
        assert calls, damaged  # measured again
    entry.write_text(json.dumps({k: v for k, v in saved.items() if k != "budget_s"}))
    calls.clear()
    prec.resolve("auto", "cpu", "train", cache=tmp_path, probe=dataclasses.replace(quick, budget_s=2.5))
    assert not calls  # measured before budgets were recorded: as long as the default


def test_a_budgeted_run_times_its_formats_for_a_share_of_its_budget(tmp_path, text_file, monkeypatch):
    monkeypatch.setattr(prec, "cpu_info", lambda: ZEN5)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    train(tiny_config(tmp_path / "run", text_file, n_updates=None, max_time=3.0, precision="auto"), progress=False)
    timed = [json.loads(p.read_text()) for p in (tmp_path / "cache" / "chargpt").glob("precision-*-*.json")]
    assert sorted((t["key"].split()[0], t["budget_s"]) for t in timed) == [("eval", 0.012), ("train", 0.03)]


def test_a_simulated_bf16_cpu_leaves_pinned_runs_and_the_run_itself_untouched(tmp_path, text_file, monkeypatch):
    """What makes the suite pass on any CPU: tests that assert fp32 figures pin --precision fp32, and auto's
    timing of the real step (which runs on a CPU with native bf16, simulated here) changes nothing in the run:
    it takes no optimizer step, keeps no gradients and restores the random streams (dropout is on)."""
    kw = dict(n_updates=12, eval_interval=6, checkpoint_interval=6, dropout=0.1)
    train(tiny_config(tmp_path / "plain", text_file, **kw), progress=False)
    monkeypatch.setattr(prec, "cpu_info", lambda: ZEN5)
    monkeypatch.setattr(prec, "MIN_SPEEDUP", math.inf)  # whatever it measures, auto keeps fp32 here
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # measured now, not read from a cache
    train(tiny_config(tmp_path / "pinned", text_file, **kw), progress=False)
    train(tiny_config(tmp_path / "auto", text_file, precision="auto", **kw), progress=False)
    assert list((tmp_path / "cache" / "chargpt").glob("precision-*-*.json"))  # the real step was timed
    for name in ("pinned", "auto"):
        assert metrics(tmp_path / name) == metrics(tmp_path / "plain")
        assert_same_tensors(final_state(tmp_path / name)["model"], final_state(tmp_path / "plain")["model"])
        assert_same_tensors(final_state(tmp_path / name)["rng"], final_state(tmp_path / "plain")["rng"])


def test_kernels_held_at_avx2_count_as_a_cpu_without_bf16():
    """An AVX2-only CPU is reproduced on a larger one by holding the kernels at AVX2 (ATEN_CPU_CAPABILITY=avx2
    MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2). bf16 is then emulated, so chargpt must decide as on a CPU
    without it: Muon's orthogonalisation in fp32 (in bf16, the sized 128x4 shape's step took 726 ms there instead
    of 224 ms on EPYC-512, three quarters of it in the optimizer), auto's formats fp32 without a measurement."""
    held = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    code = (
        "import torch; from chargpt.machine import precision as p; from chargpt.training.optim import ns_dtype; "
        "print(p.cpu_info().native_bf16, ns_dtype(torch.device('cpu')), p.resolve('auto', 'cpu', 'train').name)"
    )
    for env in (held, {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE"}, {"DNNL_MAX_CPU_ISA": "avx2"}):
        r = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert r.stdout.split() == ["[]", "torch.float32", "fp32"], (env, r.stdout)
