"""The batching engine: every active request decoded together, one model step for all of them.

Each choice of each request is a row with its own Decoder (its slot of chargpt.inference.generate's
BatchDecoder, which runs the model), its own sampling settings and its own torch.Generator, so its text never
depends on what else is in the batch: a request with a seed gets exactly what `chargpt.generate` returns. Each
step, the BatchDecoder runs the one-token step once for every row that continues through its cache
(batch-invariant: each row's numbers are its own batch-of-one step's); a row that must build its cache (its
prompt, or every step past block_size) runs that forward on its own, as generate() does. This module only
schedules: which rows run, their sampling, and their pieces of text. A request joins at the next step and its
rows leave as soon as they finish or it is cancelled. The model runs in one background thread; results go
back through a `deliver` callback (the HTTP layer hands them to its event loop). At most `max_batch` rows
run at once; up to `max_queue` requests wait beyond that, and `submit` refuses the rest (QueueFull).
One request holds at most `share_cap(max_batch)` rows at a time (its other choices start as its rows finish),
so a request that arrives behind a large `n` starts at the next step instead of waiting for it to end.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from chargpt.data.tokenizer import CharTokenizer
from chargpt.inference.decode import batch_invariant
from chargpt.inference.evaluate import token_logprobs
from chargpt.inference.generate import (
    BatchDecoder,
    Decoder,
    Penalties,
    StopFilter,
    pick_next,
    row_generators,
    sampling_setup,
    top_logprobs,
)
from chargpt.machine import precision as prec
from chargpt.model import GPT, LanguageModel

log = logging.getLogger("chargpt.serve")


def batching_mode(exact: Callable[[bool], bool]) -> tuple[bool | None, str]:
    """How rows are decoded together, and why (for the start-up line): `exact(per_row)` checks on the real model,
    at this thread count, that the batched step gives each row's own bits. The fused form (one batched product
    per weight) first; else each product one row at a time, the single-row step's own calls (a BLAS that
    splits a one-row sum between threads but not a batch's rows); else rows one by one.
    Returns per_row (False, True) or None for no batching."""
    threads = f"{torch.get_num_threads()} thread{'s' if torch.get_num_threads() > 1 else ''}"
    if exact(False):
        return False, f"batched decoding (exact here at {threads})"
    if exact(True):
        return True, (
            f"batched decoding with one product per row (exact here at {threads}; this CPU's batched products "
            f"round unlike one-row ones)"
        )
    return None, "batched decoding does not reproduce single-row results here; decoding rows one by one"


class QueueFull(Exception):
    """Every batch slot is busy and the wait queue is full: try again shortly."""


class ShuttingDown(Exception):
    """The server is stopping: no new requests, and those still running at the deadline are ended."""


class StepFailed(Exception):
    """The model step raised (a bug, out of memory): the jobs in that step end with this; the engine goes on."""


@dataclass(frozen=True)
class ChoiceSpec:
    """What one row generates: the prompt's token ids and generate()'s settings for one sample."""

    prompt_ids: Sequence[int]
    max_new_tokens: int
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # the likeliest characters to list at each place (0-5); None: no logprobs
    echo: bool = False  # with logprobs: score the prompt too (its first character has none)
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0


@dataclass(frozen=True)
class Scored:
    """One character of a text with its log-probability under the model (before temperature and penalties) and
    the likeliest characters at its place; the prompt's first character has neither (logprob None)."""

    token: str
    logprob: float | None
    top: dict[str, float] | None


@dataclass
class Piece:
    """New text for one choice; finish_reason ("stop" | "length") marks its last piece. With logprobs asked for,
    `logprobs` scores each character of `text`, and a choice's first piece carries the scored prompt if echoed."""

    index: int
    text: str
    finish_reason: str | None = None
    completion_tokens: int = 0  # characters generated so far, a cut-off stop string included
    logprobs: list[Scored] | None = None
    prompt: list[Scored] | None = None


Delivery = list[Piece] | ShuttingDown | StepFailed


@dataclass(eq=False)
class Job:
    """One request: its choices and where their pieces go. `deliver` is called from the engine thread."""

    choices: list[ChoiceSpec]
    deliver: Callable[[Delivery], None]
    cancelled: bool = False
    held: int = 0  # batch places reserved for its rows and not yet given back (engine lock)
    admitted: int = 0  # how many of its choices have been given places so far (engine lock)


