"""The model for the minutes you have: with a time budget on a CPU and no shape given, `chargpt train` picks the
largest shape of a ladder that still sees enough tokens per parameter in that budget on this machine.

The rule (`choose`) is a pure function of the budget, each rung's training throughput on this machine and the
corpus size; why each part of it is what it is, with the measurements, is docs/design.md.
`measure` times a rung's real training step (forward, backward, optimizer) in fp32 and, where the CPU has
native bf16, in bf16, and keeps the faster: about a second per rung, and only rungs that may pass the rule are
timed (a rung is timed only when the budget is hundreds of times its step).
The command line's parser reads this module's constants for --help, so it imports only the standard library at
the top: torch, the model and the corpus are imported by the functions that measure and count.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from chargpt.errors import ChargptError

# Settings every sized run shares: Muon with a warmup-stable-decay schedule that ends with the budget, no
# dropout (short runs on CPU; dropout costs ~20% of a step), evaluation cheap beside the budget.
COMMON: dict[str, Any] = {
    "optimizer": "muon",
    "schedule": "wsd",
    "decay_fraction": 0.3,
    "min_lr_ratio": 0.0,
    "warmup_updates": 50,
    "dropout": 0.0,
    "window_order": "shuffled",
    "checkpoint_interval": 500,
}
# A moving average of the weights, scored beside them (--ema), in runs of EMA_MIN_STEPS or more (docs/design.md)
EMA, EMA_MIN_STEPS = 0.995, 2_000
# Evaluations: about EVAL_POINTS over the budget, each costing at most ~EVAL_SHARE of the steps between two (a batch
# of evaluation, forward only, costs about a third of a training step's, for each split scored)
EVAL_POINTS, EVAL_SHARE = 12, 0.1
MAX_EVAL_INTERVAL, MAX_EVAL_ITERS, MIN_EVAL_ITERS = 500, 40, 4
TOKENS_PER_PARAM = 4.0  # a larger rung is chosen only if it sees at least this many tokens per parameter
MAX_PARAMS_PER_CHAR = 1.0  # and has at most this many parameters per corpus character (else it memorises the text)
# Weight decay by how many times the run reads its corpus: (passes at least, weight decay) (docs/design.md)
WEIGHT_DECAY_BY_PASSES = ((0.0, 0.1), (10.0, 0.6))
MIN_CONTEXT = 8  # the shortest context a sized run trains with
PROBE_S = 0.3  # seconds of timed steps per format per rung (after a warm-up step) ...
PROBE_SHARE = 0.005  # ... or this share of the budget where that is less (a 10 s run does not time for seconds)
MEASURE_VOCAB = 96  # the head's width while timing (the corpus's vocabulary is not known yet; it costs little)


@dataclass(frozen=True)
class Rung:
    """One shape of the ladder, with the batch size and learning rate that suit it."""

    n_embd: int
    n_heads: int
    n_layers: int
    block_size: int
    batch_size: int
    learning_rate: float

    @property
    def params(self) -> int:
        """Parameters in the transformer blocks (embeddings and head excluded, as in scaling-law counts)."""
        return self.n_layers * (12 * self.n_embd * self.n_embd + 13 * self.n_embd)

    def settings(self) -> dict[str, Any]:
        shape = {k: getattr(self, k) for k in ("n_embd", "n_heads", "n_layers", "block_size", "batch_size")}
        return {**COMMON, **shape, "learning_rate": self.learning_rate}


LADDER = (
    Rung(128, 4, 4, 128, 16, 3e-3),
    Rung(192, 6, 4, 128, 16, 3e-3),
    Rung(256, 8, 4, 128, 16, 3e-3),
    Rung(256, 8, 6, 256, 16, 2e-3),
    Rung(384, 6, 6, 256, 16, 1.5e-3),
)


@dataclass(frozen=True)
class Choice:
    rung: Rung
    tokens_per_s: float
    reason: str
    weight_decay: float
    steps: float = math.inf  # how many steps the budget is expected to give
    block_size: int | None = None  # the context, where a short corpus caps the rung's

    def settings(self) -> dict[str, Any]:
        """The sized run's settings: the rung's, the weight decay for the corpus passes it will make, and
        evaluations spaced for a learning curve of about EVAL_POINTS points."""
        context = {"block_size": self.block_size} if self.block_size else {}
        ema = EMA if self.steps >= EMA_MIN_STEPS else 0.0
        spacing = evaluation(self.steps, splits=3 if ema else 2)
        return {**self.rung.settings(), "weight_decay": self.weight_decay, "ema": ema, **spacing, **context}


def evaluation(steps: float, splits: int = 2) -> dict[str, int]:
    """eval_interval and eval_iters for a run of about `steps` steps (see EVAL_POINTS) whose evaluations score
    `splits` splits (3 with --ema)."""
    interval = min(MAX_EVAL_INTERVAL, round(steps / EVAL_POINTS)) if steps < math.inf else MAX_EVAL_INTERVAL
    interval = max(min_eval_interval(splits), interval)
    iters = int(interval * EVAL_SHARE * 3 / splits)
    return {"eval_interval": interval, "eval_iters": max(MIN_EVAL_ITERS, min(MAX_EVAL_ITERS, iters))}


def min_eval_interval(splits: int) -> int:
    """The shortest spacing at which even MIN_EVAL_ITERS batches of each split stay within EVAL_SHARE."""
    return math.ceil(MIN_EVAL_ITERS * splits / 3 / EVAL_SHARE)


def weight_decay(passes: float) -> float:
    """The weight decay for a run that reads its corpus `passes` times (WEIGHT_DECAY_BY_PASSES)."""
    return [decay for least, decay in WEIGHT_DECAY_BY_PASSES if passes >= least][-1]


def context_for(corpus_chars: int, val_fraction: float = 0.1) -> int | None:
    """The context a corpus this short allows (its validation split must hold a window and its next character),
    None where the ladder's fit; a corpus too short for even MIN_CONTEXT is refused, before any timing."""
    room = int(corpus_chars * val_fraction) - 1
    if room >= LADDER[-1].block_size:
        return None
    if room < MIN_CONTEXT:
        raise ChargptError(
            f"the corpus has {corpus_chars:,} characters: its validation split (the last {val_fraction:.0%}) would "
            f"hold {max(room + 1, 0)}, too few for a context of even {MIN_CONTEXT}; give a longer text"
        )
    return room


