"""The CPU training path: cheap dropout masks and written-out attention with dropout are the same maths
as nn.Dropout and the lecture's masked-softmax attention."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from chargpt.config import GPTConfig
from chargpt.model import GPT, Dropout, attention, dropout_mask


@pytest.mark.parametrize("p", [0.1, 0.2, 0.5])
def test_dropout_mask_rate_and_scale(p: float) -> None:
    torch.manual_seed(0)
    drop, scale = dropout_mask((400, 1000), p, torch.device("cpu"))
    assert drop.dtype == torch.bool and drop.shape == (400, 1000)
    # 400k Bernoulli(p) draws: the rate is within 5 standard deviations of p
    assert abs(drop.float().mean().item() - p) < 5 * math.sqrt(p * (1 - p) / drop.numel())
    assert scale == pytest.approx(1 / (1 - p), rel=1e-4)


def test_dropout_mask_is_seeded_and_not_constant() -> None:
    torch.manual_seed(3)
    a, _ = dropout_mask((64, 64), 0.2, torch.device("cpu"))
    torch.manual_seed(3)
    b, _ = dropout_mask((64, 64), 0.2, torch.device("cpu"))
    c, _ = dropout_mask((64, 64), 0.2, torch.device("cpu"))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # rows are not copies of each other (the four 16-bit lanes of a 64-bit draw are independent)
    assert len({tuple(row.tolist()) for row in a}) == 64


def test_dropout_module_keeps_the_mean_and_is_identity_in_eval() -> None:
    torch.manual_seed(0)
    d = Dropout(0.2)
    x = torch.ones(1000, 1000)
    y = d(x)
    zero, kept = torch.unique(y).tolist()
    assert zero == 0.0 and kept == pytest.approx(1.25, rel=1e-4)
    assert y.mean().item() == pytest.approx(1.0, abs=0.01)
    d.eval()
    assert d(x) is x


def test_attention_with_dropout_equals_the_formula() -> None:
    """Training-mode attention = softmax(causal(QK^T/sqrt(hs))) with the drawn mask applied, times V; and a
    training block draws that mask first, then the residual dropouts."""
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 3, 16, 8).unbind(0)  # (B, H, T, hs) each
    torch.manual_seed(5)
    got = attention(q, k, v, causal=True, dropout=0.3)
    torch.manual_seed(5)
    drop, scale = dropout_mask((2 * 3, 16, 16), 0.3, torch.device("cpu"))
    w = (q @ k.transpose(-2, -1)) / math.sqrt(8)
    w = w.masked_fill(torch.ones(16, 16, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
    want = (w * (~drop).view(2, 3, 16, 16) * scale) @ v
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    cfg = GPTConfig(vocab_size=11, block_size=16, n_embd=24, n_heads=3, n_layers=1, dropout=0.3)
    blk = GPT(cfg).blocks[0].train()
    x = torch.randn(2, 16, 24)
    torch.manual_seed(5)
    y = blk(x)
    torch.manual_seed(5)
    qkv = blk.attn.qkv(F.layer_norm(x, (24,), blk.ln1.weight, blk.ln1.bias))
    q, k, v = (t.view(2, 16, 3, 8).transpose(1, 2) for t in qkv.split(24, dim=2))
    a = blk.attn.proj(attention(q, k, v, causal=True, dropout=0.3).transpose(1, 2).reshape(2, 16, 24))
    drop, scale = dropout_mask((2, 16, 24), 0.3, torch.device("cpu"))  # the residual dropout after proj
    h = x + torch.where(drop, 0.0, a * scale)
    m = blk.ffwd.down(F.relu(blk.ffwd.up(F.layer_norm(h, (24,), blk.ln2.weight, blk.ln2.bias))))
    drop, scale = dropout_mask((2, 16, 24), 0.3, torch.device("cpu"))
    torch.testing.assert_close(y, h + torch.where(drop, 0.0, m * scale), rtol=1e-5, atol=1e-5)


def test_training_path_without_dropout_matches_eval_path() -> None:
    """With dropout 0, train and eval forward give the same logits (the fused SDPA path both ways)."""
    cfg = GPTConfig(vocab_size=11, block_size=16, n_embd=24, n_heads=3, n_layers=2, dropout=0.0)
    torch.manual_seed(0)
    model = GPT(cfg)
    idx = torch.randint(0, 11, (3, 16))
    train_logits, _ = model.train()(idx)
    eval_logits, _ = model.eval()(idx)
    torch.testing.assert_close(train_logits, eval_logits)


def test_gradients_flow_through_the_dropout_path() -> None:
    cfg = GPTConfig(vocab_size=11, block_size=16, n_embd=24, n_heads=3, n_layers=1, dropout=0.2)
    torch.manual_seed(0)
    model = GPT(cfg).train()
    idx = torch.randint(0, 11, (2, 16))
    _, loss = model(idx, idx)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_a_dropout_just_below_one_keeps_a_finite_scale():
    """dropout 0.999999 is in [0, 1): it rounded to 'drop everything' and divided by zero."""
    drop, scale = dropout_mask((64, 64), 0.999999, torch.device("cpu"))
    assert scale == 65536.0 and drop.float().mean() > 0.99