@dataclass(eq=False)
class _Row:
    job: Job
    index: int
    spec: ChoiceSpec
    decoder: Decoder
    seq: torch.Tensor  # (1, prompt + max_new_tokens): the prompt, then the tokens generated so far
    n: int  # tokens in seq
    generator: torch.Generator
    text: StopFilter
    penalties: Penalties | None = None
    scored: list[Scored] = field(default_factory=list)  # generated characters not yet handed out, with logprobs
    produced: int = 0


def share_cap(max_batch: int) -> int:
    """The most rows one request holds at once: a quarter of the places (at least one) stay for the others."""
    return max(1, max_batch - max(1, max_batch // 4))


@dataclass(frozen=True)
class Joining:
    """Choices first .. first + count - 1 of a job, with places reserved: their rows start at the next step."""

    job: Job
    first: int
    count: int


@dataclass
class _Shared:
    """State the request threads and the engine thread share; guarded by Engine._cond."""

    waiting: deque[Job] = field(default_factory=deque)  # jobs with choices not yet admitted, in arrival order
    joining: list[Joining] = field(default_factory=list)  # places reserved; they start at the next step
    reserved: int = 0  # rows running or joining
    closing: bool = False
    deadline: float | None = None  # when closing: end whatever still runs at this time.monotonic()


class Engine:
    """Continuous batching over one model; start() it, submit() jobs, close() it."""

    def __init__(
        self,
        model: LanguageModel,
        tokenizer: CharTokenizer,
        max_batch: int = 32,
        max_queue: int = 64,
        precision: str = "auto",
        quantize: str = "auto",
        on_step: Callable[[int, float], None] | None = None,
    ):
        # the model and formats as chargpt.generate resolves them: a seeded request returns exactly its text
        model, self.quantize, self.prefill, self.decode = sampling_setup(model.eval(), precision, quantize)
        self.model = model
        self.chars = tokenizer.to_list()
        self.device = next(model.parameters()).device
        self.max_batch, self.max_queue = max_batch, max_queue
        self.on_step = on_step  # after each step: (rows in it, its seconds), for the server's metrics
        self.cap = share_cap(max_batch)
        per_row, self.batching = None, "rows decoded one by one (this model has no KV cache)"
        cached = model if isinstance(model, GPT) and model.decodes_with_cache else None
        if cached is not None:
            per_row, self.batching = batching_mode(
                lambda each: batch_invariant(cached, self.prefill, self.decode, each)
            )
            if per_row is None:
                log.warning("%s on %s", self.batching, self.device)
        self.decoders = BatchDecoder(model, max_batch, self.prefill, self.decode, per_row)  # engine thread only
        self._cond = threading.Condition()
        self._shared = _Shared()
        self._rows: list[_Row] = []  # engine thread only
        self._thread = threading.Thread(target=self._run, name="chargpt-engine", daemon=True)

    @property
    def batched(self) -> bool:
        """Whether rows are decoded together (else one by one)."""
        return self.decoders.batched

    def start(self) -> None:
        self._thread.start()

    def load(self) -> tuple[int, int]:
        """(requests waiting for places, rows running or about to start)."""
        with self._cond:
            return len(self._shared.waiting), self._shared.reserved

    def submit(self, job: Job) -> None:
        """Queue a job; its rows join the batch at the next step with free slots. Raises QueueFull, ShuttingDown."""
        need = len(job.choices)
        if not 1 <= need <= self.max_batch:
            raise ValueError(f"a job needs 1..{self.max_batch} rows, got {need}")
        with self._cond:
            s = self._shared
            if s.closing:
                raise ShuttingDown()
            starts_now = not s.waiting and s.reserved + min(need, self.cap) <= self.max_batch
            if not starts_now and len(s.waiting) >= self.max_queue:
                raise QueueFull()
            s.waiting.append(job)
            self._promote()  # a job that fits now joins at once, without taking a place in the queue
            self._cond.notify()

    def cancel(self, job: Job) -> None:
        """Stop a job now (its client went away): a waiting job leaves the queue, running rows leave at the
        next step. Harmless for a finished job."""
        with self._cond:
            job.cancelled = True
            s = self._shared
            if job in s.waiting:
                s.waiting.remove(job)
            mine = [j for j in s.joining if j.job is job]
            if mine:
                s.joining = [j for j in s.joining if j.job is not job]
                self._give_back(job, sum(j.count for j in mine))
            self._cond.notify()

    def close(self, grace: float = 0.0) -> None:
        """Refuse new jobs; let running and waiting ones go on for `grace` seconds, then end them."""
        with self._cond:
            s = self._shared
            deadline = time.monotonic() + grace
            s.closing = True
            s.deadline = deadline if s.deadline is None else min(s.deadline, deadline)
            self._cond.notify()

    def join(self, timeout: float | None = None) -> None:
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _promote(self) -> None:
        """Give free places to waiting jobs in arrival order, each up to its share (self.cap rows at once); a job
        at its share lets later ones go ahead (call with the lock held)."""
        s = self._shared
        for job in list(s.waiting):
            free = self.max_batch - s.reserved
            if free <= 0:
                return
            take = min(len(job.choices) - job.admitted, self.cap - job.held, free)
            if take <= 0:
                continue
            s.reserved += take
            job.held += take
            s.joining.append(Joining(job, job.admitted, take))
            job.admitted += take
            if job.admitted == len(job.choices):
                s.waiting.remove(job)

    def _give_back(self, job: Job, places: int) -> None:
        """A job's rows finished or left: their places go to waiting jobs that now fit."""
        with self._cond:
            job.held -= places
            self._shared.reserved -= places
            self._promote()

    def _run(self) -> None:
        with torch.inference_mode(), prec.weight_cast_region(self.device, self.prefill, self.decode):
            while (joining := self._wait_for_work()) is not None:
                try:
                    for part in joining:
                        self._start(part)
                    self._remove([r for r in self._rows if r.job.cancelled])
                    if self._rows:
                        began, rows = time.perf_counter(), len(self._rows)
                        self._step()
                        if self.on_step is not None:
                            self.on_step(rows, time.perf_counter() - began)
                except Exception as e:  # a bug or out of memory: end the jobs of this step, keep serving
                    log.exception("the model step failed; ending the requests in it")
                    self._fail([*{id(r.job): r.job for r in self._rows}.values(), *(j.job for j in joining)], e)

    def _wait_for_work(self) -> list[Joining] | None:
        """Block until there are rows to step or jobs to start; return the jobs joining now, or None to stop."""
        with self._cond:
            s = self._shared
            while not (self._rows or s.joining or s.closing):
                self._cond.wait()
            if s.deadline is not None and (time.monotonic() >= s.deadline or not (self._rows or s.joining)):
                self._end_all()
                return None
            joining, s.joining = s.joining, []
            return joining

    def _remove(self, rows: list[_Row]) -> None:
        """Take finished or cancelled rows out of the batch: their cache slots and places are free again."""
        if not rows:
            return
        gone = {id(r) for r in rows}
        self._rows = [r for r in self._rows if id(r) not in gone]
        for r in rows:
            self.decoders.close(r.decoder)
            self._give_back(r.job, 1)

    def _fail(self, jobs: list[Job], error: Exception) -> None:
        with self._cond:  # first out of the queue: no more of their choices may be admitted
            s = self._shared
            s.waiting = deque(j for j in s.waiting if j not in jobs)
            s.joining = [p for p in s.joining if p.job not in jobs]
        self._remove([r for r in self._rows if r.job in jobs])
        for job in {id(j): j for j in jobs}.values():
            self._give_back(job, job.held)
            if not job.cancelled:
                _deliver(job, StepFailed(f"{type(error).__name__}: {error}"))
                job.cancelled = True

    def _end_all(self) -> None:
        """At the deadline: every job still running or waiting gets ShuttingDown (lock held)."""
        s = self._shared
        jobs = {id(r.job): r.job for r in self._rows} | {id(j): j for j in [*(p.job for p in s.joining), *s.waiting]}
        self._rows, s.joining, s.waiting, s.reserved = [], [], deque(), 0
        for job in jobs.values():
            if not job.cancelled:
                _deliver(job, ShuttingDown())

    def _start(self, part: Joining) -> None:
        """Give each of these choices of a job its row; a choice with max_new_tokens 0 finishes at once."""
        job, done, first = part.job, [], []
        scores: dict[tuple[int, ...], list[Scored]] = {}  # n samples of a prompt: scored once
        for index in range(part.first, part.first + part.count):
            spec = job.choices[index]
            prompt = None
            if spec.echo and spec.logprobs is not None:
                key = (spec.logprobs, *spec.prompt_ids)
                if key not in scores:
                    scores[key] = self._score_prompt(spec)
                prompt = scores[key]
            if spec.max_new_tokens == 0:
                done.append(Piece(index, "", "length", 0, [] if spec.logprobs is not None else None, prompt))
                continue
            if prompt is not None:
                first.append(Piece(index, "", None, 0, [], prompt))
            seq = torch.empty(1, len(spec.prompt_ids) + spec.max_new_tokens, dtype=torch.long, device=self.device)
            seq[0, : len(spec.prompt_ids)] = torch.as_tensor(spec.prompt_ids, dtype=torch.long)
            (generator,) = row_generators(spec.seed, 1)
            n, decoder = len(spec.prompt_ids), self.decoders.open()
            penalties = Penalties.of(1, len(self.chars), spec.frequency_penalty, spec.presence_penalty, self.device)
            self._rows.append(_Row(job, index, spec, decoder, seq, n, generator, StopFilter(spec.stop), penalties))
        if done:
            self._give_back(job, len(done))
        if done or first:
            _deliver(job, first + done)

    def _score_prompt(self, spec: ChoiceSpec) -> list[Scored]:
        """The prompt's characters with their log-probabilities, from the model the rows sample from, in the
        prefills' number format; each prompt on its own, so its numbers never depend on the other requests."""
        chars, ids, k = self.chars, list(spec.prompt_ids), spec.logprobs or 0
        scored = [Scored(chars[ids[0]], None, None)]
        if len(ids) > 1:
            picked, best_ids, best = token_logprobs(self.model, ids, k, self.prefill)
            scored += [self._scored(ids[i + 1], picked[i], best_ids[i], best[i]) for i in range(len(ids) - 1)]
        return scored

    def _scored(self, token: int, logprob: torch.Tensor, best_ids: torch.Tensor, best: torch.Tensor) -> Scored:
        top = {self.chars[t]: float(v) for t, v in zip(best_ids.tolist(), best.tolist(), strict=True)}
        top.setdefault(self.chars[token], float(logprob))  # the character itself is always listed
        return Scored(self.chars[token], float(logprob), top)

    def _logits(self) -> list[torch.Tensor]:
        """Next-token logits (1, vocab) for every row (chargpt.inference.generate.BatchDecoder)."""
        return self.decoders.logits([r.decoder for r in self._rows], [r.seq[:, : r.n] for r in self._rows])

    def _step(self) -> None:
        """One token for every row; pieces to their jobs; finished rows free their slots."""
        pieces: dict[int, tuple[Job, list[Piece]]] = {}
        done = []
        failed: dict[int, tuple[Job, Exception]] = {}
        for r, logits in zip(self._rows, self._logits(), strict=True):
            s = r.spec
            if id(r.job) in failed:
                continue
            try:
                chosen = logits if r.penalties is None else r.penalties(logits)
                token = pick_next(chosen, s.temperature, s.top_k, s.top_p, [r.generator])  # (1,)
                nxt = int(token[0])
                if r.penalties is not None:
                    r.penalties.add(token)
                if s.logprobs is not None:
                    picked, best_ids, best = top_logprobs(logits, token, s.logprobs)
                    r.scored.append(self._scored(nxt, picked[0], best_ids[0], best[0]))
            except Exception as e:  # this row's own sampling: it ends its request only, never the others
                log.exception("sampling failed for one request; ending that request")
                failed[id(r.job)] = (r.job, e)
                continue
            r.seq[0, r.n] = nxt
            r.n += 1
            r.produced += 1
            text = r.text.push(self.chars[nxt])
            finish = "stop" if r.text.stopped else "length" if r.produced == s.max_new_tokens else None
            if finish == "length":
                text += r.text.flush()
            if text or finish:
                scored = None
                if s.logprobs is not None:  # one character per token: the text's scores are the oldest pending
                    scored, r.scored = r.scored[: len(text)], r.scored[len(text) :]
                piece = Piece(r.index, text, finish, r.produced, scored)
                pieces.setdefault(id(r.job), (r.job, []))[1].append(piece)
            if finish:
                done.append(r)
        self._remove(done)
        for job, job_pieces in pieces.values():
            if not job.cancelled and id(job) not in failed:
                _deliver(job, job_pieces)
        for job, error in failed.values():
            self._fail([job], error)


def _deliver(job: Job, item: Delivery) -> None:
    try:
        job.deliver(item)
    except RuntimeError:  # the receiving event loop is closed: nobody is listening any more
        job.cancelled = True
