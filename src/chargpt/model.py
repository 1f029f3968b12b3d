"""The GPT from "Let's build GPT", read top-down like its diagram.

tokens -> token embedding + position embedding -> n_layers x Block -> LayerNorm -> Linear head -> logits
Block: x = x + Dropout(Proj(concat(heads(LN1(x)))));  x = x + Dropout(Linear(ReLU(Linear(LN2(x)))))

The heads are computed fused: one bias-free (C -> 3C) matmul gives every head's query, key and
value, and `scaled_dot_product_attention` does the causal softmax(QK^T / sqrt(head_size)) V.
`tests/test_model.py` loads the same weights into a per-head implementation and checks equal logits.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from chargpt.config import GPTConfig
from chargpt.errors import ChargptError

SPAN = 16  # the one-token step attends over positions in multiples of this many (see span)


def span(t: int) -> int:
    """How many cache positions the one-token step at position t attends over, the ones past t masked: t + 1
    rounded up to a multiple of SPAN. CPU attention kernels round a row differently at different key counts
    (measured: t + 1 keys and the same keys masked in a 256-slot window differ in the last bits), but give the
    same bits for any masked multiple of 16; so a row's numbers depend on its own position only, whether it is
    decoded alone, in a batch over a longer span (the server), or over the whole window (the CUDA graph)."""
    return -(-(t + 1) // SPAN) * SPAN


class KVCache:
    """Keys and values of the tokens already seen, per layer: (B, n_heads, span(block_size - 1), head_size), the
    positions past block_size only ever masked.

    Allocated once per generation, zeroed (the one-token step multiplies masked slots by 0, and 0 x NaN is NaN);
    `reset()` makes it reusable for a rebuild without new allocations. A prefill (`GPT.forward(idx,
    cache=...)`) fills positions 0..T-1; the one-token step (chargpt.inference.decode) writes one position per row.
    """

    def __init__(self, cfg: GPTConfig, batch_size: int, device: torch.device, dtype: torch.dtype):
        shape = (batch_size, cfg.n_heads, span(cfg.block_size - 1), cfg.head_size)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.block_size = cfg.block_size
        self.length = 0  # number of positions filled

    def reset(self) -> None:
        self.length = 0

    def row(self, slot: int) -> KVCache:
        """Row `slot` as a batch-of-one cache whose keys and values are views into this one (nothing allocated):
        a server request's own cache, kept in the pool that the batched step writes."""
        view = object.__new__(KVCache)
        view.k = [k[slot : slot + 1] for k in self.k]
        view.v = [v[slot : slot + 1] for v in self.v]
        view.block_size, view.length = self.block_size, 0
        return view


def dropout_mask(shape: tuple[int, ...], p: float, device: torch.device) -> tuple[torch.Tensor, float]:
    """A bool mask of the elements to drop, each with probability p (to 1/65536), and the keep-scale.

    On CPU, torch's bernoulli_ draws one Mersenne-Twister number per element and costs a quarter of a
    training step at dropout 0.2; here one 64-bit draw yields four 16-bit uniforms, about 6x cheaper.
    """
    n = math.prod(shape)
    words = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=device)
    uniform16 = words.view(torch.int16)[:n].view(shape)  # uniform on [-32768, 32767]
    k = min(round(p * 65536), 65535)  # p just below 1 still keeps 1 element in 65536 (and a finite scale)
    return uniform16 < k - 32768, 65536 / (65536 - k)


