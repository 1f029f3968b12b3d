"""Sampling: KV cache, temperature / top-k / top-p, stop strings, streaming.

With the cache each step feeds only the new token. The model has learned absolute positions, so
once the sequence is longer than block_size the no-cache model sees the last block_size tokens at
positions 0..block_size-1, which shifts every position by one at every step; to see exactly that,
the cache is rebuilt from the last block_size tokens (one full forward per token past the window).
"""

from __future__ import annotations

import heapq
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from chargpt.data.tokenizer import CharTokenizer
from chargpt.errors import ChargptError
from chargpt.inference import quantize as quant
from chargpt.inference.decode import DecodeStep
from chargpt.machine import memory
from chargpt.machine import precision as prec
from chargpt.machine.cores import cores as usable_cores
from chargpt.model import KVCache, LanguageModel, Rows, check_usable
from chargpt.runtime import SampleConfig


def decode_threads(num_samples: int, cores: int | None = None, load: float | None = None) -> int:
    """A fast CPU thread count for decoding `num_samples` streams together.

    One stream: 1 thread. Each token is a chain of small matrix-vector products whose halves are too small
    to pay for the hand-off between threads, and with another process on a core every token waits for it
    (docs/benchmarks.md). A batch: up to one thread per
    stream, but only as many as there are idle cores (cores minus the 1-minute load average), since a
    thread that waits for a busy core stalls the others at every token.
    """
    if cores is None:
        cores = usable_cores()
    if load is None:
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if num_samples <= 1:
        return 1
    idle = int(cores - load + 0.5)
    return max(1, min(cores, num_samples, idle))


def pick_next(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | Sequence[torch.Generator] | None,
) -> torch.Tensor:
    """logits (B, V) -> next token ids (B,). With one generator per row, row i draws only from generator[i],
    so a sample's randomness does not depend on the other samples in its batch."""
    scaled = logits.float() / temperature if temperature > 0 else logits
    if temperature == 0 or (torch.isfinite(logits) & ~torch.isfinite(scaled)).any():
        # greedy, or a temperature so small that it is 0 in float32 or a scaled logit overflows: its limit, the
        # likeliest token (ties: the lowest id, as argmax picks)
        return logits.argmax(-1)
    logits = scaled
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p  # mass before this token already reaches top_p
        drop[:, 0] = False  # the likeliest token always stays (a top_p that is 0 in float32 keeps it alone)
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    probs = logits.softmax(-1).cpu()  # (B, V)
    if isinstance(generator, Sequence) and len(generator) == 1 == probs.size(0):
        generator = generator[0]  # the same draw as below, without the per-row list (a stream's every token)
    if generator is None or isinstance(generator, torch.Generator):
        nxt = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    else:
        if len(generator) != probs.size(0):
            raise ValueError(f"{len(generator)} generators for a batch of {probs.size(0)}")
        nxt = torch.cat([torch.multinomial(probs[i : i + 1], 1, generator=g)[0] for i, g in enumerate(generator)])
    return nxt.to(logits.device)


class Penalties:
    """OpenAI's frequency and presence penalties for B rows: logits[j] - count[j] * frequency - (count[j] > 0) *
    presence, count[j] being how often row's sample has generated token j (its prompt does not count). Each row's
    counts are its own, so a row's numbers do not depend on the others in its batch."""

    def __init__(self, batch_size: int, vocab_size: int, frequency: float, presence: float, device: torch.device):
        self.frequency, self.presence = float(frequency), float(presence)
        self.counts = torch.zeros(batch_size, vocab_size, device=device)  # (B, vocab)

    @staticmethod
    def of(
        batch_size: int, vocab_size: int, frequency: float, presence: float, device: torch.device
    ) -> Penalties | None:
        """The penalties, or None where both are 0 (the logits then go to sampling untouched)."""
        if not frequency and not presence:
            return None
        return Penalties(batch_size, vocab_size, frequency, presence, device)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """logits (B, vocab) -> the penalized logits (float32)."""
        seen = (self.counts > 0).float()
        return logits.float() - self.counts * self.frequency - seen * self.presence

    def add(self, tokens: torch.Tensor) -> None:
        """The tokens (B,) just generated."""
        self.counts[torch.arange(tokens.numel(), device=tokens.device), tokens] += 1


