"""The GPT from "Let's build GPT", read top-down like its diagram, and the only place its math is written.

tokens -> token embedding + position embedding -> n_layers x Block -> LayerNorm -> Linear head -> logits
Block: x = x + Dropout(Proj(concat(heads(LN1(x)))));  x = x + Dropout(Linear(ReLU(Linear(LN2(x)))))

`block` is that line as a function of the block's parameters, an `attend` and the Linear to use: the modules'
forward (training, evaluation, a sampler's prefill, the ONNX graph) and the one-token step
(chargpt.inference.decode, with its weights gathered once, fp32 or int8) both call it. `attention` is the one
attention, and `KVCache.attend` the one place that writes keys at given positions and says which slots a query
reads. The heads are computed fused: one bias-free (C -> 3C) matmul gives every head's query, key and value, and
`scaled_dot_product_attention` does the causal softmax(QK^T / sqrt(head_size)) V. `tests/test_model.py` loads
the same weights into a per-head implementation and checks equal logits; the web page's JavaScript port is
pinned to this module by tests/data/pinned_logits.json.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from chargpt.config import GPTConfig
from chargpt.data.tokenizer import CharTokenizer
from chargpt.dropout import Dropout, dropout_mask
from chargpt.errors import ChargptError
from chargpt.lecture import GPTLanguageModel

SPAN = 16  # the one-token step attends over positions in multiples of this many (see span)
EPS = 1e-5  # every LayerNorm's epsilon (the web page reads it from the exported model)


def span(t: int) -> int:
    """How many cache positions the one-token step at position t attends over, the ones past t masked: t + 1
    rounded up to a multiple of SPAN. CPU attention kernels round a row differently at different key counts
    (measured: t + 1 keys and the same keys masked in a 256-slot window differ in the last bits), but give the
    same bits for any masked multiple of 16; so a row's numbers depend on its own position only, whether it is
    decoded alone, in a batch over a longer span (the server), or over the whole window (the CUDA graph)."""
    return -(-(t + 1) // SPAN) * SPAN


# ---- the math, written once: every forward (training, evaluation, prefill, the one-token step, ONNX) runs it ----


class LayerParams(NamedTuple):
    """One block's parameters: each LayerNorm as (weight, bias), each Linear as whatever the `linear` given to
    `block` takes (the module itself in the forward; the one-token step gathers (weight, bias) once)."""

    ln1: tuple[torch.Tensor, torch.Tensor]
    qkv: Any  # rows [0:C) are the queries of heads 0..H-1, then [C:2C) the keys, then [2C:3C) the values
    proj: Any
    ln2: tuple[torch.Tensor, torch.Tensor]
    up: Any
    down: Any


Linear = Callable[[torch.Tensor, Any], torch.Tensor]


def call_module(x: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """The forward's `linear`: the layer itself (an nn.Linear, or an Int8Linear in a quantized copy)."""
    return module(x)


def embed(tokens: torch.Tensor, table: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The model's input: each token's row of the embedding table plus its position's row (`positions`, already
    looked up): (B, T) or (B,) tokens -> (B, T, C) or (B, C)."""
    return F.embedding(tokens, table) + positions


def layer_norm(x: torch.Tensor, params: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return torch.layer_norm(x, (x.size(-1),), params[0], params[1], EPS)  # F.layer_norm's op, without its checks


def block(
    x: torch.Tensor,
    p: LayerParams,
    attend: Callable[[torch.Tensor], torch.Tensor],
    linear: Linear = call_module,
    qkv_linear: Linear | None = None,
    dropout: Callable[[torch.Tensor], torch.Tensor] | None = None,
    last_only: bool = False,
) -> torch.Tensor:
    """One block: x = x + Dropout(Proj(attend(QKV(LN1(x))))); x = x + Dropout(Down(ReLU(Up(LN2(x))))).

    x is (B, T, C), or (B, C) for one token per row; `attend` takes the fused queries, keys and values (..., 3C)
    and returns the heads concatenated (..., C) (see split_heads, merge_heads, attention and KVCache.attend).
    With last_only the attention returned the last position only, and so does the block."""
    a = linear(attend((qkv_linear or linear)(layer_norm(x, p.ln1), p.qkv)), p.proj)
    x = (x[:, -1:] if last_only else x) + (a if dropout is None else dropout(a))
    m = linear(F.relu(linear(layer_norm(x, p.ln2), p.up)), p.down)
    return x + (m if dropout is None else dropout(m))


def split_heads(qkv: torch.Tensor, n_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, T, 3C), or one token per row (B, 3C), -> q, k, v, each (B, H, T, hs) (T = 1 for rows)."""
    hs = qkv.size(-1) // (3 * n_heads)
    if qkv.dim() == 2:  # one token per row: (B, 3, H, 1, hs) views
        q, k, v = qkv.view(qkv.size(0), 3, n_heads, 1, hs).unbind(1)
        return q, k, v
    # unbind, not three selects: its gradient is one stack, theirs three zero-filled copies summed
    q, k, v = qkv.view(qkv.size(0), qkv.size(1), 3, n_heads, hs).unbind(2)  # (B, T, H, hs) each
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def merge_heads(y: torch.Tensor, rows: bool = False) -> torch.Tensor:
    """concat(heads): (B, H, T, hs) -> (B, T, C), or (B, C) for one token per row."""
    B, H, T, hs = y.shape
    return y.reshape(B, H * hs) if rows else y.transpose(1, 2).reshape(B, T, H * hs)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False, mask: torch.Tensor | None = None,
    dropout: float = 0.0,
) -> torch.Tensor:  # fmt: skip
    """softmax(q k^T / sqrt(head_size) + mask) v, causal or under an additive mask, with dropout on the weights:
    the model's one attention. (B, H, T, hs) x (B, H, S, hs) -> (B, H, T, hs)."""
    if dropout > 0 and q.device.type == "cpu":
        return _causal_attention_with_dropout(q, k, v, dropout)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, dropout_p=dropout)


