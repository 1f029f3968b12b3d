"""Sampling: KV cache, temperature / top-k / top-p, stop strings, streaming.

With the cache each step feeds only the new token. The model has learned absolute positions, so
once the sequence is longer than block_size the no-cache model sees the last block_size tokens at
positions 0..block_size-1, which shifts every position by one at every step; to see exactly that,
the cache is rebuilt from the last block_size tokens (one full forward per token past the window).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from chargpt.errors import ChargptError
from chargpt.model import GPT, BigramLM, KVCache
from chargpt.tokenizer import CharTokenizer


@dataclass
class SampleConfig:
    max_new_tokens: int = 500
    temperature: float = 1.0  # 0 = greedy
    top_k: int | None = None
    top_p: float | None = None  # nucleus: keep the smallest set of tokens whose probability reaches top_p
    seed: int | None = None  # same seed -> same text
    num_samples: int = 1
    stop: Sequence[str] = field(default_factory=tuple)  # end a sample at any of these; not included

    def validate(self) -> None:
        if not isinstance(self.temperature, (int, float)) or not self.temperature >= 0:
            raise ChargptError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise ChargptError(f"top_k must be an integer >= 1, got {self.top_k}")
        if self.top_p is not None and not (0 < self.top_p <= 1):
            raise ChargptError(f"top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 0:
            raise ChargptError(f"max_new_tokens must be an integer >= 0, got {self.max_new_tokens}")
        if not isinstance(self.num_samples, int) or self.num_samples < 1:
            raise ChargptError(f"num_samples must be an integer >= 1, got {self.num_samples}")
        if any(not s for s in self.stop):
            raise ChargptError("stop strings must not be empty")


def pick_next(
    logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None, generator: torch.Generator | None
) -> torch.Tensor:
    """logits (B, V) -> next token ids (B,)."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p  # mass before this token already reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)


@torch.no_grad()
def token_stream(
    model: GPT | BigramLM,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> Iterator[torch.Tensor]:
    """Yield the next token ids (B,) one step at a time, continuing the prompts idx (B, T0)."""
    block_size = model.config.block_size
    cached = use_cache and isinstance(model, GPT)
    cache: KVCache | None = None
    seq = idx
    for _ in range(max_new_tokens):
        if isinstance(model, BigramLM):
            logits = model(seq[:, -1:])[0][:, -1]
        elif not cached:
            logits = model(seq[:, -block_size:])[0][:, -1]
        elif cache is None or cache.length == block_size:
            # (re)build: the last block_size tokens at positions 0.., exactly what the no-cache model sees
            cache = KVCache(model.config, seq.size(0), seq.device, next(model.parameters()).dtype)
            logits = model(seq[:, -block_size:], cache=cache)[0][:, -1]
        else:
            logits = model(seq[:, -1:], cache=cache)[0][:, -1]
        nxt = pick_next(logits, temperature, top_k, top_p, generator)  # (B,)
        seq = torch.cat([seq, nxt[:, None]], dim=1)
        yield nxt


def _encode_prompt(tokenizer: CharTokenizer, prompt: str, num_samples: int, device: torch.device) -> torch.Tensor:
    if not prompt:
        raise ChargptError("the prompt is empty; give at least one character (e.g. --prompt $'\\n')")
    ids = torch.as_tensor(tokenizer.encode(prompt), device=device)
    return ids[None, :].expand(num_samples, -1).contiguous()  # (num_samples, T0)


def _generator(seed: int | None) -> torch.Generator:
    g = torch.Generator()
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


def _stop_holdback(pending: str, stop: Sequence[str]) -> int:
    """How much of `pending` is safe to emit: everything before a suffix that could start a stop string."""
    for i in range(len(pending)):
        if any(s.startswith(pending[i:]) for s in stop):
            return i
    return len(pending)


def stream(
    model: GPT | BigramLM, tokenizer: CharTokenizer, prompt: str, config: SampleConfig | None = None, **kwargs
) -> Iterator[str]:
    """Yield the continuation of `prompt` in text chunks as they are produced (one sample)."""
    cfg = config or SampleConfig(**kwargs)
    cfg.validate()
    if cfg.num_samples != 1:
        raise ChargptError("streaming produces one sample; use generate() for num_samples > 1")
    device = next(model.parameters()).device
    idx = _encode_prompt(tokenizer, prompt, 1, device)
    text, emitted = "", 0
    for nxt in token_stream(
        model, idx, cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p, _generator(cfg.seed)
    ):
        text += tokenizer.decode(nxt.tolist())
        hit = next((s for s in cfg.stop if text.endswith(s)), None)
        if hit is not None:
            text = text[: len(text) - len(hit)]
            if len(text) > emitted:
                yield text[emitted:]
            return
        safe = emitted + _stop_holdback(text[emitted:], cfg.stop) if cfg.stop else len(text)
        if safe > emitted:
            yield text[emitted:safe]
            emitted = safe
    if len(text) > emitted:
        yield text[emitted:]


def generate(
    model: GPT | BigramLM, tokenizer: CharTokenizer, prompt: str, config: SampleConfig | None = None, **kwargs
) -> list[str]:
    """Return num_samples continuations of `prompt` (without the prompt), generated as one batch."""
    cfg = config or SampleConfig(**kwargs)
    cfg.validate()
    device = next(model.parameters()).device
    idx = _encode_prompt(tokenizer, prompt, cfg.num_samples, device)
    texts = [""] * cfg.num_samples
    done = [False] * cfg.num_samples
    steps = token_stream(model, idx, cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p, _generator(cfg.seed))
    for nxt in steps:
        for i, ch in enumerate(tokenizer.decode(nxt.tolist())):
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