def choose(
    budget_s: float, tokens_per_s: Callable[[Rung], float], corpus_chars: int, val_fraction: float = 0.1
) -> Choice:
    """The largest rung that sees >= TOKENS_PER_PARAM tokens per parameter in the budget and is not large for the
    corpus; the first rung always qualifies. `tokens_per_s` is called on rungs in order, up to the first refused,
    and not on that one where the last rung's speed already rules it out (each rung costs more per token than the
    one before it, so it is never faster). A corpus too short for a rung's context caps it (context_for)."""
    cap = context_for(corpus_chars, val_fraction)
    chosen, speed = LADDER[0], tokens_per_s(LADDER[0])
    why = "the largest shape of the ladder"
    for rung in LADDER[1:]:
        if rung.params > MAX_PARAMS_PER_CHAR * corpus_chars:
            why = f"a larger one would be large for a corpus of {corpus_chars:,} characters"
            break
        if budget_s * speed < TOKENS_PER_PARAM * rung.params:
            most = budget_s * speed / rung.params  # at the last rung's speed, which it cannot beat
            why = f"the next, {rung.params / 1e6:.1f}M parameters, would see fewer than {most:.1f}"
            break
        rate = tokens_per_s(rung)
        if budget_s * rate < TOKENS_PER_PARAM * rung.params:
            why = (
                f"the next, {rung.params / 1e6:.1f}M parameters at {rate:,.0f} tokens/s, would see "
                f"{budget_s * rate / rung.params:.1f}"
            )
            break
        chosen, speed = rung, rate
    seen = budget_s * speed / chosen.params
    if seen < TOKENS_PER_PARAM:
        rule = f"the smallest shape (none sees {TOKENS_PER_PARAM:g} tokens per parameter in so short a budget)"
    else:
        rule = f"the largest shape that sees >= {TOKENS_PER_PARAM:g} tokens per parameter ({seen:.0f}); {why}"
    passes = budget_s * speed / max(corpus_chars, 1)
    decay = weight_decay(passes)
    if decay != WEIGHT_DECAY_BY_PASSES[0][1]:
        rule += f"; weight decay {decay:g}, as it reads the corpus ~{passes:.0f} times"
    block = min(chosen.block_size, cap) if cap else None
    if block and block < chosen.block_size:
        rule += f"; context {block}, as long as the corpus's validation split allows"
    steps = budget_s * speed / (chosen.batch_size * (block or chosen.block_size))
    reason = f"sized for {budget_s:g} s at this machine's {speed:,.0f} tokens/s: {rule}"
    return Choice(chosen, speed, reason, decay, steps, block)


def corpus_chars(data: str | None) -> int:
    """The corpus's size in bytes (characters, for ASCII text): the file, a folder's or a glob's files, or the
    embedded Shakespeare. Raises the same one-line errors the run would."""
    from chargpt.data import corpus

    if data is None:
        return corpus.shakespeare_bytes()
    return sum(f.stat().st_size for f in corpus.corpus_files(data))


def probe_seconds(budget_s: float) -> float:
    """Seconds of timed steps per format per rung for a run of `budget_s` seconds."""
    return min(PROBE_S, PROBE_SHARE * budget_s)


def measure(rung: Rung, threads: int, probe_s: float = PROBE_S) -> float:
    """Training tokens/s of the rung's real step on this CPU at `threads` threads, timed now for about `probe_s`
    per format (not cached: how fast a CPU trains depends on what else runs on it, unlike which of two formats is
    faster)."""
    import torch

    from chargpt.machine import precision

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _time(rung, precision.cpu_info(), probe_s)
    finally:
        torch.set_num_threads(before)


def _time(rung: Rung, info: Any, probe_s: float) -> float:
    import torch

    from chargpt.config import TrainConfig
    from chargpt.machine import precision
    from chargpt.model import build_model
    from chargpt.training.optim import make_optimizer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        cfg = TrainConfig(**rung.settings())
        model = build_model(cfg.model_config(MEASURE_VOCAB))
        optimizer = make_optimizer(model, cfg, torch.device("cpu"))
        x = torch.randint(MEASURE_VOCAB, (rung.batch_size, rung.block_size))
        formats = [precision.Choice("fp32", "sizing")]
        if info.native_bf16:
            formats.append(precision.Choice("bf16", "sizing"))

        def step(choice: precision.Choice) -> None:
            with precision.autocast("cpu", choice):
                _, loss = model(x, x)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        best = []
        for choice in formats:
            step(choice)  # warm-up
            n, t0 = 0, time.perf_counter()
            while n < 2 or time.perf_counter() - t0 < probe_s:
                step(choice)
                n += 1
            best.append((time.perf_counter() - t0) / n)
    return rung.batch_size * rung.block_size / min(best)
