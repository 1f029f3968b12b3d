"""chargpt.training.optim: Muon for the blocks' matrices beside AdamW, the WSD and cosine schedules, exact resume
with both."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from chargpt.config import TrainConfig
from chargpt.errors import ChargptError
from chargpt.machine.precision import cpu_info
from chargpt.model import build_model
from chargpt.training.loop import train
from chargpt.training.optim import (
    Muon,
    Pair,
    budget_grew,
    in_final_decay,
    learning_rate,
    make_optimizer,
    ns_dtype,
    orthogonalize,
)
from chargpt.training.settings import resume_config
from helpers import assert_same_tensors, final_state, metrics, small

CPU = torch.device("cpu")


def model_and_optimizer(**kw):
    cfg = TrainConfig(block_size=16, n_embd=32, n_heads=4, n_layers=2, **kw)
    torch.manual_seed(0)
    model = build_model(cfg.model_config(vocab_size=20))
    return cfg, model, make_optimizer(model, cfg, CPU)


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    _, model, opt = model_and_optimizer(optimizer="muon")
    assert isinstance(opt, Pair)
    names = {id(p): n for n, p in model.named_parameters()}
    in_muon = sorted(names[id(p)] for g in opt.muon.param_groups for p in g["params"])
    in_adamw = sorted(names[id(p)] for g in opt.adamw.param_groups for p in g["params"])
    per_block = ["attn.proj.weight", "attn.qkv.weight", "ffwd.down.weight", "ffwd.up.weight"]
    assert in_muon == [f"blocks.{i}.{n}" for i in range(2) for n in per_block]
    assert sorted(in_muon + in_adamw) == sorted(names.values())  # every parameter, once
    assert {"tok_emb.weight", "pos_emb.weight", "head.weight", "head.bias", "ln_f.weight"} <= set(in_adamw)
    qkv = [g for g in opt.muon.param_groups if g["split"] == 3][0]["params"]
    assert [names[id(p)] for p in qkv] == ["blocks.0.attn.qkv.weight", "blocks.1.attn.qkv.weight"]
    # AdamW alone is the plain torch optimizer (its saved state is what older runs hold), as is a bigram's
    assert isinstance(model_and_optimizer()[2], torch.optim.AdamW)
    assert isinstance(model_and_optimizer(optimizer="muon", arch="bigram")[2], torch.optim.AdamW)


def test_orthogonalize_brings_singular_values_near_one():
    g = (
        torch.randn(3, 64, 48, generator=torch.Generator().manual_seed(1))
        * torch.tensor([1e-3, 1.0, 50.0])[:, None, None]
    )
    for dtype in (torch.float32, torch.bfloat16):
        s = torch.linalg.svdvals(orthogonalize(g, dtype))
        assert s.min() > 0.5 and s.max() < 1.4, (dtype, s.min(), s.max())  # whatever the gradient's scale
    one = orthogonalize(g[1:2], torch.float32)
    assert torch.equal(orthogonalize(g, torch.float32)[1:2], one)  # each matrix of the batch on its own


def test_muon_orthogonalises_query_key_and_value_apart_and_matches_adamw_update_size():
    """The fused QKV weight is three matrices: its update is three orthogonal blocks; every update's RMS is
    about 0.2 x lr, the size of an AdamW update, so one learning rate serves both."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(96, 32) * 0.02)
    v = torch.nn.Parameter(torch.randn(128, 32) * 0.02)
    opt = Muon([{"params": [w], "split": 3}, {"params": [v], "split": 1}], lr=0.01, weight_decay=0.0,
               ns_dtype=torch.float32)  # fmt: skip
    w.grad, v.grad = torch.randn(96, 32), torch.randn(128, 32)
    w0, v0 = w.detach().clone(), v.detach().clone()
    opt.step()
    dw, dv = (w.detach() - w0) / -0.01, (v.detach() - v0) / -0.01
    for block in dw.view(3, 32, 32):
        s = torch.linalg.svdvals(block / (0.2 * 32**0.5))  # a random square block has a tiny singular value
        assert s.max() < 1.4 and (s > 0.5).float().mean() > 0.9  # that five Newton-Schulz steps leave small
    whole = torch.linalg.svdvals(dw / (0.2 * 32**0.5))
    assert whole.max() > 1.5  # three orthogonal blocks stacked: the 96x32 whole is not orthogonal (sqrt(3))
    for update in (dw, dv):
        assert 0.12 < update.pow(2).mean().sqrt() < 0.3


def test_muon_decays_its_matrices_by_lr_times_weight_decay():
    w = torch.nn.Parameter(torch.ones(8, 8))
    opt = Muon([{"params": [w]}], lr=0.1, weight_decay=0.5, ns_dtype=torch.float32)
    w.grad = torch.zeros(8, 8)  # no gradient: only the decay acts
    opt.step()
    assert torch.allclose(w.detach(), torch.full((8, 8), 0.95))


