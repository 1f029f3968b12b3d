"""The GPT of "Let's build GPT", written as the lecture writes it: one class per part, in the order a reader meets
them, no caches and no fast paths. It is the same model as chargpt.model.GPT, which computes the heads fused: on
the same weights the two give the same logits (tests/test_lecture.py), and docs/from-scratch.md walks through
both. `chargpt train --arch lecture` trains this one (slower).

tokens -> token embedding + position embedding -> n_layers x Block -> LayerNorm -> Linear head -> logits
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn import functional as F

from chargpt.config import GPTConfig


class Head(nn.Module):
    """One head of self-attention: each position asks (query) and offers (key, value); it reads the values of
    the positions before it, weighted by how well their keys match its query."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.key = nn.Linear(cfg.n_embd, cfg.head_size, bias=False)
        self.query = nn.Linear(cfg.n_embd, cfg.head_size, bias=False)
        self.value = nn.Linear(cfg.n_embd, cfg.head_size, bias=False)
        self.register_buffer("tril", torch.tril(torch.ones(cfg.block_size, cfg.block_size)), persistent=False)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        k = self.key(x)  # (B, T, hs)
        q = self.query(x)  # (B, T, hs)
        wei = q @ k.transpose(-2, -1) * k.shape[-1] ** -0.5  # (B, T, T): the affinities, scaled
        wei = wei.masked_fill(self.tril[:T, :T] == 0, float("-inf"))  # no position sees its future
        wei = F.softmax(wei, dim=-1)
        wei = self.dropout(wei)
        v = self.value(x)  # (B, T, hs)
        return wei @ v  # (B, T, hs)


class MultiHeadAttention(nn.Module):
    """Several heads side by side, their outputs concatenated, then one projection back into the residual."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.heads = nn.ModuleList([Head(cfg) for _ in range(cfg.n_heads)])
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.cat([h(x) for h in self.heads], dim=-1)  # (B, T, C)
        return self.dropout(self.proj(out))


class FeedForward(nn.Module):
    """Each position on its own: a linear layer 4x wider, ReLU, and back."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(cfg.n_embd, 4 * cfg.n_embd),
            nn.ReLU(),
            nn.Linear(4 * cfg.n_embd, cfg.n_embd),
            nn.Dropout(cfg.dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Block(nn.Module):
    """Communication (attention), then computation (feed-forward), each added to the residual stream after a
    LayerNorm."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.sa = MultiHeadAttention(cfg)
        self.ffwd = FeedForward(cfg)
        self.ln1 = nn.LayerNorm(cfg.n_embd)
        self.ln2 = nn.LayerNorm(cfg.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.sa(self.ln1(x))
        x = x + self.ffwd(self.ln2(x))
        return x


class GPTLanguageModel(nn.Module):
    """The whole model: embeddings, the blocks, a last LayerNorm and the head that scores every next character."""

    decodes_with_cache = False  # sampling runs the whole window again for each character

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.token_embedding_table = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.position_embedding_table = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.blocks = nn.Sequential(*[Block(cfg) for _ in range(cfg.n_layers)])
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, T = idx.shape
        tok_emb = self.token_embedding_table(idx)  # (B, T, C)
        pos_emb = self.position_embedding_table(torch.arange(T, device=idx.device))  # (T, C)
        x = tok_emb + pos_emb  # (B, T, C)
        x = self.blocks(x)  # (B, T, C)
        x = self.ln_f(x)  # (B, T, C)
        logits = self.lm_head(x)  # (B, T, vocab_size)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        return logits, loss

    def context(self, seq: torch.Tensor) -> torch.Tensor:
        """The tokens the next prediction depends on: the last block_size."""
        return seq[:, -self.config.block_size :]

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.token_embedding_table.weight.numel() + self.position_embedding_table.weight.numel()
        return n


# ---- the fast model's weights, by name: chargpt.model.GPT keeps each layer's queries, keys and values of every
# head in one (3C, C) matrix (rows [0:C) the queries of heads 0..H-1, then the keys, then the values) ----

NAMES = (  # (this model's parameter, the fast model's) where the two are the same tensor
    ("token_embedding_table.weight", "tok_emb.weight"), ("position_embedding_table.weight", "pos_emb.weight"),
    ("ln_f.weight", "ln_f.weight"), ("ln_f.bias", "ln_f.bias"), ("lm_head.weight", "head.weight"),
    ("lm_head.bias", "head.bias"),
)  # fmt: skip
LAYER_NAMES = (
    ("sa.proj", "attn.proj"),
    ("ffwd.net.0", "ffwd.up"),
    ("ffwd.net.2", "ffwd.down"),
    ("ln1", "ln1"),
    ("ln2", "ln2"),
)  # each with a weight and a bias
QKV = ("query", "key", "value")


def _pairs(cfg: GPTConfig) -> list[tuple[str, str]]:
    """(this model's name, the fast model's) of every parameter but the heads' queries, keys and values."""
    pairs = list(NAMES)
    for i in range(cfg.n_layers):
        pairs += [(f"blocks.{i}.{o}.{k}", f"blocks.{i}.{t}.{k}") for o, t in LAYER_NAMES for k in ("weight", "bias")]
    return pairs


def from_fast_weights(state: dict[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """chargpt.model.GPT's state dict as this model's (the same numbers, the fused matrix split by head)."""
    out = {ours: state[theirs] for ours, theirs in _pairs(cfg)}
    C, hs = cfg.n_embd, cfg.head_size
    for i in range(cfg.n_layers):
        qkv = state[f"blocks.{i}.attn.qkv.weight"]  # (3C, C)
        for h in range(cfg.n_heads):
            for j, part in enumerate(QKV):
                out[f"blocks.{i}.sa.heads.{h}.{part}.weight"] = qkv[j * C + h * hs : j * C + (h + 1) * hs]
    return out


def to_fast_weights(state: dict[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """This model's state dict as chargpt.model.GPT's: from_fast_weights undone."""
    out = {theirs: state[ours] for ours, theirs in _pairs(cfg)}
    for i in range(cfg.n_layers):
        heads = [f"blocks.{i}.sa.heads.{h}" for h in range(cfg.n_heads)]
        out[f"blocks.{i}.attn.qkv.weight"] = torch.cat(
            [state[f"{head}.{part}.weight"] for part in QKV for head in heads]
        )
    return out
