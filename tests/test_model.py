"""The GPT: parameter count, fused heads = the lecture's per-head attention, causality, bigram, save/load."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from chargpt.config import GPTConfig
from chargpt.data.tokenizer import CharTokenizer
from chargpt.model import GPT, BigramLM, build_model, shapes_only
from chargpt.storage.checkpoint import load_model, save_model

# ---------------------------------------------------------------------------------------------
# The lecture's per-head implementation ("Let's build GPT"), written out independently.


class Head(nn.Module):
    def __init__(self, n_embd: int, head_size: int, block_size: int):
        super().__init__()
        self.key = nn.Linear(n_embd, head_size, bias=False)
        self.query = nn.Linear(n_embd, head_size, bias=False)
        self.value = nn.Linear(n_embd, head_size, bias=False)
        self.register_buffer("tril", torch.tril(torch.ones(block_size, block_size)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        k = self.key(x)  # (B, T, hs)
        q = self.query(x)  # (B, T, hs)
        wei = q @ k.transpose(-2, -1) * k.shape[-1] ** -0.5  # (B, T, T)
        wei = wei.masked_fill(self.tril[:T, :T] == 0, float("-inf"))
        wei = F.softmax(wei, dim=-1)
        return wei @ self.value(x)  # (B, T, hs)


class MultiHeadAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.heads = nn.ModuleList(Head(cfg.n_embd, cfg.head_size, cfg.block_size) for _ in range(cfg.n_heads))
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(torch.cat([h(x) for h in self.heads], dim=-1))


class RefBlock(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.sa = MultiHeadAttention(cfg)
        self.ffwd = nn.Sequential(
            nn.Linear(cfg.n_embd, 4 * cfg.n_embd), nn.ReLU(), nn.Linear(4 * cfg.n_embd, cfg.n_embd)
        )
        self.ln1 = nn.LayerNorm(cfg.n_embd)
        self.ln2 = nn.LayerNorm(cfg.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.sa(self.ln1(x))
        return x + self.ffwd(self.ln2(x))


class ReferenceGPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.token_embedding_table = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.position_embedding_table = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.blocks = nn.Sequential(*[RefBlock(cfg) for _ in range(cfg.n_layers)])
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        B, T = idx.shape
        x = self.token_embedding_table(idx) + self.position_embedding_table(torch.arange(T))  # (B, T, C)
        return self.lm_head(self.ln_f(self.blocks(x)))  # (B, T, vocab)


@torch.no_grad()
def copy_into_reference(model: GPT, ref: ReferenceGPT) -> None:
    """Fused qkv rows [0:C) are the queries of heads 0..H-1 in order, [C:2C) the keys, [2C:3C) the values."""
    cfg = model.config
    C, hs = cfg.n_embd, cfg.head_size
    ref.token_embedding_table.weight.copy_(model.tok_emb.weight)
    ref.position_embedding_table.weight.copy_(model.pos_emb.weight)
    for blk, rb in zip(model.blocks, ref.blocks, strict=True):
        qkv = blk.attn.qkv.weight  # (3C, C)
        for h, head in enumerate(rb.sa.heads):
            rows = slice(h * hs, (h + 1) * hs)
            head.query.weight.copy_(qkv[:C][rows])
            head.key.weight.copy_(qkv[C : 2 * C][rows])
            head.value.weight.copy_(qkv[2 * C :][rows])
        rb.sa.proj.load_state_dict(blk.attn.proj.state_dict())
        rb.ffwd[0].load_state_dict(blk.ffwd.up.state_dict())
        rb.ffwd[2].load_state_dict(blk.ffwd.down.state_dict())
        rb.ln1.load_state_dict(blk.ln1.state_dict())
        rb.ln2.load_state_dict(blk.ln2.state_dict())
    ref.ln_f.load_state_dict(model.ln_f.state_dict())
    ref.lm_head.load_state_dict(model.head.state_dict())


def randomize(model: nn.Module, seed: int) -> None:
    """Non-trivial values everywhere (the init leaves biases at 0 and LayerNorm gains at 1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


# ---------------------------------------------------------------------------------------------


def test_parameter_count_of_the_seed_model():
    cfg = GPTConfig()
    assert (cfg.vocab_size, cfg.block_size, cfg.n_embd, cfg.n_heads, cfg.n_layers) == (65, 256, 384, 6, 6)
    model = GPT(cfg)
    assert model.num_params() == 10_788_929
    assert sum(p.numel() for p in ReferenceGPT(cfg).parameters()) == 10_788_929  # the lecture's model
    assert model.num_params(non_embedding=True) == 10_788_929 - 65 * 384 - 256 * 384


@pytest.mark.parametrize(
    "shape",
    [
        dict(vocab_size=65, block_size=32, n_embd=48, n_heads=4, n_layers=2),
        dict(vocab_size=11, block_size=16, n_embd=24, n_heads=3, n_layers=3),
        dict(vocab_size=65, block_size=256, n_embd=384, n_heads=6, n_layers=6),  # the seed model
    ],
)
def test_fused_attention_equals_per_head_reference(shape):
    cfg = GPTConfig(dropout=0.2, **shape)  # dropout must be off in eval mode
    torch.manual_seed(0)
    model = GPT(cfg)
    randomize(model, seed=1)
    ref = ReferenceGPT(cfg)
    copy_into_reference(model, ref)
    model.eval()
    ref.eval()
    small = cfg.block_size < 256
    idx = torch.randint(
        0, cfg.vocab_size, (3 if small else 1, cfg.block_size), generator=torch.Generator().manual_seed(2)
    )
    with torch.no_grad():
        for T in (1, 5, cfg.block_size) if small else (cfg.block_size,):
            logits, loss = model(idx[:, :T])
            assert loss is None
            expected = ref(idx[:, :T])
            assert logits.shape == expected.shape == (len(idx), T, cfg.vocab_size)
            assert (logits - expected).abs().max().item() < 1e-5
    # the copy is not vacuous: a swapped query/key layout gives different logits
    with torch.no_grad():
        head = ref.blocks[0].sa.heads[0]
        q = head.query.weight.clone()
        head.query.weight.copy_(head.key.weight)
        head.key.weight.copy_(q)
        assert (model(idx)[0] - ref(idx)).abs().max().item() > 1e-3


def test_attention_is_causal():
    cfg = GPTConfig(vocab_size=20, block_size=16, n_embd=32, n_heads=4, n_layers=2, dropout=0.0)
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    randomize(model, seed=3)
    a = torch.randint(0, 20, (2, 16), generator=torch.Generator().manual_seed(4))
    b = a.clone()
    b[:, 10:] = (b[:, 10:] + 1) % 20  # change only the future of position 9
    with torch.no_grad():
        la, lb = model(a)[0], model(b)[0]
    assert torch.allclose(la[:, :10], lb[:, :10], atol=1e-6)
    assert not torch.allclose(la[:, 10:], lb[:, 10:], atol=1e-3)


def test_loss_is_mean_cross_entropy_and_dropout_only_in_training():
    cfg = GPTConfig(vocab_size=30, block_size=8, n_embd=16, n_heads=2, n_layers=1, dropout=0.5)
    torch.manual_seed(0)
    model = GPT(cfg)
    x = torch.randint(0, 30, (4, 8))
    y = torch.randint(0, 30, (4, 8))
    model.eval()
    with torch.no_grad():
        logits, loss = model(x, y)
        assert torch.allclose(loss, F.cross_entropy(logits.reshape(-1, 30), y.reshape(-1)))
        assert torch.equal(model(x)[0], logits)  # deterministic in eval mode
        model.train()
        assert not torch.equal(model(x)[0], logits)  # dropout is active in training
    # at initialisation the prediction is close to uniform
    assert abs(loss.item() - torch.log(torch.tensor(30.0)).item()) < 0.3
    with pytest.raises(AssertionError):
        model(torch.zeros(1, 9, dtype=torch.long))  # longer than block_size


def test_gradients_reach_every_parameter():
    cfg = GPTConfig(vocab_size=30, block_size=8, n_embd=16, n_heads=2, n_layers=2, dropout=0.0)
    model = GPT(cfg)
    _, loss = model(torch.randint(0, 30, (2, 8)), torch.randint(0, 30, (2, 8)))
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_bigram_model_reads_logits_off_a_table():
    cfg = GPTConfig(vocab_size=7, block_size=8, arch="bigram")
    model = build_model(cfg)
    assert isinstance(model, BigramLM)
    assert model.num_params() == 7 * 7
    idx = torch.tensor([[0, 3, 6, 3]])
    targets = torch.tensor([[3, 6, 3, 1]])
    logits, loss = model(idx, targets)
    table = model.table.weight  # (vocab, vocab)
    assert torch.equal(logits[0], table[idx[0]])
    expected = -torch.stack([table[a].log_softmax(-1)[b] for a, b in zip([0, 3, 6, 3], [3, 6, 3, 1], strict=True)])
    assert torch.allclose(loss, expected.mean())
    # the prediction depends on the last character only
    assert torch.equal(model(torch.tensor([[1, 2, 3]]))[0][0, -1], model(torch.tensor([[5, 3]]))[0][0, -1])


def test_bigram_learns_the_bigram_statistics():
    """Trained to convergence on a deterministic cycle, the table predicts the next character exactly."""
    cfg = GPTConfig(vocab_size=5, block_size=8, arch="bigram")
    torch.manual_seed(0)
    model = BigramLM(cfg)
    data = torch.tensor([0, 2, 4, 1, 3] * 20)
    opt = torch.optim.AdamW(model.parameters(), lr=0.3)
    for _ in range(100):
        _, loss = model(data[None, :-1], data[None, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05
    assert model.table.weight.argmax(-1).tolist() == [2, 3, 4, 0, 1]


def test_build_model_picks_the_type():
    assert isinstance(build_model(GPTConfig(vocab_size=5, block_size=4, n_embd=8, n_heads=2, n_layers=1)), GPT)
    assert isinstance(build_model(GPTConfig(vocab_size=5, arch="bigram")), BigramLM)


@pytest.mark.parametrize("arch", ["gpt", "bigram"])
def test_shapes_only_builds_the_real_models_shapes_without_memory_or_random_draws(arch):
    """What checks a weights file and what `info` counts: the seed model's names, shapes and 10,788,929
    parameters, on the meta device, and torch's random stream untouched (a fresh model would draw its init)."""
    cfg = GPTConfig(arch=arch)
    rng = torch.get_rng_state()
    with shapes_only():
        meta = build_model(cfg)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(t.device.type == "meta" for t in meta.state_dict().values())
    real = build_model(cfg)
    assert {k: v.shape for k, v in meta.state_dict().items()} == {k: v.shape for k, v in real.state_dict().items()}
    assert meta.num_params() == real.num_params() == (10_788_929 if arch == "gpt" else 65 * 65)
    assert torch.device("cpu") == torch.empty(1).device  # the context is gone with the block


@pytest.mark.parametrize("kind", ["gpt", "bigram"])
def test_save_load_gives_identical_logits(tmp_path, kind):
    text = "To be, or not to be: that is the question. 😀\n"
    tok = CharTokenizer.from_text(text)
    cfg = GPTConfig(vocab_size=tok.vocab_size, block_size=16, n_embd=24, n_heads=3, n_layers=2, arch=kind)
    torch.manual_seed(5)
    model = build_model(cfg)
    randomize(model, seed=6)
    model.eval()
    save_model(tmp_path / "m", model, tok, info={"note": "test"})
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((tmp_path / "m" / "config.json").read_text(encoding="utf-8"))
    assert config["vocab"] == tok.chars and config["model"]["model"] == kind and config["info"] == {"note": "test"}

    loaded, loaded_tok = load_model(tmp_path / "m")
    assert loaded_tok == tok
    assert loaded.config == cfg
    assert not loaded.training  # ready for inference
    idx = torch.as_tensor(tok.encode(text[:16]))[None]
    with torch.no_grad():
        assert torch.equal(model(idx)[0], loaded(idx)[0])
    for (name, a), (name_b, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert name == name_b and torch.equal(a, b)


def test_the_model_gives_the_pinned_logits():
    """tests/data/pinned_logits.json pins the model's math (the web page's port is checked against the same file,
    test_export): the forward, and the one-token step after a prefill, give those logits on this machine."""
    from chargpt.inference.generate import Decoder
    from helpers import PINNED, PINNED_PROMPTS, pinned_model

    pinned = json.loads(PINNED.read_text(encoding="utf-8"))["logits"]
    assert sorted(pinned) == sorted(PINNED_PROMPTS)
    model, tokenizer = pinned_model()
    with torch.inference_mode():
        for prompt, expected in pinned.items():
            ids = torch.as_tensor(tokenizer.encode(prompt))[None]
            forward = model(ids[:, -model.config.block_size :])[0][0, -1]
            torch.testing.assert_close(forward, torch.tensor(expected), rtol=0, atol=1e-5)
            decoder = Decoder(model, 1)
            for n in range(1, ids.size(1) + 1):  # prefill, then one-token steps (and rebuilds past the window)
                stepped = decoder(ids[:, :n])[0]
            torch.testing.assert_close(stepped, torch.tensor(expected), rtol=0, atol=1e-5)
