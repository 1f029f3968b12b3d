"""The one-token decode step: the inner loop of every sampler.

B rows, each a new token at some position whose predecessors' keys and values sit in a KV cache, go in; each
row's next-token logits come out and the new keys and values are stored. generate's Decoder (one sequence,
or a batch at one position), the CUDA graph (fixed shapes, replayed per token) and the server's batching
engine (rows at different positions) all run this one step. What differs between them is only where a
row's keys live and how much of the cache its query reads, given by `at`:

- an int t: every row at position t, row b in cache row b.
- a 0-dim tensor (on the device): the same, with fixed shapes and no host values, so a CUDA graph can capture
  it: the query reads every slot of the cache.
- `Rows`: row b at its own position in its own cache row (a server slot), all rows' attention in one call over
  the cache rows from the lowest slot to the highest.

A query at position t always reads keys 0..t through a mask over more slots (chargpt.model.span: t + 1 rounded
up to 16 alone, the longest row's span in a batch, the whole cache in a graph): CPU attention gives the same bits
for any masked multiple of 16 keys, so a row's numbers are its own, alone or in any batch.

The weights are gathered once per `DecodeStep` and the step calls the functional ops on 2-D rows: at batch 1
each small operation costs more than its arithmetic, and module calls around them cost more still.

Batch invariance (the server's exactness): with `invariant=True` each Linear runs as a batched matmul of B
one-row problems with the weight broadcast, so a row's numbers do not depend on the other rows (a plain
(B, in) x (in, out) product makes BLAS pick another kernel than for one row, which rounds differently).
`batch_invariant` checks on the actual model and device that each row equals its own batch-of-one step. Where a
BLAS rounds a one-row product unlike a batched one even so (MKL on AMD CPUs at two or more threads), `per_row=True`
makes every product B one-row calls: the single-row step's very calls, so the same bits by construction, at about
the cost of the batched form (one weight pass per row either way).

A model with int8 weights (chargpt.inference.quantize) runs its Linears through the int8 kernel, which computes each
row on its own (so it is batch-invariant as it is; `batch_invariant` checks that too).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from chargpt.inference.int8 import Int8Linear, int8_linear
from chargpt.machine import precision as prec
from chargpt.model import GPT, KVCache, span


@dataclass(frozen=True)
class Rows:
    """Row b of a step sits in cache row slots[b] at position positions[b] (0 < position < block_size)."""

    slots: list[int]
    positions: list[int]


class DecodeStep:
    """step(tokens (B,), cache, at) -> logits (B, vocab): see the module docstring. Eval mode only (no dropout);
    the caller advances cache.length."""

    def __init__(self, model: GPT, invariant: bool = False, per_row: bool = False):
        cfg = self.config = model.config
        self.C, self.H, self.hs = cfg.n_embd, cfg.n_heads, cfg.head_size
        self.eps = model.ln_f.eps
        self.tok, self.pos = model.tok_emb.weight, model.pos_emb.weight
        self.int8 = isinstance(model.head, Int8Linear)
        w = self._weight
        self.layers = tuple(
            (b.ln1.weight, b.ln1.bias, w(b.attn.qkv), b.attn.qkv.bias, w(b.attn.proj), b.attn.proj.bias)
            + (b.ln2.weight, b.ln2.bias, w(b.ffwd.up), b.ffwd.up.bias, w(b.ffwd.down), b.ffwd.down.bias)
            for b in model.blocks
        )
        self.final = (model.ln_f.weight, model.ln_f.bias, w(model.head), model.head.bias)
        self.invariant = invariant or per_row
        self.per_row = per_row  # every product one row at a time: the single-row step's very calls
        self._casts: dict[tuple[int, torch.dtype], torch.Tensor] = {}  # weights cast once for autocast
        self._masks: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def __call__(self, tokens: torch.Tensor, cache: KVCache, at: int | torch.Tensor | Rows) -> torch.Tensor:
        C, H, hs, eps = self.C, self.H, self.hs, self.eps
        lin = (
            self._linear_int8 if self.int8
            else self._linear_each if self.per_row
            else self._linear_rows if self.invariant
            else F.linear
        )  # fmt: skip
        qkv_lin = self._qkv_int8 if self.int8 else lin  # int8: the kernel's bf16 keys, the cache's format
        x = F.embedding(tokens, self.tok)  # (B, C)
        B = x.size(0)
        if isinstance(at, Rows):
            slots = torch.tensor(at.slots, device=x.device)
            positions = torch.tensor(at.positions, device=x.device)
            x = x + self.pos[positions]
            lo, hi = min(at.slots), max(at.slots) + 1  # attention over the cache rows lo..hi-1, unused ones idle
            spanned = span(max(at.positions))
            inside = slots - lo  # each row's place among them
            at_slot = torch.zeros(hi - lo, dtype=torch.long, device=x.device)  # an idle row reads position 0
            at_slot[inside] = positions
            seen = self._visible(cache, x.device)[at_slot, :spanned].view(hi - lo, 1, 1, spanned)
        elif isinstance(at, torch.Tensor):
            seen = self._visible(cache, x.device).index_select(0, at.view(1)).view(1, 1, 1, -1)  # slots filled
            x = x + self.pos.index_select(0, at.view(1))
        else:
            spanned = span(at)
            seen = self._visible(cache, x.device)[at, :spanned].view(1, 1, 1, spanned)
            x = x + self.pos[at]
        for (ln1_w, ln1_b, qkv_w, qkv_b, proj_w, proj_b, ln2_w, ln2_b, up_w, up_b, down_w, down_b), k, v in zip(
            self.layers, cache.k, cache.v, strict=True
        ):
            qkv = qkv_lin(F.layer_norm(x, (C,), ln1_w, ln1_b, eps), qkv_w, qkv_b).view(B, 3, H, hs)  # q, k, v
            q = qkv[:, 0, :, None].to(k.dtype)  # (B, H, 1, hs)
            if isinstance(at, Rows):
                k[slots, :, positions] = qkv[:, 1].to(k.dtype)  # every row's new key: (B, H, hs)
                v[slots, :, positions] = qkv[:, 2].to(v.dtype)
                queries = q.new_zeros(hi - lo, H, 1, hs)  # in the cache's format
                queries[inside] = q
                y = F.scaled_dot_product_attention(
                    queries, k[lo:hi, :, :spanned], v[lo:hi, :, :spanned], attn_mask=seen
                )[inside]
            elif isinstance(at, torch.Tensor):
                k.index_copy_(2, at.view(1), qkv[:, 1, :, None].to(k.dtype))
                v.index_copy_(2, at.view(1), qkv[:, 2, :, None].to(v.dtype))
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=seen)
            else:
                k.select(2, at).copy_(qkv.select(1, 1))  # (B, H, hs) into the cache's (B, H, span(block - 1), hs)
                v.select(2, at).copy_(qkv.select(1, 2))  # (select + copy_: half the time of k[:, :, at] = ...)
                y = F.scaled_dot_product_attention(q, k[:, :, :spanned], v[:, :, :spanned], attn_mask=seen)
            x += lin(y.reshape(B, C), proj_w, proj_b)  # concat(heads) (B, H, 1, hs) -> proj; residual
            x += lin(lin(F.layer_norm(x, (C,), ln2_w, ln2_b, eps), up_w, up_b).relu_(), down_w, down_b)
        ln_w, ln_b, head_w, head_b = self.final
        x = F.layer_norm(x, (C,), ln_w, ln_b, eps)
        if self.invariant and not self.int8:  # the head row by row: see _linear_rows
            return self._linear_each(x, head_w, head_b)
        return lin(x, head_w, head_b)  # (B, vocab)

    def cache(self, batch_size: int) -> KVCache:
        """A zeroed cache for this step's model: bf16 with int8 weights, whose keys and values are bf16 numbers
        already (the kernel's output), so the cache holds them exactly in half the bytes that every step reads
        back; else in the weights' format."""
        p = self.tok
        return KVCache(self.config, batch_size, p.device, torch.bfloat16 if self.int8 else p.dtype)

    def _visible(self, cache: KVCache, device: torch.device) -> torch.Tensor:
        """(slots, slots) in the cache's format: row t is 0 at positions 0..t and -inf after (made once per device
        and format). SDPA turns a bool mask into this itself, in every layer of every step; given it, the same
        numbers come out."""
        n, dtype = cache.k[0].size(2), cache.k[0].dtype
        mask = self._masks.get((device, dtype))
        if mask is None or mask.size(0) != n:
            ones = torch.ones(n, n, dtype=torch.bool, device=device).tril()
            mask = torch.zeros(n, n, dtype=dtype, device=device).masked_fill_(~ones, float("-inf"))
            self._masks[(device, dtype)] = mask
        return mask

    @staticmethod
    def _weight(linear: torch.nn.Module) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        return (linear.qweight, linear.scales) if isinstance(linear, Int8Linear) else linear.weight

    @staticmethod
    def _qkv_int8(x: torch.Tensor, weight: tuple[torch.Tensor, torch.Tensor], bias: torch.Tensor | None):
        """The queries, keys and values (bias-free in the GPT) in bf16, as the kernel gives them: the bf16 cache
        takes the keys and values unchanged, and attention the queries (an fp32 round trip would give the same
        numbers, later)."""
        return int8_linear(x, weight[0], weight[1], bias, out=torch.bfloat16)

    @staticmethod
    def _linear_int8(x: torch.Tensor, weight: tuple[torch.Tensor, torch.Tensor], bias: torch.Tensor | None):
        return int8_linear(x, weight[0], weight[1], bias)

    @staticmethod
    def _linear_each(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x (B, in) -> (B, out) as B calls of F.linear on one row: the same calls as B single-row steps make, so
        the same bits on any BLAS at any thread count (one that splits a one-row sum between threads but not a
        batched product's, as MKL does on AMD CPUs, included)."""
        return torch.cat([F.linear(row, weight, bias) for row in x.split(1)])

    def _linear_rows(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x (B, in) -> (B, out), each row computed as F.linear computes a batch of one. Not for the head: with
        2 threads on an Intel Xeon, a one-row product with few outputs (384 -> 65) splits its sum between the
        threads, and the batched product rounds differently; the step runs the head as one-row products."""
        if torch.is_autocast_enabled(x.device.type):  # cast the weight itself (once), not its B-fold broadcast
            dtype = torch.get_autocast_dtype(x.device.type)
            key = (id(weight), dtype)
            if key not in self._casts:
                self._casts[key] = weight.to(dtype)
            weight = self._casts[key]
        w = weight.t().expand(x.size(0), -1, -1)  # (B, in, out), no copy
        if bias is None:
            return torch.bmm(x[:, None], w)[:, 0]
        return torch.baddbmm(bias.expand(x.size(0), 1, -1), x[:, None], w)[:, 0]


@torch.inference_mode()
def batch_invariant(
    model: GPT, prefill: prec.Choice = prec.FP32, decode: prec.Choice = prec.FP32, per_row: bool = False
) -> bool:
    """Does the invariant step (with per_row: its one-product-per-row form) give, bit for bit, each row's logits of
    its own batch-of-one step, here, on this device, at this thread count, in these number formats (the cache
    prefills in `prefill`, the step in `decode`)?

    Three rows of random tokens at different positions (1, the middle, the last cached one) in cache rows out of
    order, one of four left empty; one step each.
    """
    if model.training or model.config.block_size < 3:
        return False
    p = next(model.parameters())
    gen = torch.Generator().manual_seed(0)
    block, vocab = model.config.block_size, model.config.vocab_size
    seqs = [torch.randint(vocab, (1, n + 1), generator=gen).to(p.device) for n in (1, block // 2, block - 1)]
    slots = [2, 0, 1]
    one, rows = DecodeStep(model), DecodeStep(model, invariant=True, per_row=per_row)
    pool = rows.cache(len(seqs) + 1)
    expected = []
    with prec.weight_cast_region(p.device, prefill, decode):
        for seq, slot in zip(seqs, slots, strict=True):
            single = one.cache(1)
            with prec.autocast(p.device, prefill):
                model(seq[:, :-1], cache=single)
                model(seq[:, :-1], cache=pool.row(slot))
            with prec.autocast(p.device, decode):
                expected.append(one(seq[:, -1], single, seq.size(1) - 1))
        with prec.autocast(p.device, decode):
            got = rows(torch.cat([seq[:, -1] for seq in seqs]), pool, Rows(slots, [s.size(1) - 1 for s in seqs]))
    return torch.equal(got, torch.cat(expected))
