"""One decoding step for many sequences at once, equal bit for bit to each sequence's own batch-of-one step.

The server decodes every active request in one step, but a request with a seed must return exactly the text
`chargpt.generate` returns. Each sequence keeps its own batch-of-one KV cache (generate's Decoder, its cache
one slot of a pooled cache), so rows may sit at different positions. What is shared is the weights: every
Linear runs once for all B rows as a batched matmul over B one-row problems with the weight broadcast
(stride 0). A plain (B, in) x (in, out)
matmul would not do: BLAS picks another kernel for B rows than for one, and rounds differently. Attention
runs per row on that row's cache, exactly as in the batch-of-one forward. `matches_decoder` checks all of
this on the actual model and device at start-up; where it fails, the engine decodes rows one at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from chargpt import precision as prec
from chargpt.generate import Decoder
from chargpt.model import GPT, CausalSelfAttention, KVCache


class SlotCache(KVCache):
    """Row `slot` of a pooled KVCache: a batch-of-one cache for that row's Decoder whose keys and values live in
    the pool, so that one indexed write per layer stores every row's new position."""

    def __init__(self, pool: KVCache, slot: int):  # views into the pool, nothing allocated
        self.k = [k[slot : slot + 1] for k in pool.k]
        self.v = [v[slot : slot + 1] for v in pool.v]
        self.block_size = pool.block_size
        self.length = 0
        self.slot = slot


def linear_rows(lin: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """x (B, 1, in) -> (B, 1, out), each row computed as F.linear computes a batch of one."""
    weight = lin.weight
    if torch.is_autocast_enabled(x.device.type):  # cast the weight itself, not its B-fold broadcast
        weight = weight.to(torch.get_autocast_dtype(x.device.type))
    w = weight.t().expand(x.size(0), -1, -1)  # (B, in, out), no copy
    if lin.bias is None:
        return torch.bmm(x, w)
    return torch.baddbmm(lin.bias.expand(x.size(0), 1, -1), x, w)


@dataclass
class _Rows:
    """The rows of one step: their caches in the pool, and where the new position goes in each."""

    pool: KVCache
    caches: list[SlotCache]
    slots: torch.Tensor  # (B,)
    positions: torch.Tensor  # (B,)


def _attend_rows(attn: CausalSelfAttention, x: torch.Tensor, rows: _Rows, layer: int) -> torch.Tensor:
    """x (B, 1, C): one new position per row, row b at position positions[b] -> (B, 1, C)."""
    B, _, C = x.shape
    q, k, v = linear_rows(attn.qkv, x).split(C, dim=2)  # 3 x (B, 1, C)
    q, k, v = (t.view(B, 1, attn.n_heads, attn.head_size).transpose(1, 2) for t in (q, k, v))  # (B, H, 1, hs)
    pool_k, pool_v = rows.pool.k[layer], rows.pool.v[layer]  # stored in the cache's dtype, as model.step stores
    pool_k[rows.slots, :, rows.positions] = k[:, :, 0].to(pool_k.dtype)  # every row's new key: (B, H, hs)
    pool_v[rows.slots, :, rows.positions] = v[:, :, 0].to(pool_v.dtype)
    ys = []
    for b, cache in enumerate(rows.caches):
        end = cache.length + 1
        keys, values = cache.k[layer][:, :, :end], cache.v[layer][:, :, :end]  # (1, H, end, hs)
        ys.append(F.scaled_dot_product_attention(q[b : b + 1], keys, values, is_causal=False, dropout_p=0.0))
    y = torch.cat(ys).transpose(1, 2).reshape(B, 1, C)  # concat(heads): (B, 1, C)
    return linear_rows(attn.proj, y)


def decode_rows(model: GPT, pool: KVCache, caches: list[SlotCache], tokens: torch.Tensor) -> torch.Tensor:
    """tokens (B,): each row's newest token, its cache (a slot of `pool`) holding the tokens before it at
    positions 0..length-1 (0 < length < block_size) -> logits (B, vocab) for the token after it. Advances
    every cache."""
    device = tokens.device
    positions = torch.tensor([c.length for c in caches], device=device)  # (B,)
    rows = _Rows(pool, caches, torch.tensor([c.slot for c in caches], device=device), positions)
    x = model.tok_emb(tokens[:, None]) + model.pos_emb(positions[:, None])  # (B, 1, C)
    for i, block in enumerate(model.blocks):
        x = x + _attend_rows(block.attn, block.ln1(x), rows, i)
        ffwd = block.ffwd
        x = x + linear_rows(ffwd.down, F.relu(linear_rows(ffwd.up, block.ln2(x))))
    for cache in caches:
        cache.length += 1
    return linear_rows(model.head, model.ln_f(x))[:, -1]  # (B, vocab)


@torch.inference_mode()
def matches_decoder(
    model: GPT, prefill: prec.Choice = prec.FP32, decode: prec.Choice = prec.FP32, rows: int = 3
) -> bool:
    """Does decode_rows give bit for bit the logits of each row's own batch-of-one step, here, on this device,
    in these number formats (the rebuilds in `prefill`, the one-token steps in `decode`)?

    Rows of random tokens at different positions (1, the middle, the last cached one), one step each.
    """
    if model.training or model.config.block_size < 3:
        return False
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(0)
    block, vocab = model.config.block_size, model.config.vocab_size
    lengths = [1, block // 2, block - 1][:rows]  # at most 3 rows
    seqs = [torch.randint(vocab, (1, n + 1), generator=gen).to(device) for n in lengths]
    p = next(model.parameters())
    pool = KVCache(model.config, len(seqs) + 1, p.device, p.dtype)
    caches = [SlotCache(pool, slot) for slot in (2, 0, 1)[: len(seqs)]]  # slots out of order, one left empty
    batched = [slot_decoder(model, c, prefill, decode) for c in caches]
    single = [Decoder(model, 1, prefill=prefill, decode=decode) for _ in seqs]
    with prec.weight_cast_region(device, prefill, decode):
        for seq, a, b in zip(seqs, batched, single, strict=True):
            a(seq[:, :-1]), b(seq[:, :-1])  # prefill all but the last token
        expected = torch.cat([d(seq) for d, seq in zip(single, seqs, strict=True)])  # (rows, vocab)
        with prec.autocast(device, decode):
            got = decode_rows(model, pool, caches, torch.cat([seq[:, -1] for seq in seqs]))
    return torch.equal(got, expected)


def slot_decoder(
    model: GPT, cache: SlotCache, prefill: prec.Choice = prec.FP32, decode: prec.Choice = prec.FP32
) -> Decoder:
    """generate's Decoder for one row, keeping its cache in a pool slot."""
    decoder = Decoder(model, 1, use_cache=False, prefill=prefill, decode=decode)
    decoder.cache = cache
    return decoder
