"""The one-token decode step: the inner loop of every sampler.

B rows, each a new token at some position whose predecessors' keys and values sit in a KV cache, go in; each
row's next-token logits come out and the new keys and values are stored. generate's Decoder (one sequence,
or a batch at one position), the CUDA graph (fixed shapes, replayed per token) and the server's batching
engine (rows at different positions) all run this one step. What differs between them is only where a
row's keys live and how much of the cache its query reads, given by `at` (chargpt.model.KVCache.attend, which
writes the keys and masks the slots: an int t, every row at position t; a 0-dim tensor, the same with fixed
shapes for a CUDA graph; `Rows`, each row at its own position in its own cache row, a server slot). The block's
math is chargpt.model.block, the same function the model's forward runs.

The weights are gathered once per `DecodeStep` and the block runs on 2-D rows (B, C): at batch 1
each small operation costs more than its arithmetic, and module calls around them cost more still.

Batch invariance (the server's exactness): with `invariant=True` each Linear runs as a batched matmul of B
one-row problems with the weight broadcast, so a row's numbers do not depend on the other rows (a plain
(B, in) x (in, out) product makes BLAS pick another kernel than for one row, which rounds differently).
`batch_invariant` checks on the actual model and device that each row equals its own batch-of-one step. Where a
BLAS rounds a one-row product unlike a batched one even so, `per_row=True` makes every product B one-row calls: the
single-row step's very calls, at about the cost of the batched form (one weight pass per row either way). Both rely
on the BLAS rounding one call alike wherever its operands lie in memory, which MKL on AMD CPUs does only in its
reproducibility mode (chargpt/__init__.py sets MKL_CBWR).

A model with int8 weights (chargpt.inference.quantize) runs its Linears through the int8 kernel, which computes each
row on its own (so it is batch-invariant as it is; `batch_invariant` checks that too).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from chargpt.inference.int8 import Int8Linear, int8_linear
from chargpt.machine import precision as prec
from chargpt.model import GPT, KVCache, Rows, block, embed, layer_norm, merge_heads, split_heads


class DecodeStep:
    """step(tokens (B,), cache, at) -> logits (B, vocab): see the module docstring. Eval mode only (no dropout);
    the caller advances cache.length."""

    def __init__(self, model: GPT, invariant: bool = False, per_row: bool = False):
        cfg = self.config = model.config
        self.H = cfg.n_heads
        self.tok, self.pos = model.tok_emb.weight, model.pos_emb.weight
        self.int8 = isinstance(model.head, Int8Linear)
        self.layers = tuple(b.params(self._weight) for b in model.blocks)  # gathered once
        self.ln_f, self.head = (model.ln_f.weight, model.ln_f.bias), self._weight(model.head)
        self.invariant = invariant or per_row
        self.per_row = per_row  # every product one row at a time: the single-row step's very calls
        self._casts: dict[tuple[int, torch.dtype], torch.Tensor] = {}  # weights cast once for autocast

    def __call__(self, tokens: torch.Tensor, cache: KVCache, at: int | torch.Tensor | Rows) -> torch.Tensor:
        lin = (
            self._linear_int8 if self.int8
            else self._linear_each if self.per_row
            else self._linear_rows if self.invariant
            else self._linear
        )  # fmt: skip
        qkv_lin = self._qkv_int8 if self.int8 else lin  # int8: the kernel's bf16 keys, the cache's format
        if isinstance(at, Rows):
            pos = self.pos[at.tensors(tokens.device)[1]]  # (B, C)
        elif isinstance(at, torch.Tensor):
            pos = self.pos.index_select(0, at.view(1))
        else:
            pos = self.pos[at]
        x = embed(tokens, self.tok, pos)  # (B, C)
        for layer, params in enumerate(self.layers):

            def attend(qkv: torch.Tensor, layer: int = layer) -> torch.Tensor:
                q, k, v = split_heads(qkv, self.H)  # (B, H, 1, hs) each
                return merge_heads(cache.attend(layer, q, k, v, at), rows=True)

            x = block(x, params, attend, lin, qkv_lin)
        x = layer_norm(x, self.ln_f)
        if self.invariant and not self.int8:  # the head row by row: see _linear_rows
            return self._linear_each(x, self.head)
        return lin(x, self.head)  # (B, vocab)

    def cache(self, batch_size: int) -> KVCache:
        """A zeroed cache for this step's model: bf16 with int8 weights, whose keys and values are bf16 numbers
        already (the kernel's output), so the cache holds them exactly in half the bytes that every step reads
        back; else in the weights' format."""
        p = self.tok
        return KVCache(self.config, batch_size, p.device, torch.bfloat16 if self.int8 else p.dtype)

    @staticmethod
    def _weight(linear: torch.nn.Module) -> tuple:
        """A Linear layer as the step's products take it: (weight, bias), or int8's (qweight, scales, bias)."""
        if isinstance(linear, Int8Linear):
            return linear.qweight, linear.scales, linear.bias
        return linear.weight, linear.bias

    @staticmethod
    def _linear(x: torch.Tensor, p: tuple) -> torch.Tensor:
        return F.linear(x, p[0], p[1])

    @staticmethod
    def _qkv_int8(x: torch.Tensor, p: tuple) -> torch.Tensor:
        """The queries, keys and values (bias-free in the GPT) in bf16, as the kernel gives them: the bf16 cache
        takes the keys and values unchanged, and attention the queries (an fp32 round trip would give the same
        numbers, later)."""
        return int8_linear(x, p[0], p[1], p[2], out=torch.bfloat16)

    @staticmethod
    def _linear_int8(x: torch.Tensor, p: tuple) -> torch.Tensor:
        return int8_linear(x, p[0], p[1], p[2])

    @staticmethod
    def _linear_each(x: torch.Tensor, p: tuple) -> torch.Tensor:
        """x (B, in) -> (B, out) as B calls of F.linear on one row: the same calls as B single-row steps make, so
        the same bits at any thread count on a BLAS that splits a one-row sum between threads but not a batched
        product's (given that it rounds one call alike wherever its operands lie: MKL_CBWR on AMD CPUs)."""
        return torch.cat([F.linear(row, p[0], p[1]) for row in x.split(1)])

    def _linear_rows(self, x: torch.Tensor, p: tuple) -> torch.Tensor:
        """x (B, in) -> (B, out), each row computed as F.linear computes a batch of one. Not for the head: with
        2 threads on an Intel Xeon, a one-row product with few outputs (384 -> 65) splits its sum between the
        threads, and the batched product rounds differently; the step runs the head as one-row products."""
        weight, bias = p
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