def top_logprobs(logits: torch.Tensor, chosen: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits (N, vocab) of the model (before temperature and penalties) and the tokens that came next (N,) ->
    their log-probabilities (N,), and the k likeliest tokens' ids and log-probabilities (N, k) each."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    best = torch.topk(logp, k, dim=-1)  # k = 0: (N, 0) each
    return logp.gather(-1, chosen.view(-1, 1)).squeeze(-1), best.indices, best.values


class Decoder:
    """Next-token logits of a growing sequence, exactly as the no-cache model computes them.

    Call it with the whole sequence so far (B, n), each call one token longer than the last. Inside the window
    the cache feeds only the new token (chargpt.inference.decode's one-token step). The model has learned absolute
    positions, so past block_size the no-cache model sees the last block_size tokens at positions
    0..block_size-1, every position shifting at every step: then the cache is rebuilt from those tokens (one
    full forward per token, the final layer run for the last position only). Any other call (a first call, a
    sequence that did not grow by one) rebuilds too.

    prefill / decode: the number format of the rebuilds (batched) and of the one-token steps.
    static: run the one-token step with fixed shapes; on CUDA it is then captured once in a CUDA graph and
    replayed for every token, which removes the per-kernel launch cost that bounds batch-1 decoding on a GPU.
    None = on CUDA only.
    step / cache: a step to share (its weights gathered once for many decoders) and a cache to fill (e.g. a
    row of the server's pool); by default the decoder makes its own.
    """

    def __init__(
        self,
        model: LanguageModel,
        batch_size: int,
        use_cache: bool = True,
        prefill: prec.Choice = prec.FP32,
        decode: prec.Choice = prec.FP32,
        static: bool | None = None,
        step: DecodeStep | None = None,
        cache: KVCache | None = None,
    ):
        self.model = model
        self.block_size = model.config.block_size
        self.cache: KVCache | None = None
        p = next(model.parameters())
        self.device = p.device
        self.prefill, self.decode = prefill, decode
        self.step: DecodeStep | None = None
        self.graph: StaticStep | None = None
        if use_cache and model.decodes_with_cache:
            self.step = step or DecodeStep(model)
            static = self.device.type == "cuda" if static is None else static
            self.cache = cache or self.step.cache(batch_size)
            if static:
                self.graph = StaticStep(self.step, self.cache, batch_size, decode)
        self.seen = 0  # length of the sequence the cache holds

    def __call__(self, seq: torch.Tensor) -> torch.Tensor:
        """seq (B, n) -> logits (B, vocab) for token n."""
        n = seq.size(1)
        window = self.model.context(seq)  # what the no-cache model sees: (B, <= block_size)
        cache = self.cache
        if cache is None:
            with prec.autocast(self.device, self.prefill):
                return self.model(window)[0][:, -1]
        if self.feeds_one(n):
            if self.graph is not None:
                logits = self.graph(seq[:, -1], cache.length)  # (B, vocab)
            else:
                with prec.autocast(self.device, self.decode):
                    logits = self.step(seq[:, -1], cache, cache.length)  # the token at cache.length: (B, vocab)
            cache.length += 1
        else:
            cache.reset()  # (re)build: the window at positions 0..
            with prec.autocast(self.device, self.prefill):
                logits = self.model(window, cache=cache)[0][:, -1]
        self.seen = n
        return logits

    def feeds_one(self, n: int) -> bool:
        """Whether a call with a sequence of n tokens feeds only the newest one through the cache (else the
        cache is rebuilt). The serving engine batches exactly these steps across requests."""
        cache = self.cache
        return cache is not None and n == self.seen + 1 and 0 < cache.length < self.block_size

    @property
    def position(self) -> int:
        """Where the next token goes in the cache (the step that feeds it writes its keys there)."""
        return self.cache.length if self.cache is not None else 0

    def fed(self, n: int) -> None:
        """The newest of n tokens went through this decoder's cache in a step run for several decoders at once
        (the server's batched step, valid where feeds_one(n)): counted as a call would count it."""
        if self.cache is None or not self.feeds_one(n):
            raise ValueError(f"this decoder cannot take token {n} through its cache in one step")
        self.cache.length += 1
        self.seen = n


class BatchDecoder:
    """Many sequences, each at its own length, decoded together: the server's decoder.

    Each sequence gets its own Decoder (open()), whose cache is a row (slot) of one shared pool when batching is
    on. logits() then runs, for every sequence that feeds one token through its cache, one batched step over
    the pool (chargpt.inference.decode with `Rows`: each row at its own position in its own slot); a sequence
    that must build its cache (its prompt, or every step past block_size) runs its own forward, as generate()
    does. per_row: None, no batching (each sequence decodes alone); False, the batch-invariant batched
    products; True, each product one row at a time (see decode.DecodeStep).
    """

    def __init__(
        self, model: LanguageModel, capacity: int, prefill: prec.Choice, decode: prec.Choice, per_row: bool | None
    ):
        self.model, self.prefill, self.decode = model, prefill, decode
        cached = model.decodes_with_cache
        self.one = DecodeStep(model) if cached else None  # each sequence's own step (the weights gathered once)
        self.rows: DecodeStep | None = None
        self.pool: KVCache | None = None
        if cached and per_row is not None:
            self.rows = DecodeStep(model, invariant=True, per_row=per_row)
            self.pool = self.rows.cache(capacity)
        self._free = list(range(capacity))  # a heap: the lowest slot first, so that the busy slots stay together
        self._slots: dict[int, int] = {}  # id(decoder) -> its slot

    @property
    def batched(self) -> bool:
        return self.pool is not None

    def open(self) -> Decoder:
        """A decoder for a new sequence (in a free slot of the pool when batching; at most `capacity` open)."""
        slot, cache = None, None
        if self.pool is not None:
            slot = heapq.heappop(self._free)
            cache = self.pool.row(slot)
        decoder = Decoder(
            self.model, 1, prefill=self.prefill, decode=self.decode, static=None if cache is None else False,
            step=self.one, cache=cache,
        )  # fmt: skip
        if slot is not None:
            self._slots[id(decoder)] = slot
        return decoder

    def close(self, decoder: Decoder) -> None:
        """The sequence is done: its slot is free again."""
        slot = self._slots.pop(id(decoder), None)
        if slot is not None:
            heapq.heappush(self._free, slot)

    def logits(self, decoders: Sequence[Decoder], seqs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Next-token logits (1, vocab) for each sequence seqs[i] (1, n_i) of decoders[i], each one token longer
        than at its decoder's last call: the ones that feed one token through their cache in one batched step."""
        fast = [
            i for i, (d, seq) in enumerate(zip(decoders, seqs, strict=True))
            if id(d) in self._slots and d.feeds_one(seq.size(1))
        ]  # fmt: skip
        out: list[torch.Tensor | None] = [None] * len(decoders)
        if fast and self.rows is not None and self.pool is not None:
            tokens = torch.cat([seqs[i][0, -1:] for i in fast])  # (B,)
            at = Rows([self._slots[id(decoders[i])] for i in fast], [decoders[i].position for i in fast])
            with prec.autocast(tokens.device, self.decode):
                logits = self.rows(tokens, self.pool, at)  # (B, vocab)
            for j, i in enumerate(fast):
                decoders[i].fed(seqs[i].size(1))
                out[i] = logits[j : j + 1]
        return [o if o is not None else d(seq) for o, d, seq in zip(out, decoders, seqs, strict=True)]


class StaticStep:
    """The one-token step on fixed buffers (token, position in; logits out), so that on CUDA it can be
    captured once in a CUDA graph and replayed per token. Elsewhere it runs eagerly (the tests compare it
    with the ordinary step on a CPU). The graph is captured at the first call, replaying kernels that read
    the buffers, so every later call only copies the new token and position in."""

    def __init__(self, step: DecodeStep, cache: KVCache, batch_size: int, decode: prec.Choice):
        device = cache.k[0].device
        self.step, self.cache, self.decode, self.device = step, cache, decode, device
        self.tok = torch.zeros(batch_size, dtype=torch.long, device=device)  # (B,)
        self.pos = torch.zeros((), dtype=torch.long, device=device)
        self.graphed = device.type == "cuda"
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None  # the graph's output buffer: (B, vocab)

    def _run(self) -> torch.Tensor:
        # no autocast weight cache while a graph is captured: a cached cast would not be replayed
        with prec.autocast(self.device, self.decode, cache_enabled=not self.graphed):
            return self.step(self.tok, self.cache, self.pos)

    def __call__(self, token: torch.Tensor, pos: int) -> torch.Tensor:
        """token (B,) at position pos -> logits (B, vocab); writes that position's keys and values."""
        self.tok.copy_(token)
        self.pos.fill_(pos)
        if not self.graphed:
            return self._run()
        if self.graph is None:
            self._capture()
        self.graph.replay()
        return self.logits.clone()

    def _capture(self) -> None:
        """Warm up on a side stream (workspaces, lazy init), then record. Running the step for this token and
        position twice is harmless: it writes the same keys and values to the same slot."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._run()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.logits = self._run()
        self.graph = graph


def sampling_setup(
    model: LanguageModel, precision: str, quantize: str
) -> tuple[LanguageModel, quant.Choice, prec.Choice, prec.Choice]:
    """What a sampler runs: the model (int8 weights where `quantize` resolves to them), that choice, and the number
    formats of the prefills and the one-token steps. token_stream and the server both take it from here, which is
    what makes a seeded request return exactly generate()'s text."""
    device = next(model.parameters()).device
    run, choice = quant.apply(model, quantize, device)
    prefill, decode = (prec.resolve(precision, device, kind) for kind in ("prefill", "decode"))
    return run, choice, prefill, quant.decode_format(run, decode)  # type: ignore[return-value]


@torch.inference_mode()
def token_stream(
    model: LanguageModel,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    use_cache: bool = True,
    precision: str = "fp32",
    quantize: str = "none",
    frequency_penalty: float = 0.0,
    presence_penalty: float = 0.0,
) -> Iterator[torch.Tensor]:
    """Yield the next token ids (B,) one step at a time, continuing the prompts idx (B, T0).

    use_cache=False re-runs the whole window every step (the reference behaviour the tests compare to).
    precision: fp32, bf16 or auto, resolved for the batched rebuilds ("prefill") and one-token steps ("decode").
    quantize: none, int8 or auto: the model's Linear weights as int8 (chargpt.inference.quantize) for the whole
    generation.
    """
    B, T0 = idx.shape
    memory.check(
        8 * B * (T0 + max_new_tokens), idx.device, f"a buffer for {max_new_tokens:,} new characters per sample",
        "ask for fewer new tokens (or stream them in several calls)",
    )  # fmt: skip
    seq = torch.empty(B, T0 + max_new_tokens, dtype=torch.long, device=idx.device)  # no torch.cat per step
    seq[:, :T0] = idx
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    run, _, prefill, decode = sampling_setup(model, precision, quantize)
    decoder = Decoder(run, B, use_cache, prefill, decode)
    penalties = Penalties.of(B, model.config.vocab_size, frequency_penalty, presence_penalty, device)
    try:
        with prec.weight_cast_region(device, prefill, decode):  # each weight is cast once, not per token
            for n in range(T0, T0 + max_new_tokens):
                logits = decoder(seq[:, :n])  # (B, vocab)
                if penalties is not None:
                    logits = penalties(logits)
                nxt = pick_next(logits, temperature, top_k, top_p, generator)  # (B,)
                if penalties is not None:
                    penalties.add(nxt)
                seq[:, n] = nxt
                yield nxt
    finally:
        model.train(was_training)


def _encode_prompt(tokenizer: CharTokenizer, prompt: str, num_samples: int, device: torch.device) -> torch.Tensor:
    if not prompt:
        raise ChargptError("the prompt is empty; give at least one character (e.g. --prompt $'\\n')")
    ids = torch.as_tensor(tokenizer.encode(prompt), device=device)
    return ids[None, :].expand(num_samples, -1).contiguous()  # (num_samples, T0)


def row_generators(seed: int | None, num_samples: int) -> list[torch.Generator]:
    """One generator per sample, seeded seed, seed+1, ...: sample i of a batch equals a single sample with
    seed+i (up to float rounding in batched matmuls). No seed: a fresh random one."""
    if seed is None:
        seed = torch.Generator().seed() % 2**62
    return [torch.Generator().manual_seed(seed + i) for i in range(num_samples)]


def _stop_holdback(pending: str, stop: Sequence[str]) -> int:
    """How much of `pending` is safe to emit: everything before a suffix that could start a stop string."""
    for i in range(len(pending)):
        if any(s.startswith(pending[i:]) for s in stop):
            return i
    return len(pending)


@dataclass
class StopFilter:
    """One sample's text as it grows, cut before the first stop string: hands out only text that can no
    longer turn out to be the start of a stop string. Shared by stream() and the server."""

    stop: tuple[str, ...]
    text: str = ""
    emitted: int = 0  # characters of text already handed out
    stopped: bool = False  # a stop string was hit; text ends before it

    def push(self, char: str) -> str:
        """Add one generated character; return the text that became safe to show (often "")."""
        self.text += char
        hit = next((s for s in self.stop if self.text.endswith(s)), None)
        if hit is not None:
            self.text = self.text[: len(self.text) - len(hit)]
            self.stopped = True
            return self.flush()
        safe = self.emitted + _stop_holdback(self.text[self.emitted :], self.stop) if self.stop else len(self.text)
        chunk, self.emitted = self.text[self.emitted : safe], safe
        return chunk

    def flush(self) -> str:
        """The rest of the text, held back or not (the sample has ended)."""
        chunk, self.emitted = self.text[self.emitted :], len(self.text)
        return chunk


def _check_args(model: object, tokenizer: object, prompt: object, config: object, where: str) -> None:
    check_usable(model, tokenizer, where)
    if not isinstance(prompt, str):
        raise TypeError(f"{where} takes the prompt as a str, got {type(prompt).__name__}")
    if config is not None and not isinstance(config, SampleConfig):
        raise TypeError(f"{where} takes a SampleConfig as config (or its fields as keywords)")


def _steps(model: LanguageModel, idx: torch.Tensor, cfg: SampleConfig) -> Iterator[torch.Tensor]:
    """token_stream with a SampleConfig's settings, one generator per sample (seed, seed + 1, ...)."""
    gens = row_generators(cfg.seed, idx.size(0))
    return token_stream(
        model, idx, cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p, gens, True, cfg.precision,
        cfg.quantize, cfg.frequency_penalty, cfg.presence_penalty,
    )  # fmt: skip


def stream(
    model: LanguageModel, tokenizer: CharTokenizer, prompt: str, config: SampleConfig | None = None, **kwargs
) -> Iterator[str]:
    """Yield the continuation of `prompt` in text chunks as they are produced (one sample)."""
    _check_args(model, tokenizer, prompt, config, "stream()")
    cfg = config or SampleConfig(**kwargs)
    cfg.validate()
    if cfg.num_samples != 1:
        raise ChargptError("streaming produces one sample; use generate() for num_samples > 1")
    device = next(model.parameters()).device
    idx = _encode_prompt(tokenizer, prompt, 1, device)
    chars = tokenizer.to_list()
    text = StopFilter(tuple(cfg.stop))
    steps = _steps(model, idx, cfg)
    for nxt in steps:
        chunk = text.push(chars[int(nxt[0])])
        if chunk:
            yield chunk
        if text.stopped:
            return
    rest = text.flush()
    if rest:
        yield rest


def generate(
    model: LanguageModel, tokenizer: CharTokenizer, prompt: str, config: SampleConfig | None = None, **kwargs
) -> list[str]:
    """Return num_samples continuations of `prompt` (without the prompt), generated as one batch."""
    _check_args(model, tokenizer, prompt, config, "generate()")
    cfg = config or SampleConfig(**kwargs)
    cfg.validate()
    device = next(model.parameters()).device
    idx = _encode_prompt(tokenizer, prompt, cfg.num_samples, device)
    chars = tokenizer.to_list()
    texts = [""] * cfg.num_samples
    done = [False] * cfg.num_samples
    steps = _steps(model, idx, cfg)
    for nxt in steps:
        for i, ch in enumerate(chars[t] for t in nxt.tolist()):
            if done[i]:
                continue
            texts[i] += ch
            hit = next((s for s in cfg.stop if texts[i].endswith(s)), None)
            if hit is not None:
                texts[i] = texts[i][: len(texts[i]) - len(hit)]
                done[i] = True
        if all(done):
            break
    return texts