def _causal_attention_with_dropout(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: float) -> torch.Tensor:
    """Causal attention with dropout on the weights, written out for CPU training: SDPA's CPU kernel falls back
    to an unfused path when dropout is on, which costs more than this one."""
    B, H, T, hs = q.shape
    bias = torch.full((T, T), float("-inf"), device=q.device).triu_(1)  # causal: -inf above the diagonal
    att = torch.baddbmm(
        bias, q.reshape(B * H, T, hs), k.reshape(B * H, T, hs).transpose(1, 2), alpha=1.0 / math.sqrt(hs)
    ).softmax(-1)  # (B*H, T, T)
    drop, scale = dropout_mask(tuple(att.shape), p, q.device)
    y = torch.where(drop, 0.0, att) @ (v.reshape(B * H, T, hs) * scale)  # scale folded into v: (B*H, T, hs)
    return y.view(B, H, T, hs)


# ---- the KV cache: where each row's keys live, and which of them its query reads ----


@dataclass
class Rows:
    """Row b of a one-token step sits in cache row slots[b] at position positions[b] (0 < position < block_size):
    the server's rows, each at its own place in its own slot."""

    slots: list[int]
    positions: list[int]

    def tensors(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(slots, positions) as tensors on `device`, made once per step (every layer reads them)."""
        made = self.__dict__.get("_tensors")
        if made is None or made[0].device != device:
            made = self._tensors = (
                torch.tensor(self.slots, device=device),
                torch.tensor(self.positions, device=device),
            )
        return made


Positions = int | torch.Tensor | Rows  # where new tokens go: see KVCache.attend

_MASKS: dict[tuple[int, torch.device, torch.dtype], torch.Tensor] = {}


def visible(n: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(n, n) additive mask: row t is 0 at positions 0..t and -inf after (made once per size, device and format).
    SDPA turns a bool mask into this itself, in every layer of every step; given it, the same numbers come out."""
    key = (n, device, dtype)
    tracing = torch.compiler.is_compiling()  # an exported graph computes its mask (one graph, however called)
    mask = None if tracing else _MASKS.get(key)
    if mask is None:
        ones = torch.ones(n, n, dtype=torch.bool, device=device).tril()
        mask = torch.zeros(n, n, dtype=dtype, device=device).masked_fill_(~ones, float("-inf"))
        if not tracing:
            _MASKS[key] = mask
    return mask


class KVCache:
    """Keys and values of the tokens already seen, per layer: (B, n_heads, slots, head_size), by default
    span(block_size - 1) slots (the positions past block_size only ever masked).

    Allocated once per generation, zeroed (a masked slot is multiplied by 0, and 0 x NaN is NaN); `reset()`
    makes it reusable for a rebuild without new allocations. `attend` writes new keys and reads the ones each
    query may see; the caller advances `length` after a one-token step (a forward from position 0 sets it).
    """

    def __init__(self, cfg: GPTConfig, batch_size: int, device: torch.device, dtype: torch.dtype):
        shape = (batch_size, cfg.n_heads, span(cfg.block_size - 1), cfg.head_size)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.block_size = cfg.block_size
        self.length = 0  # number of positions filled
        self._seen: tuple[tuple[int, int], torch.Tensor] | None = None  # the last step's mask

    @classmethod
    def holding(cls, k: torch.Tensor, v: torch.Tensor, block_size: int) -> KVCache:
        """A cache over given keys and values (n_layers, B, H, slots, hs) (the ONNX graph's inputs, copied)."""
        cache = object.__new__(cls)
        cache.k, cache.v = [layer.clone() for layer in k], [layer.clone() for layer in v]
        cache.block_size, cache.length, cache._seen = block_size, 0, None
        return cache

    def reset(self) -> None:
        self.length = 0

    def row(self, slot: int) -> KVCache:
        """Row `slot` as a batch-of-one cache whose keys and values are views into this one (nothing allocated):
        a server request's own cache, kept in the pool that the batched step writes."""
        view = object.__new__(KVCache)
        view.k = [k[slot : slot + 1] for k in self.k]
        view.v = [v[slot : slot + 1] for v in self.v]
        view.block_size, view.length, view._seen = self.block_size, 0, None
        return view

    def attend(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, at: Positions, last_only: bool = False
    ) -> torch.Tensor:
        """Store the new keys and values k, v (B, H, T, hs) and attend each query q (B, H, T, hs) over the keys at
        positions 0..its own; (B, H, T, hs) out (T = 1 with last_only: the last query only). `at`:

        - an int p: the tokens are at positions p..p+T-1, row b in cache row b. From 0 (a prefill) the queries
          read the new keys themselves, causally; later ones read the cache through a mask over span(p + T - 1)
          slots (a query's numbers then depend on its own position only, whatever else is in the cache).
        - a 0-dim tensor p (on the device): the same with fixed shapes and no host values, every slot read
          through the mask (a CUDA graph; the ONNX graph).
        - `Rows` (T = 1): row b at its own position in its own cache row; all rows' attention in one call over
          the cache rows from the lowest slot to the highest (the ones between idle).
        """
        K, V = self.k[layer], self.v[layer]
        if isinstance(at, Rows):
            return self._attend_rows(K, V, q, k, v, at)
        T = q.size(2)
        if isinstance(at, torch.Tensor):
            where = at.view(1) + torch.arange(T, device=q.device) if T > 1 else at.view(1)
            K.index_copy_(2, where, k.to(K.dtype))
            V.index_copy_(2, where, v.to(V.dtype))
            seen = visible(K.size(2), q.device, K.dtype).index_select(0, where).view(1, 1, T, -1)
            return attention(q.to(K.dtype), K, V, mask=seen)
        K.narrow(2, at, T).copy_(k)  # (narrow + copy_: half the time of K[:, :, at] = ...)
        V.narrow(2, at, T).copy_(v)
        if at == 0:
            if last_only and T > 1:
                return attention(q[:, :, -1:], k, v)  # the last query sees every key
            return attention(q, k, v, causal=T > 1)
        spanned = span(at + T - 1)
        seen = self._seen
        if seen is None or seen[0] != (at, T):  # the same for every layer of a step: made once
            mask = visible(K.size(2), q.device, K.dtype).narrow(0, at, T).narrow(1, 0, spanned)
            seen = self._seen = ((at, T), mask.view(1, 1, T, spanned))
        q = q if q.dtype == K.dtype else q.to(K.dtype)
        return attention(q, K.narrow(2, 0, spanned), V.narrow(2, 0, spanned), mask=seen[1])

    @staticmethod
    def _attend_rows(
        K: torch.Tensor, V: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, at: Rows
    ) -> torch.Tensor:
        slots, positions = at.tensors(q.device)
        K[slots, :, positions] = k[:, :, 0].to(K.dtype)  # every row's new key: (B, H, hs)
        V[slots, :, positions] = v[:, :, 0].to(V.dtype)
        lo, hi = min(at.slots), max(at.slots) + 1  # attention over the cache rows lo..hi-1, unused ones idle
        spanned = span(max(at.positions))
        inside = slots - lo  # each row's place among them
        at_slot = torch.zeros(hi - lo, dtype=torch.long, device=q.device)  # an idle row reads position 0
        at_slot[inside] = positions
        seen = visible(K.size(2), q.device, K.dtype)[at_slot, :spanned].view(hi - lo, 1, 1, spanned)
        queries = q.new_zeros(hi - lo, *q.shape[1:], dtype=K.dtype)  # in the cache's format
        queries[inside] = q.to(K.dtype)
        return attention(queries, K[lo:hi, :, :spanned], V[lo:hi, :, :spanned], mask=seen)[inside]


# ---- the modules: the parameters (their names are the checkpoint's keys) and the forward ----


class CausalSelfAttention(nn.Module):
    """The attention's parameters: the fused (C -> 3C, bias-free) query/key/value projection, and the output's."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=False)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)


class FeedForward(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.up = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.down = nn.Linear(4 * cfg.n_embd, cfg.n_embd)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_heads, self.p = cfg.n_heads, cfg.dropout
        self.ln1 = nn.LayerNorm(cfg.n_embd, eps=EPS)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.n_embd, eps=EPS)
        self.ffwd = FeedForward(cfg)
        self.dropout = Dropout(cfg.dropout)

    def params(self, linear: Callable[[nn.Module], Any] = lambda m: m) -> LayerParams:
        """This block's parameters for `block`, each Linear layer passed through `linear` (the one-token step
        takes their tensors)."""
        a, f = self.attn, self.ffwd
        return LayerParams(
            (self.ln1.weight, self.ln1.bias), linear(a.qkv), linear(a.proj),
            (self.ln2.weight, self.ln2.bias), linear(f.up), linear(f.down),
        )  # fmt: skip

    def forward(
        self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0, at: Positions = 0, last_only: bool = False
    ) -> torch.Tensor:
        drop = self.p if self.training else 0.0

        def attend(qkv: torch.Tensor) -> torch.Tensor:
            q, k, v = split_heads(qkv, self.n_heads)
            if cache is None:
                return merge_heads(attention(q, k, v, causal=q.size(2) > 1, dropout=drop))
            return merge_heads(cache.attend(layer, q, k, v, at, last_only))

        return block(x, self.params(), attend, dropout=self.dropout if drop else None, last_only=last_only)


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
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=EPS)
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

    def stacked(self) -> dict[nn.Parameter, int]:
        """The weights that hold several matrices stacked by rows, and how many (the fused Q, K, V: 3), for an
        optimizer that treats each matrix apart."""
        return {b.attn.qkv.weight: 3 for b in self.blocks}

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None, at: Positions = 0
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (B, T) -> logits (B, T, vocab), and the mean cross-entropy if targets are given.

        With a cache (see KVCache.attend), idx holds the tokens at positions at..at+T-1 and their keys and values
        are stored. Sampling's prefill (at = 0) computes the last position's logits only (B, 1, vocab): the final
        layer runs its query, feed-forward and head on one position; with a tensor `at` (the ONNX graph's fixed
        shapes) every position's. The tokens after a prefill go through the one-token step, chargpt.inference.decode.
        """
        B, T = idx.shape
        if isinstance(at, torch.Tensor):
            pos = at + torch.arange(T, device=idx.device)
        else:
            assert at + T <= self.config.block_size, "sequence longer than block_size"
            pos = torch.arange(at, at + T, device=idx.device)  # (T,)
        x = embed(idx, self.tok_emb.weight, self.pos_emb(pos))  # (B, T, C)
        last = len(self.blocks) - 1 if cache is not None and not isinstance(at, torch.Tensor) else -1
        for i, blk in enumerate(self.blocks):
            x = blk(x, cache, i, at, last_only=i == last)
        if cache is not None and isinstance(at, int):
            cache.length = at + T
        logits = self.head(layer_norm(x, (self.ln_f.weight, self.ln_f.bias)))  # (B, T, vocab)
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