class Dropout(nn.Module):
    """nn.Dropout, with cheaper random masks on CPU (see dropout_mask); same semantics."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.p, True)
        drop, scale = dropout_mask(tuple(x.shape), self.p, x.device)
        return torch.where(drop, 0.0, x * scale)  # one pass each way (masked_fill would clone, then fill)


class CausalSelfAttention(nn.Module):
    """All heads at once: fused QKV projection, causal SDPA, output projection."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_heads, self.head_size = cfg.n_heads, cfg.head_size
        # rows [0:C) are the queries of heads 0..H-1, then [C:2C) the keys, then [2C:3C) the values
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=False)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.attn_dropout = cfg.dropout
        self.resid_dropout = Dropout(cfg.dropout)

    def forward(
        self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0, last_only: bool = False
    ) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C); with last_only, (B, 1, C): only the last query (the model's final layer
        while sampling needs no other position's output, but every position's key and value). With a cache
        (a prefill from position 0) the keys and values are stored in it."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)  # 3 x (B, T, C)
        q, k, v = (t.view(B, T, self.n_heads, self.head_size).transpose(1, 2) for t in (q, k, v))  # (B, H, T, hs)
        causal = T > 1
        if cache is not None:
            cache.k[layer][:, :, :T] = k
            cache.v[layer][:, :, :T] = v
        if last_only and T > 1:
            q, T, causal = q[:, :, -1:], 1, False  # the last query sees every key: (B, H, 1, hs)
        if self.training and self.attn_dropout > 0 and x.device.type == "cpu" and cache is None:
            y = self._attend_with_dropout(q, k, v)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, is_causal=causal, dropout_p=self.attn_dropout if self.training else 0.0
            )  # (B, H, T, hs)
        y = y.transpose(1, 2).reshape(B, T, C)  # concat(heads): (B, T, C)
        return self.resid_dropout(self.proj(y))

    def _attend_with_dropout(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal attention with dropout on the weights, written out for CPU training: SDPA's CPU kernel
        falls back to an unfused path when dropout is on, which costs more than this one."""
        B, H, T, hs = q.shape
        bias = torch.full((T, T), float("-inf"), device=q.device).triu_(1)  # causal: -inf above the diagonal
        att = torch.baddbmm(
            bias, q.reshape(B * H, T, hs), k.reshape(B * H, T, hs).transpose(1, 2), alpha=1.0 / math.sqrt(hs)
        ).softmax(-1)  # (B*H, T, T)
        drop, scale = dropout_mask(tuple(att.shape), self.attn_dropout, q.device)
        y = torch.where(drop, 0.0, att) @ (v.reshape(B * H, T, hs) * scale)  # scale folded into v: (B*H, T, hs)
        return y.view(B, H, T, hs)


class FeedForward(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.up = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.down = nn.Linear(4 * cfg.n_embd, cfg.n_embd)
        self.dropout = Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down(F.relu(self.up(x))))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.n_embd)
        self.ffwd = FeedForward(cfg)

    def forward(
        self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0, last_only: bool = False
    ) -> torch.Tensor:
        a = self.attn(self.ln1(x), cache, layer, last_only)  # (B, T, C), or (B, 1, C) with last_only
        x = (x[:, -1:] if last_only else x) + a
        return x + self.ffwd(self.ln2(x))


class GPT(nn.Module):
    """The transformer. What sampling, serving and export ask of a model (the two architectures answer alike):
    `context(seq)`, the tokens the next prediction depends on, and `decodes_with_cache`, whether the KV cache and
    the one-token step (chargpt.inference.decode) apply."""

    decodes_with_cache = True

    def context(self, seq: torch.Tensor) -> torch.Tensor:
        return seq[:, -self.config.block_size :]

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size)
        self.apply(self._init_weights)
        # residual projections scaled down with depth (GPT-2), so the residual stream starts tame
        for name, p in self.named_parameters():
            if name.endswith(("attn.proj.weight", "ffwd.down.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (B, T) -> logits (B, T, vocab), and the mean cross-entropy if targets are given.

        With a cache (sampling's prefill): idx fills the cache from position 0 and only the last position's
        logits (B, 1, vocab) are computed; the final layer then runs its query, feed-forward and head on one
        position. The tokens after it go through the one-token step, chargpt.inference.decode.
        """
        B, T = idx.shape
        assert T <= self.config.block_size, "sequence longer than block_size"
        pos = torch.arange(T, device=idx.device)  # (T,)
        x = self.tok_emb(idx) + self.pos_emb(pos)  # (B, T, C)
        last = len(self.blocks) - 1 if cache is not None else -1
        for i, block in enumerate(self.blocks):
            x = block(x, cache, i, last_only=i == last)
        if cache is not None:
            cache.length = T
        logits = self.head(self.ln_f(x))  # (B, T, vocab)
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.tok_emb.weight.numel() + self.pos_emb.weight.numel()
        return n


class BigramLM(nn.Module):
    """The lecture's baseline: the next character's logits read off a vocab x vocab table."""

    decodes_with_cache = False  # no attention: nothing to cache

    def context(self, seq: torch.Tensor) -> torch.Tensor:
        return seq[:, -1:]  # the next character depends on the last one only

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.table = nn.Embedding(cfg.vocab_size, cfg.vocab_size)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits = self.table(idx)  # (B, T, vocab)
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.flatten(0, 1), targets.flatten())

    def num_params(self, non_embedding: bool = False) -> int:
        return sum(p.numel() for p in self.parameters())


def build_model(cfg: GPTConfig) -> GPT | BigramLM:
    return BigramLM(cfg) if cfg.model == "bigram" else GPT(cfg)


def check_usable(model: object, tokenizer: object = None, where: str = "this function") -> None:
    """What public functions that run a model check first, so that a wrong argument is a clear error rather
    than an exception from deep inside torch: a chargpt model with real float32 weights (and a CharTokenizer)."""
    from chargpt.data.tokenizer import CharTokenizer

    if not isinstance(model, (GPT, BigramLM)):
        raise TypeError(
            f"{where} takes a chargpt model (chargpt.load_model(DIR) returns one), got {type(model).__name__}"
        )
    if tokenizer is not None and not isinstance(tokenizer, CharTokenizer):
        raise TypeError(f"{where} takes the model's CharTokenizer second, got {type(tokenizer).__name__}")
    weight = next(model.parameters())
    if weight.device.type == "meta":
        raise ChargptError("the model is on the meta device (shapes, no weights); load it with chargpt.load_model")
    if weight.dtype != torch.float32:
        raise ChargptError(
            f"the model's weights are {weight.dtype}; chargpt keeps float32 weights (bf16 is autocast): call "
            f"model.float(), and pass precision='bf16' for bf16 compute"
        )