def test_ns_dtype_is_bf16_only_where_this_cpu_has_it_natively():
    assert ns_dtype(CPU) == (torch.bfloat16 if cpu_info().native_bf16 else torch.float32)
    assert ns_dtype(torch.device("meta")) == torch.float32


def test_wsd_is_flat_then_decays_linearly_to_the_floor():
    cfg = TrainConfig(n_updates=100, warmup_updates=10, learning_rate=1.0, schedule="wsd", decay_fraction=0.3,
                      min_lr_ratio=0.0)  # fmt: skip
    lr = [learning_rate(cfg, s, 0.0) for s in range(101)]
    assert lr[0] == pytest.approx(0.1) and lr[9] == pytest.approx(1.0)  # warm-up
    assert lr[10:71] == [1.0] * 61  # stable until 70% of the budget
    assert lr[85] == pytest.approx(0.5) and lr[100] == 0.0  # linear to the floor at the end
    assert lr[70:] == sorted(lr[70:], reverse=True)
    # a time budget drives it the same way: half the clock is still flat, 85% is halfway down
    timed = dataclasses.replace(cfg, n_updates=10**9, max_time=200.0, min_lr_ratio=0.1)
    assert learning_rate(timed, 50, 100.0) == 1.0
    assert learning_rate(timed, 50, 170.0) == pytest.approx(0.1 + 0.9 * 0.5)
    assert learning_rate(timed, 50, 250.0) == pytest.approx(0.1)
    # a resumed run whose budget grew after its rate decayed: back up to the peak over warmup_updates steps from
    # the anchor's rate, flat again, then the decay over the new end
    ramp = [learning_rate(cfg, s, 0.0, anchor=(40, 0.0, 0.6)) for s in range(40, 101)]
    assert ramp[0] == pytest.approx(0.64) and ramp[9] == pytest.approx(1.0) and ramp[:10] == sorted(ramp[:10])
    assert ramp[10:40] == [1.0] * 30 and ramp[-1] == 0.0


def test_a_larger_budget_branches_only_where_it_asks_for_more():
    base = TrainConfig(n_updates=100, warmup_updates=10, schedule="wsd", decay_fraction=0.3)
    assert budget_grew(base, dataclasses.replace(base, n_updates=200))
    assert not budget_grew(base, base) and not budget_grew(base, dataclasses.replace(base, n_updates=50))
    timed = dataclasses.replace(base, n_updates=10**9, max_time=100.0)
    assert budget_grew(timed, dataclasses.replace(timed, max_time=300.0))
    assert budget_grew(timed, dataclasses.replace(timed, max_time=0.0))  # no time limit: more
    assert not budget_grew(base, dataclasses.replace(base, n_updates=200, max_time=60.0))  # a new limit: less
    # WSD's final decay starts at 70% of the budget; a cosine schedule has no flat stretch to go back to
    assert not in_final_decay(base, 70, 0.0) and in_final_decay(base, 71, 0.0)
    assert not in_final_decay(dataclasses.replace(base, schedule="cosine"), 90, 0.0)
    assert in_final_decay(timed, 5_000, 71.0) and not in_final_decay(timed, 5_000, 69.0)


@pytest.mark.parametrize("optimizer,schedule", [("muon", "wsd"), ("adamw", "wsd"), ("muon", "cosine")])
def test_pause_and_resume_is_bit_identical(text_file: Path, tmp_path: Path, optimizer: str, schedule: str):
    settings = dict(n_updates=16, optimizer=optimizer, schedule=schedule, decay_fraction=0.5, checkpoint_interval=4)
    whole, paused = tmp_path / "whole", tmp_path / "paused"
    train(small(whole, text_file, **settings), progress=False)
    assert train(small(paused, text_file, **settings), progress=False, pause_after=6).step == 6
    train(resume_config(str(paused)), resume=True, progress=False)
    ref, got = final_state(whole), final_state(paused)
    for part in ("model", "optimizer", "rng"):
        assert_same_tensors(ref[part], got[part], part)
    assert metrics(whole) == metrics(paused)
    evals = [m["val_loss"] for m in metrics(whole) if m["kind"] == "eval"]
    assert evals[-1] < evals[0] - 0.3  # it learns
    if optimizer == "muon":
        assert set(got["optimizer"]) == {"muon", "adamw"}


def test_the_optimizer_cannot_change_on_resume(text_file: Path, tmp_path: Path):
    out = tmp_path / "run"
    train(small(out, text_file, n_updates=4), progress=False)
    with pytest.raises(ChargptError, match="optimizer cannot change on resume"):
        resume_config(str(out), optimizer="muon")