LanguageModel = GPT | BigramLM | GPTLanguageModel  # every model chargpt trains, samples, scores and serves


def build_model(cfg: GPTConfig) -> LanguageModel:
    """The model `cfg.arch` names: the GPT, the bigram table, or the lecture's GPT as written (chargpt.lecture)."""
    if cfg.arch == "lecture":
        return GPTLanguageModel(cfg)
    return BigramLM(cfg) if cfg.arch == "bigram" else GPT(cfg)


class _SkipInit(TorchFunctionMode):
    """torch.nn.init's fills left undone (each returns its tensor as it is)."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if getattr(func, "__module__", None) == "torch.nn.init":
            return args[0] if args else kwargs["tensor"]
        return func(*args, **kwargs)


@contextmanager
def shapes_only() -> Iterator[None]:
    """Models built inside are on the meta device, uninitialised: their names, shapes and parameter count, no
    memory and no random draws (a meta tensor's normal_ runs torch's Python reference code, whose first call
    imports torch._dynamo: ~1.5 s of every command that reads a model)."""
    with torch.device("meta"), _SkipInit():
        yield


def check_usable(model: object, tokenizer: object = None, where: str = "this function") -> None:
    """What public functions that run a model check first, so that a wrong argument is a clear error rather
    than an exception from deep inside torch: a chargpt model with real float32 weights (and a CharTokenizer)."""
    if not isinstance(model, (GPT, BigramLM, GPTLanguageModel)):
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
