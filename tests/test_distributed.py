"""DDP on CPU with gloo: N processes with the global batch B train exactly like one process with B.

Every multi-process test launches real processes (torchrun, or torch.multiprocessing with a gloo group on
127.0.0.1) and has a timeout, so a rank that hangs fails the test instead of the CI job.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from chargpt.errors import ChargptError
from chargpt.storage import checkpoint as ckpt
from chargpt.storage import trainstate
from chargpt.training.loop import train
from conftest import LAUNCH_TIMEOUT, read_metrics, run_cli, spawn_gloo_ranks, tiny_config

RTOL = 1e-5
ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE", "GROUP_RANK")
# shorter than tiny_config's default, still three evaluations (10, 20, 24); at learning_rate 3e-3 Adam amplifies
# float rounding (the sums run in another order) past 1e-5 by step 24, at 1e-3 it stays near 3e-6
SMALL = dict(n_updates=24, eval_interval=10, checkpoint_interval=10, warmup_updates=4, learning_rate=1e-3)


@pytest.fixture(autouse=True)
def _no_launch_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The in-process single runs must not see a torchrun environment (CI could run under one)."""
    for key in ENV_KEYS:
        monkeypatch.delenv(key, raising=False)


@pytest.fixture(scope="module")
def single(text_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference: one process, global batch 16, no accumulation."""
    out = tmp_path_factory.mktemp("single") / "m"
    with pytest.MonkeyPatch.context() as mp_env:
        for key in ENV_KEYS:
            mp_env.delenv(key, raising=False)
        train(tiny_config(out, text_file, **SMALL), progress=False)
    return out


def _final_state(out: Path) -> dict[str, torch.Tensor]:
    """The weights after the last step (train_state.pt, not only the best-val snapshot) and AdamW's moments:
    Adam's step hardly changes when every gradient is scaled by the same factor, its moments do."""
    state = trainstate.load_train_state(out)
    moments = {
        f"adam.{i}.{key}": value
        for i, s in state.optimizer["state"].items()
        for key, value in s.items()
        if key in ("exp_avg", "exp_avg_sq")
    }
    return {**state.model, **moments}


def _rel(a: float | torch.Tensor, b: float | torch.Tensor) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def assert_same_run(a: Path, b: Path) -> float:
    """Same loss curve and same final weights within RTOL (relative to each tensor's scale); returns the worst."""
    ma, mb = read_metrics(a), read_metrics(b)
    assert [m["step"] for m in ma] == [m["step"] for m in mb]
    worst = 0.0
    for x, y in zip(ma, mb, strict=True):
        for key in ("train_loss", "val_loss"):
            worst = max(worst, _rel(x[key], y[key]))
            assert _rel(x[key], y[key]) < RTOL, (key, x, y)
    wa, wb = _final_state(a), _final_state(b)
    assert wa.keys() == wb.keys() and any(k.startswith("adam.") for k in wa)
    for name in wa:
        worst = max(worst, _rel(wa[name], wb[name]))
        assert _rel(wa[name], wb[name]) < RTOL, name
    # and training did something: the weights moved and the loss fell
    assert ma[-1]["val_loss"] < ma[0]["val_loss"]
    return worst


def _spawned_rank(rank: int, world: int, port: int, cfg_kwargs: dict, results: dict) -> None:
    """One rank launched the way torchrun would: the env variables, then the library's train()."""
    import torch.distributed as dist

    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    cfg = tiny_config(**cfg_kwargs)
    result = train(cfg, progress=False)
    # train() created the process group, so it must have destroyed it again
    results[rank] = (result.rank, result.step, result.best_val_loss, dist.is_initialized())


# ---------------------------------------------------------------------------------------------
# equivalence


def test_gradient_accumulation_equals_the_double_micro_batch(single, text_file, tmp_path):
    """accum=2 with two micro-batches of 8 == one batch of 16 (and train() runs again in the same process)."""
    result = train(tiny_config(tmp_path / "accum", text_file, gradient_accumulation_steps=2, **SMALL), progress=False)
    assert result.step == SMALL["n_updates"] and result.stopped_by == "n_updates"
    worst = assert_same_run(tmp_path / "accum", single)
    print(f"accum=2 vs accum=1: max relative diff {worst:.2e}")


@pytest.mark.end_to_end
def test_two_spawned_gloo_ranks_with_accumulation_equal_one_process(single, text_file, tmp_path):
    """2 ranks x 2 micro-batches of 4 (torch.multiprocessing, gloo on 127.0.0.1) == 1 process, batch 16."""
    cfg_kwargs = dict(out=str(tmp_path / "ddp"), data=str(text_file), gradient_accumulation_steps=2, **SMALL)
    results = spawn_gloo_ranks(_spawned_rank, cfg_kwargs)
    assert {r: v[0] for r, v in results.items()} == {0: 0, 1: 1}
    assert results[0][1:3] == results[1][1:3]  # same step, same best val loss on both ranks
    assert not results[0][3] and not results[1][3], "train() left its process group behind"
    worst = assert_same_run(tmp_path / "ddp", single)
    print(f"2 ranks x accum 2 vs 1 process: max relative diff {worst:.2e}")


@pytest.mark.end_to_end
def test_cli_nproc_2_trains_like_one_process_and_only_rank_0_writes(single, text_file, tmp_path):
    """`chargpt train --nproc 2` (torchrun, gloo) == one process; one model dir, one set of metrics, one bar."""
    cfg = tiny_config(single, text_file, **SMALL)
    keys = "block_size n_embd n_heads n_layers dropout batch_size n_updates learning_rate warmup_updates"
    keys += " eval_interval eval_iters checkpoint_interval seed precision"
    flags = [arg for key in keys.split() for arg in (f"--{key.replace('_', '-')}", str(getattr(cfg, key)))]
    out = tmp_path / "ddp"
    r = run_cli(
        "train", "--nproc", "2", "--data", str(text_file), "--out", str(out), "--device", "cpu", *flags,
        cwd=tmp_path, timeout=LAUNCH_TIMEOUT,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    # rank 0 alone reports, logs and draws the progress bar
    assert r.stdout.count("done: 24 steps") == 1, r.stdout
    assert r.stderr.count("step 10: train loss") == 1, r.stderr
    assert r.stderr.count("step 24: train loss") == 1, r.stderr
    assert r.stderr.count("training a GPT of ") == 1 and r.stderr.count("step 0: train loss") == 1
    # stderr is a pipe here: no progress bar redrawn in place (rank 0 would write plain progress lines)
    assert "\r" not in r.stderr
    assert "Traceback" not in r.stderr
    # one model directory, nothing written anywhere else, no duplicate metrics lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp"]
    assert {"model.safetensors", "config.json", "train_state.pt", "metrics.jsonl", "loss.png"} <= {
        p.name for p in out.iterdir()
    }
    assert [m["step"] for m in read_metrics(out)] == [0, 10, 20, 24]
    worst = assert_same_run(out, single)
    print(f"torchrun 2 ranks vs 1 process: max relative diff {worst:.2e}")
    # the model it wrote is a normal model directory
    model, tokenizer = ckpt.load_model(out, torch.device("cpu"))
    assert tokenizer.vocab_size == model.config.vocab_size


# ---------------------------------------------------------------------------------------------
# errors


def test_batch_not_divisible_by_accumulation_is_a_clear_error(text_file, tmp_path):
    with pytest.raises(ChargptError, match=r"batch_size 16 must divide by world size 1 x gradient_accumulation"):
        train(tiny_config(tmp_path / "m", text_file, gradient_accumulation_steps=3), progress=False)
    assert not (tmp_path / "m").exists()


def test_nproc_rejects_an_indivisible_batch_before_launching(text_file, tmp_path):
    r = run_cli(
        "train", "--nproc", "2", "--data", str(text_file), "--out", str(tmp_path / "m"), "--device", "cpu",
        "--batch-size", "6", "--gradient-accumulation-steps", "2", timeout=60,
    )  # fmt: skip
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("chargpt: error: batch_size 6 must divide by world size 2"), lines
    assert not (tmp_path / "m").exists()


@pytest.mark.end_to_end
def test_torchrun_with_an_indivisible_batch_fails_on_every_rank_without_hanging(text_file, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "chargpt",
           "train", "--data", str(text_file), "--out", str(tmp_path / "m"), "--device", "cpu", "--batch-size", "5",
           "--n-updates", "2"]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT, cwd=tmp_path)
    assert r.returncode != 0
    assert "chargpt: error: batch_size 5 must divide by world size 2" in r.stderr
    assert not (tmp_path / "m").exists()


@pytest.mark.end_to_end
def test_an_error_on_rank_0_only_does_not_hang_rank_1(text_file, tmp_path):
    """Rank 0 alone checks that --out is writable; rank 1 must be torn down, not wait for it forever."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "chargpt",
           "train", "--data", str(text_file), "--out", str(blocker / "m"), "--device", "cpu", "--batch-size", "4",
           "--block-size", "16", "--n-embd", "16", "--n-heads", "2", "--n-layers", "1", "--n-updates", "5"]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT, cwd=tmp_path)
    assert r.returncode != 0
    assert "chargpt: error: cannot write to" in r.stderr


FULL_ENV = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}


@pytest.mark.parametrize(
    "env, message",
    [
        ({"WORLD_SIZE": "2"}, "RANK"),  # the classic: WORLD_SIZE exported by hand, no launcher
        ({**FULL_ENV, "MASTER_PORT": None}, "MASTER_PORT not set"),
        ({**FULL_ENV, "RANK": "2"}, "RANK=2 is outside WORLD_SIZE=2"),
    ],
)
def test_a_broken_launch_environment_is_one_line_and_exit_2(env, message, text_file, tmp_path, monkeypatch):
    for key, value in env.items():
        if value is not None:
            monkeypatch.setenv(key, value)
    r = run_cli("train", "--data", str(text_file), "--out", str(tmp_path / "m"), "--device", "cpu", timeout=60)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("chargpt: error: broken distributed launch"), lines
    assert message in lines[0]
    assert not (tmp_path / "m").exists()
