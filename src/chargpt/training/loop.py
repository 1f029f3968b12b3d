"""The training loop: set up -> steps -> evaluate and save when due -> finish.

The trainer knows nothing about GPT internals: it needs a module returning (logits, loss), the model
directory helpers, and batches. Under torchrun every rank runs this same loop; `batch_size` is the
global batch, drawn from one seeded generator so that any world size sees the same windows. What a
run is set up with lives in `Run`; what changes as it goes lives in `RunState`; both are passed
explicitly to each step of the run.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import signal
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from chargpt.config import TrainConfig
from chargpt.data.corpus import get_batch, prepare_data
from chargpt.data.tokenizer import CharTokenizer
from chargpt.errors import ChargptError, first_line
from chargpt.machine import cores, memory, precision
from chargpt.model import build_model
from chargpt.storage import checkpoint as ckpt
from chargpt.storage.fileio import DiskFullError
from chargpt.training import finetune, report, samples
from chargpt.training.distributed import (
    Dist,
    all_max,
    all_mean,
    finish_distributed,
    init_distributed,
    rank_rows,
    sum_dtype,
)
from chargpt.training.optim import (
    SCHEDULE_KEYS,
    Anchor,
    Optimizer,
    budget_grew,
    extended_anchor,
    in_final_decay,
    learning_rate,
    make_optimizer,
    set_learning_rate,
)
from chargpt.training.outdir import OutDir


@dataclass
class TrainResult:
    out: str
    step: int
    best_val_loss: float
    last_val_loss: float
    elapsed: float
    stopped_by: str  # "n_updates", "max_time", "patience", "pause", "SIGINT", "SIGTERM", or "finished" (nothing left)
    rank: int = 0  # under torchrun, only rank 0 reports
    best_step: int = -1  # the step of the saved (best-val) model


@dataclass
class Run:
    """What a run is set up with; fixed once the first step starts."""

    cfg: TrainConfig
    dist: Dist
    out: Path
    tokenizer: CharTokenizer
    train_ids: np.ndarray | torch.Tensor  # views of the (memory-mapped) token ids
    val_ids: np.ndarray | torch.Tensor
    model: torch.nn.Module  # the plain model: evaluation, saving
    fwd: torch.nn.Module  # the model as trained: compiled and/or DDP-wrapped
    optimizer: Optimizer
    batches: torch.Generator  # draws every training batch; part of the resumable state
    outdir: OutDir | None = None  # the locked output folder, told when the run first saves
    signals: _Signals | None = None  # a signal pending during evaluation cuts it short
    precision: dict[str, precision.Choice] = field(default_factory=dict)  # "train", "eval" -> fp32 / bf16
    tuner: cores.ThreadTuner | None = None  # re-checks the thread count (auto threads on a CPU)
    threads_note: str = ""  # how many CPU threads, and why, for the announcement
    origin: dict[str, Any] | None = None  # a fine-tune's source: path, step, val loss (for config.json)
    prompt: str = "\n"  # what each evaluation's sample continues (samples.prompt_from)

    def autocast(self, kind: str) -> AbstractContextManager:
        """bf16 autocast where the run's precision says so for this kind of work ("train", "eval"); weights
        stay fp32."""
        return precision.autocast(self.dist.device, self.precision[kind])


@dataclass
class RunState:
    """What changes as a run goes; saved with the weights, optimizer and RNG in train_state.pt."""

    step: int = 0
    elapsed: float = 0.0  # wall-clock seconds of the training loop: steps, evaluations, saves (not set-up)
    best_val: float = math.inf
    last_val: float = math.nan
    last_eval_step: int = -1
    metrics: list[dict[str, Any]] = field(default_factory=list)
    stopped_by: str = "n_updates"
    saved_at: float = 0.0  # `elapsed` when the resumable state was last saved (for checkpoint_seconds)
    log_loss_sum: float = 0.0  # training losses since the last training-loss row of metrics.jsonl
    log_loss_count: int = 0
    eval_seconds: float = 0.0  # how long the last evaluation (with its model save) took
    plot_seconds: float = 0.0  # how long the last drawing of loss.png took
    # not saved: this call's clock, and how long the last step and save took
    clock_start: float = field(default_factory=time.perf_counter)
    clock_base: float = 0.0  # elapsed when this call started
    step_seconds: float = 0.0
    save_seconds: float = 0.0
    plotted_at: float = -math.inf  # elapsed at the last drawing of loss.png
    plotted_rows: int = 0  # metrics rows it showed
    evals_since_best: int = 0  # evaluations in a row without a better val loss (for --patience)
    lr_anchor: Anchor | None = None  # where a resume extended the budget: the schedule continues from there
    decaying: bool = False  # WSD past its flat stretch: the state from just before is saved (STABLE_STATE)
    resume_note: str = ""  # how a resume continues the schedule, for the announcement

    def tick(self) -> float:
        """Bring `elapsed` up to now; --max-time counts everything the loop does, evaluations included."""
        self.elapsed = self.clock_base + time.perf_counter() - self.clock_start
        return self.elapsed

    def reserve(self) -> float:
        """Seconds to keep for the rest of a time-budgeted run after one more step: that step, the final
        evaluation, plot and save (each as long as the last one measured)."""
        return self.step_seconds + self.eval_seconds + self.plot_seconds + self.save_seconds


@dataclass
class LossLog:
    """Per-step training losses, kept on the device until read.

    Reading a loss (`.item()`) makes the host wait for the device; on a GPU, once per step that stops the CPU
    from queueing the next steps' work ahead. So the loop reads every `every` steps, and before anything that
    evaluates, saves or finishes, in one transfer. A diverged step is therefore noticed at the next read (at
    most `every` - 1 steps later, steps never saved), and reported with its own step number. On a CPU reading
    costs nothing, and `every` is 1.
    """

    every: int = 1
    history: list[float] | None = None  # when a list is given, every step's loss is appended to it
    pending: list[torch.Tensor] = field(default_factory=list)  # 0-dim losses of steps first, first+1, ...
    first: int = 0
    last: float = math.nan  # the latest loss read

    def add(self, step: int, loss: torch.Tensor) -> None:
        if not self.pending:
            self.first = step
        self.pending.append(loss)

    def read(self) -> tuple[int, list[float]]:
        """Bring the pending losses to the host: (the step of the first, the losses in step order)."""
        if not self.pending:
            return self.first, []
        values = torch.stack(self.pending).tolist()  # one host-device sync for all of them
        first, self.pending = self.first, []
        if self.history is not None:
            self.history.extend(values)
        self.last = values[-1]
        return first, values


def loss_read_interval(device: torch.device) -> int:
    """Steps between loss reads: every step on a CPU (free there), every 25 on an accelerator."""
    return 1 if device.type == "cpu" else 25


def train(
    cfg: TrainConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    pause_after: int | None = None,
    preset_note: str = "",
    loss_history: list[float] | None = None,
    loss_read_every: int | None = None,
) -> TrainResult:
    """Train per `cfg`, writing the model directory `cfg.out`. Returns where and how it stopped.

    resume: continue the run saved in cfg.out (weights, optimizer, schedule, RNG, best val).
    pause_after: stop (resumably) after this many steps of this call, as an interruption would.
    preset_note: how the settings were chosen (e.g. "preset cpu, the default on a CPU"), for the announcement.
    loss_history: a list to append every step's training loss to.
    loss_read_every: steps between reads of the loss from the device (default: see loss_read_interval).
    """
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"train() takes a TrainConfig (see chargpt.make_train_config), got {type(cfg).__name__}")
    cfg.validate()
    d = init_distributed(cfg)
    threads = torch.get_num_threads()
    try:  # the process's thread count is put back: train() may be called again in the same process
        return _train(cfg, d, resume, overwrite, progress, pause_after, preset_note, loss_history, loss_read_every)
    finally:
        torch.set_num_threads(threads)


def _train(
    cfg: TrainConfig,
    d: Dist,
    resume: bool,
    overwrite: bool,
    progress: bool,
    pause_after: int | None,
    preset_note: str,
    loss_history: list[float] | None,
    loss_read_every: int | None,
) -> TrainResult:
    with OutDir(cfg.out, resume=resume, overwrite=overwrite, main=d.main) as outdir:  # locked for the whole run
        run, state = setup(cfg, d, resume=resume, overwrite=overwrite, progress=progress)
        run.outdir = outdir
        if resume and already_finished(run, state):
            finish_distributed(d)
            return _result(run, state, "finished")
        if resume and state.step > 0:  # where the run went on: loss.png marks it
            state.metrics.append({"kind": "resume", "step": state.step, "time": round(state.elapsed, 3)})
        if d.main:
            report.prepare_plot()  # matplotlib's import, once, so that timing a plot times the drawing only
            how = precision.describe(run.precision) + (f", {run.threads_note}" if run.threads_note else "")
            report.announce(
                run.cfg, run.model, run.tokenizer, run.train_ids, run.val_ids, d.device, how, state, preset_note
            )
            if state.resume_note:
                report.log.info("resuming: %s", state.resume_note)
        losses = LossLog(every=loss_read_every or loss_read_interval(d.device), history=loss_history)
        return _loop(run, state, losses, progress=progress, pause_after=pause_after)


def _loop(run: Run, state: RunState, losses: LossLog, *, progress: bool, pause_after: int | None) -> TrainResult:
    """Steps until the run is done or stopped, evaluating and saving when due, then the finish."""
    cfg, d = run.cfg, run.dist
    state.clock_start, state.clock_base = time.perf_counter(), state.elapsed  # cfg.max_time counts from here
    with _Signals() as signals:  # a signal during the first evaluation cuts it short too
        run.signals = signals
        if state.step == 0 and not state.metrics:
            evaluate_and_save(run, state, 0.0)  # step 0: the untrained model's loss starts the curve
        elif state.step % cfg.eval_interval == 0 < state.step and not _evaluated(state):  # a signal cut it short
            evaluate_and_save(run, state, 0.0)
        bar = report.Progress(cfg, state.step, state.elapsed, enabled=progress and d.main)
        start_step, t_prev = state.step, bar.restart()
        while state.step < cfg.n_updates:
            stop = stop_reason(run, state, signals, pause_after, start_step)
            if stop:
                state.stopped_by = stop
                break
            if not state.decaying and in_final_decay(cfg, state.step, state.elapsed, state.lr_anchor):
                save_state(run, state, ckpt.STABLE_STATE)  # what a longer budget continues from
                state.decaying, t_prev = True, bar.restart()
            losses.add(state.step + 1, train_step(run, state))
            state.step += 1
            now = time.perf_counter()
            state.step_seconds, t_prev = now - t_prev, now
            retune(run, state)
            evaluate_now = state.step % cfg.eval_interval == 0 or state.step == cfg.n_updates
            save_now = save_due(cfg, state)
            due = (state.step % losses.every, state.step % cfg.log_interval)
            if evaluate_now or save_now or 0 in due or state.step == start_step + 1:
                read_losses(run, state, losses, bar)  # before anything is evaluated or saved
            bar.step_done(now, state.step, losses.last, state.tick())
            if evaluate_now:
                evaluate_and_save(run, state, bar.tok_s)
                t_prev = bar.restart()  # tokens/s and step time leave out evaluations
            if save_now:
                save_state(run, state)
                t_prev = bar.restart()
        read_losses(run, state, losses, bar)
        finish(run, state, bar.tok_s)
    bar.finish(state.tick())
    finish_distributed(d)
    return _result(run, state, state.stopped_by)


def _result(run: Run, state: RunState, stopped_by: str) -> TrainResult:
    evals = [m for m in state.metrics if report.is_eval(m) and m["step"] > 0]
    best_step = min(evals, key=lambda m: m["val_loss"])["step"] if evals else -1
    return TrainResult(
        out=str(run.out),
        step=state.step,
        best_val_loss=state.best_val,
        last_val_loss=evals[-1]["val_loss"] if math.isnan(state.last_val) and evals else state.last_val,
        elapsed=state.elapsed,
        stopped_by=stopped_by,
        rank=run.dist.rank,
        best_step=best_step,
    )


def already_finished(run: Run, state: RunState) -> bool:
    """A resumed run with nothing left to do: its steps are done, or its time budget (not extended) is spent."""
    cfg = run.cfg
    evaluated = _evaluated(state)
    spent = bool(cfg.max_time and state.elapsed + state.reserve() >= cfg.max_time)
    return evaluated and (state.step >= cfg.n_updates or spent)


# ---------------------------------------------------------------------------------------------
# set up


def setup(cfg: TrainConfig, d: Dist, *, resume: bool, overwrite: bool, progress: bool = False) -> tuple[Run, RunState]:
    """Data, model, optimizer and (when resuming) the saved state, in that order."""
    out = Path(cfg.out)  # locked and checked by OutDir: a user's files are never replaced
    saved: ckpt.TrainState | None = None
    note = ""
    if resume:
        saved, note = resume_point(cfg, out, ckpt.load_train_state(out))
    tuner, threads_note = set_threads(cfg, d, saved)
    # data, through the token cache (a failure leaves no empty folder behind: OutDir removes what it created)
    tokenizer = CharTokenizer(list(saved.vocab), unknown=saved.unknown) if saved else None
    begin = None
    if saved is None and cfg.init_from is not None:  # a fine-tune: the source's vocabulary, extended
        begin = finetune.start(cfg)
        if begin.tokenizer.unknown is None:
            finetune.extend(begin, prepare_data(cfg, None, d, progress=progress and d.main).tokenizer.chars)
        tokenizer = begin.tokenizer
    data = prepare_data(cfg, tokenizer, d, progress=progress and d.main)
    tokenizer, train_ids, val_ids = data.tokenizer, data.train, data.val
    chars = len(train_ids) + len(val_ids)
    if saved is not None and saved.data_chars not in (None, chars):
        raise ChargptError(
            f"the data changed since this run started ({saved.data_chars:,} characters then, {chars:,} now); a "
            f"resumed run trains on the same data: restore it, or start a new run (--init-from {out} keeps the "
            f"weights)"
        )
    rows = cfg.batch_size // (d.world * cfg.gradient_accumulation_steps)
    memory.check(
        memory.training_bytes(cfg.model_config(tokenizer.vocab_size), rows),
        d.device,
        "training this configuration",
        "use a smaller --batch-size, --block-size, --n-embd or --n-layers (or more --gradient-accumulation-steps)",
    )
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model_config(tokenizer.vocab_size))
    if begin is not None:
        finetune.load_into(model, begin)
    model = model.to(d.device)
    optimizer = make_optimizer(model, cfg, d.device)
    batches = torch.Generator().manual_seed(cfg.seed)
    state = RunState()
    if saved is not None:
        state = restore(saved, out, model, optimizer, batches)
        anchor = state.lr_anchor  # a branch (a note from resume_point) continues its own flat stretch
        if not note:
            anchor = extended_anchor(saved_schedule(cfg, saved), cfg, state.step, state.elapsed, state.lr_anchor)
        if anchor != state.lr_anchor and anchor is not None:
            note = (
                f"its learning rate had decayed to {anchor[2]:.3g}: it climbs back to {cfg.learning_rate:g} over "
                f"{max(cfg.warmup_updates, 1)} steps and decays again by the new budget's end"
            )
        state.lr_anchor, state.resume_note = anchor, note
        state.decaying = in_final_decay(cfg, state.step, state.elapsed, state.lr_anchor)
    if d.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    fwd = _maybe_compile(model, cfg, d.device)
    if d.world > 1:
        fwd = DDP(fwd, device_ids=[d.device.index] if d.device.type == "cuda" else None)  # broadcasts rank 0's weights
        if d.rank:  # dropout: each rank its own masks (rank 0 keeps the single-process stream)
            torch.manual_seed(cfg.seed + 1_000_003 * d.rank + state.step)
    choices = choose_precision(cfg, d, model, tokenizer.vocab_size)
    run = Run(cfg, d, out, tokenizer, train_ids, val_ids, model, fwd, optimizer, batches, precision=choices)
    run.tuner, run.threads_note = tuner, threads_note
    run.origin = begin.origin if begin is not None else saved.origin if saved else None
    run.prompt = samples.prompt_from(tokenizer, train_ids)
    return run, state


def saved_schedule(cfg: TrainConfig, saved: ckpt.TrainState) -> TrainConfig:
    """`cfg` with the budget and schedule the saved run had (what its learning rates were computed from)."""
    return dataclasses.replace(cfg, **{k: saved.config[k] for k in SCHEDULE_KEYS if k in saved.config})


def resume_point(cfg: TrainConfig, out: Path, end: ckpt.TrainState) -> tuple[ckpt.TrainState, str]:
    """Where a resumed run continues from, and how (for the announcement). Usually the end of the saved run. A
    WSD run given a larger budget after its final decay began goes back to the state saved just before that
    decay (STABLE_STATE), so the flat stretch goes on and the decay comes at the new end: the best val loss so
    far stays the bar a new model must beat, so the model on disk is only ever replaced by a better one."""
    old = saved_schedule(cfg, end)
    same_shape = all(getattr(old, k) == getattr(cfg, k) for k in SCHEDULE_KEYS[2:])
    if not (
        same_shape and budget_grew(old, cfg) and in_final_decay(old, end.step, end.elapsed, _anchor(end.lr_anchor))
    ):
        return end, ""
    if not os.path.lexists(out / ckpt.STABLE_STATE):
        return end, ""  # an older folder: extended_anchor re-warms the rate
    stable = ckpt.load_train_state(out, name=ckpt.STABLE_STATE)
    if stable.step >= end.step or in_final_decay(cfg, stable.step, stable.elapsed, _anchor(stable.lr_anchor)):
        return end, ""
    stable.best_val_loss, stable.evals_since_best = end.best_val_loss, 0
    note = (
        f"going back to step {stable.step:,}, where the final learning-rate decay began: the flat stretch goes on "
        f"and the decay comes at the new budget's end (steps {stable.step + 1:,}-{end.step:,} are dropped; the "
        f"best model so far, val {end.best_val_loss:.4f}, stays until a better one)"
    )
    return stable, note


def set_threads(cfg: TrainConfig, d: Dist, saved: ckpt.TrainState | None) -> tuple[cores.ThreadTuner | None, str]:
    """The CPU thread count of the run: --threads as given, or (auto) the free cores shared among this machine's
    ranks. A resumed auto run keeps the count it saved (the same count gives the same bits), and an auto run
    gets a ThreadTuner. On an accelerator torch's default stays."""
    if d.device.type != "cpu":
        return None, ""
    total = cores.cores()
    requested = cfg.threads or None
    saved_threads = saved.threads if saved else None
    if requested is None and isinstance(saved_threads, int) and not isinstance(saved_threads, bool):
        threads = max(1, min(saved_threads, total))
        note = f"{threads} thread{'s' if threads > 1 else ''} (as the run saved)"
    else:
        share = int(os.environ.get("LOCAL_WORLD_SIZE", d.world))
        threads = cores.choose_threads(requested, total, share=share)
        note = cores.why(requested, threads, total)
    torch.set_num_threads(threads)
    return (None if requested else cores.ThreadTuner(threads)), note


PROBE_POSITIONS = 2048  # rows x block_size of the batch that times a precision: enough for matmuls of the real speed


def choose_precision(cfg: TrainConfig, d: Dist, model: torch.nn.Module, vocab_size: int) -> dict[str, precision.Choice]:
    """The number format of training and of evaluation: as asked, or (auto) timed on this model's own step and
    forward pass at its own shape. The timing leaves the run untouched: no optimizer step, gradients dropped, the
    random streams restored. Under DDP every rank takes bf16 only if every rank measured it faster."""
    rows = cfg.batch_size // (d.world * cfg.gradient_accumulation_steps)
    rows = max(1, min(rows, -(-PROBE_POSITIONS // cfg.block_size)))
    g = torch.Generator().manual_seed(0)
    x, y = (torch.randint(vocab_size, (rows, cfg.block_size), generator=g).to(d.device) for _ in range(2))
    shape = f"{cfg.arch} v{vocab_size} T{cfg.block_size} C{cfg.n_embd} L{cfg.n_layers} H{cfg.n_heads} rows{rows}"

    def step(choice: precision.Choice) -> None:
        with torch.random.fork_rng(devices=[]):
            with precision.autocast(d.device, choice):
                _, loss = model(x, y)
            loss.backward()
        model.zero_grad(set_to_none=True)

    def forward(choice: precision.Choice) -> None:
        model.eval()
        with torch.no_grad(), precision.autocast(d.device, choice):
            model(x, y)
        model.train()

    probes = {
        "train": precision.Probe(f"train {shape} dropout{cfg.dropout}", step),
        "eval": precision.Probe(f"eval {shape}", forward, budget_s=1.0),
    }
    choices = {kind: precision.resolve(cfg.precision, d.device, kind, probe=probes[kind]) for kind in probes}
    if d.world > 1:
        fp32 = all_max([1.0 if choices[kind].name == "fp32" else 0.0 for kind in probes], d)
        for kind, veto in zip(probes, fp32, strict=True):
            if veto and choices[kind].name == "bf16":
                choices[kind] = precision.Choice("fp32", "another process measured bf16 slower")
    return choices


def restore(
    saved: ckpt.TrainState, out: Path, model: torch.nn.Module, optimizer: Optimizer, batches: torch.Generator
) -> RunState:
    """Load a saved run's weights, optimizer and RNG into the fresh ones; return its RunState."""
    ckpt.load_state(model, saved.model, str(out / ckpt.TRAIN_STATE))
    try:
        optimizer.load_state_dict(saved.optimizer)
        ckpt.restore_rng(saved.rng, batches)
    except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as e:
        raise ChargptError(
            f"{out / ckpt.TRAIN_STATE} holds an optimizer or RNG state this run cannot use ({first_line(e)}); "
            f"start a new run with --overwrite"
        ) from None
    step = int(saved.step)
    return RunState(
        step=step,
        elapsed=float(saved.elapsed),
        best_val=float(saved.best_val_loss),
        metrics=report.read_metrics(out, step),
        saved_at=float(saved.elapsed),
        log_loss_sum=float(saved.log_loss_sum),
        log_loss_count=int(saved.log_loss_count),
        eval_seconds=float(saved.eval_seconds),
        plot_seconds=float(saved.plot_seconds),
        save_seconds=float(saved.save_seconds),
        lr_anchor=_anchor(saved.lr_anchor),
        evals_since_best=int(saved.evals_since_best),
    )


def _anchor(value: Any) -> Anchor | None:
    """A saved schedule anchor: [step, elapsed, lr], or None (a run never extended, or from before anchors)."""
    if value is None:
        return None
    try:
        step, elapsed, lr = value
        return int(step), float(elapsed), float(lr)
    except (TypeError, ValueError):
        raise ChargptError("the train state's lr_anchor is malformed; start a new run with --overwrite") from None


def _maybe_compile(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.nn.Module:
    if not cfg.compile:
        return model
    if device.type == "cpu" and not (shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")):
        report.log.warning("torch.compile needs a C++ compiler on CPU and none was found; training uncompiled")
        return model
    try:
        return torch.compile(model)
    except Exception as e:  # compile support varies by platform; eager is always correct
        report.log.warning("torch.compile is unavailable here (%s); training uncompiled", e)
        return model


# ---------------------------------------------------------------------------------------------
# steps


def stop_reason(run: Run, state: RunState, signals: _Signals, pause_after: int | None, start_step: int) -> str | None:
    """Why the run stops before this step, if it does. One all-reduce keeps every rank on the same clock
    and the same decision to stop. A time budget stops the run early enough for its final evaluation
    and save to end within it."""
    state.tick()
    state.elapsed, reserve, caught = all_max([state.elapsed, state.reserve(), 1.0 if signals.caught else 0.0], run.dist)
    if caught:
        return signals.caught or "SIGTERM"
    if run.cfg.max_time and state.elapsed + reserve >= run.cfg.max_time and state.step > 0:
        return "max_time"  # (a budget too short for even one step still trains one)
    if pause_after is not None and state.step - start_step >= pause_after:
        return "pause"
    if run.cfg.patience and state.evals_since_best >= run.cfg.patience:
        return "patience"
    return None


def train_step(run: Run, state: RunState) -> torch.Tensor:
    """One optimizer step on one global batch (this rank's rows, in micro-batches); returns the mean loss as a
    0-dim float64 tensor on the device (float32 on MPS), unread: reading it would make the host wait for it."""
    cfg, d = run.cfg, run.dist
    set_learning_rate(run.optimizer, learning_rate(cfg, state.step, state.elapsed, state.lr_anchor))
    x_all, y_all = get_batch(run.train_ids, cfg.batch_size, cfg.block_size, run.batches)
    accum = cfg.gradient_accumulation_steps
    loss_sum = torch.zeros((), dtype=sum_dtype(d.device), device=d.device)
    for micro, (x, y) in enumerate(
        zip(rank_rows(x_all, d).chunk(accum), rank_rows(y_all, d).chunk(accum), strict=True)
    ):
        sync = nullcontext() if d.world == 1 or micro == accum - 1 else run.fwd.no_sync()
        with sync:
            with run.autocast("train"):
                _, loss = run.fwd(_to_device(x, d.device), _to_device(y, d.device))
            (loss / accum).backward()
        loss_sum += loss.detach()
    # A diverged step (non-finite loss) is taken too: the loop notices it at its next read of the loss,
    # before anything is saved, and stops with an error; the weights it produced are never written.
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    return loss_sum / accum


def _to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch onto the device without making the host wait (pinned memory: a truly asynchronous copy)."""
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def retune(run: Run, state: RunState) -> None:
    """Feed the step time to the run's ThreadTuner; a changed count is set and said. Under DDP each rank keeps
    its own count. (A change of count changes float rounding: such a run is not bit-identical to one whose
    machine stayed quiet, which is why tests and exact comparisons pin --threads.)"""
    if run.tuner is None:
        return
    before = run.tuner.threads
    after = run.tuner.step(state.step_seconds)
    if after != before:
        torch.set_num_threads(after)
        report.log.info("step %d: training with %s", state.step, run.tuner.changes[-1])


def save_due(cfg: TrainConfig, state: RunState) -> bool:
    """The resumable state is saved every checkpoint_interval steps and/or checkpoint_seconds of training."""
    by_steps = cfg.checkpoint_interval > 0 and state.step % cfg.checkpoint_interval == 0
    by_time = cfg.checkpoint_seconds > 0 and state.elapsed - state.saved_at >= cfg.checkpoint_seconds
    return by_steps or by_time


def read_losses(run: Run, state: RunState, losses: LossLog, bar: report.Progress) -> None:
    """Read the pending losses: a non-finite one stops the run (before anything is saved); the rest feed the
    training-loss rows of metrics.jsonl."""
    first, values = losses.read()
    for i, value in enumerate(values):
        if not math.isfinite(value):
            bar.close()
            raise _diverged(run, first + i, value)
    if values:
        log_training_loss(run, state, values, bar.tok_s)


def log_training_loss(run: Run, state: RunState, values: list[float], tok_s: float) -> None:
    """Every log_interval steps, a metrics row with the mean training loss of the steps since the last one."""
    state.log_loss_sum += sum(values)
    state.log_loss_count += len(values)
    if state.step % run.cfg.log_interval:
        return
    state.metrics.append(
        {
            "kind": "train",
            "step": state.step,
            "loss": all_mean(state.log_loss_sum / state.log_loss_count, run.dist),
            "lr": run.optimizer.param_groups[0]["lr"],
            "tokens_per_s": tok_s,
            "time": round(state.elapsed, 3),
        }
    )
    state.log_loss_sum, state.log_loss_count = 0.0, 0


def _diverged(run: Run, step: int, loss: float) -> ChargptError:
    cfg, out = run.cfg, run.out
    kept = f"the best model in {out} is intact" if (out / ckpt.WEIGHTS).exists() else "nothing was saved"
    shrink = cfg.learning_rate * cfg.weight_decay  # AdamW scales every matrix by (1 - shrink) each step
    if shrink >= 0.5 and cfg.weight_decay > 1:  # an unusual weight decay, not the learning rate, is at fault
        advice = (
            f"lower --weight-decay (now {cfg.weight_decay:g}: each step multiplies the weights by 1 - learning "
            f"rate x weight decay = {1 - shrink:g}; 0.1 is usual)"
        )
    else:
        advice = f"lower --learning-rate (now {cfg.learning_rate:g}, try {cfg.learning_rate / 10:g})"
    return ChargptError(f"the loss became {loss} at step {step}; training stopped and {kept}; {advice}")


# ---------------------------------------------------------------------------------------------
# evaluate, save, finish


@torch.no_grad()
def estimate(run: Run, at_step: int, seconds: float = math.inf) -> tuple[float, float, int]:
    """Mean train and val loss over eval_iters batches, the same batches for any resume or world size, and how
    many batches per split were used: fewer when the evaluation would outlast `seconds` (a time budget's share;
    each split gets half, and at least one batch)."""
    cfg, d = run.cfg, run.dist
    run.model.eval()
    losses, used = [], cfg.eval_iters
    start = time.perf_counter()
    for half, part in enumerate((run.train_ids, run.val_ids)):
        deadline = start + seconds * (half + 1) / 2
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + at_step)
        total = torch.zeros((), dtype=sum_dtype(d.device), device=d.device)  # summed there: one read per split
        n = 0
        while n < min(cfg.eval_iters, used if half else cfg.eval_iters):
            signal, late = _stop_pending(run, n, deadline)
            if signal:
                raise _EvaluationInterrupted
            if late and n > 0:
                break
            x, y = get_batch(part, cfg.batch_size, cfg.block_size, gen)
            with run.autocast("eval"):
                total += run.model(_to_device(rank_rows(x, d), d.device), _to_device(rank_rows(y, d), d.device))[1]
            n += 1
        used = min(used, n)
        losses.append(all_mean(total.item() / n, d))
    run.model.train()
    return losses[0], losses[1], used


def evaluate_and_save(run: Run, state: RunState, tok_s: float, final: bool = False) -> None:
    """Estimate the losses; rank 0 records them, saves the model if val improved, redraws the plot (at most
    every PLOT_EVERY seconds, and at the end). Step 0 (the untrained model) is recorded, never saved.
    A signal during the estimate skips it: a resumed run evaluates this step first."""
    t0 = time.perf_counter()
    state.tick()
    try:
        train_loss, val_loss, used = estimate(run, state.step, eval_seconds(run.cfg, state, final))
    except _EvaluationInterrupted:
        run.model.train()
        return
    if used < run.cfg.eval_iters:
        report.log.info(
            "step %d: evaluated on %d of %d batches per split to fit the time budget", state.step, used,
            run.cfg.eval_iters,
        )  # fmt: skip
    best = val_loss < state.best_val and state.step > 0
    lr = learning_rate(run.cfg, max(state.step - 1, 0), state.elapsed, state.lr_anchor)
    state.metrics.append(
        {
            "kind": "eval",
            "step": state.step,
            "train_loss": train_loss,
            "val_loss": val_loss,
            "lr": lr,
            "tokens_per_s": tok_s,
            "time": round(state.elapsed, 3),
            **({"eval_batches": used} if used < run.cfg.eval_iters else {}),
        }
    )
    if run.dist.main:
        row = state.metrics[-1]
        row["prompt"], row["sample"] = run.prompt, samples.write(run.model, run.tokenizer, run.prompt)
        if best:
            info = {"step": state.step, "val_loss": val_loss, "train_loss": train_loss, "train_config": asdict(run.cfg)}
            if run.cfg.init_from is not None:
                info["init_from"] = run.origin or {"path": run.cfg.init_from}
            ckpt.save_model(run.out, run.model, run.tokenizer, info=info)
            _saved(run)
        report.write_metrics(run.out, state.metrics)
        samples.save(run.out, state.metrics)
        report.log_evaluation(state.step, train_loss, val_loss, best, row["prompt"] + row["sample"])
    if state.step > 0:
        state.best_val = min(state.best_val, val_loss)
        state.evals_since_best = 0 if best else state.evals_since_best + 1
    state.last_val, state.last_eval_step = val_loss, state.step
    state.eval_seconds = time.perf_counter() - t0
    if final or state.step == 0 or state.tick() - state.plotted_at >= PLOT_EVERY:
        draw_plot(run, state)


EVAL_SHARE = 0.1  # of a time budget: the most one evaluation before the last may take


def eval_seconds(cfg: TrainConfig, state: RunState, final: bool) -> float:
    """How long an evaluation may take: no limit without a time budget; with one, a tenth of it, and never past
    its end (the last evaluation gets what is left); a budget already spent still gets one batch per split."""
    if not cfg.max_time:
        return math.inf
    left = max(cfg.max_time - state.elapsed, 0.0)
    return left if final else min(EVAL_SHARE * cfg.max_time, left)


def draw_plot(run: Run, state: RunState) -> None:
    t0 = time.perf_counter()
    if run.dist.main:
        try:
            report.plot(run.out, state.metrics)
        except DiskFullError:
            raise  # said like any other write
        except Exception as e:  # loss.png is a picture of metrics.jsonl: never worth a run
            report.log.warning("could not draw %s (%s); metrics.jsonl holds the same", run.out / report.PLOT,
                               first_line(e))  # fmt: skip
    state.plot_seconds = max(state.plot_seconds, time.perf_counter() - t0)  # the worst seen: end early, not late
    state.plotted_at, state.plotted_rows = state.tick(), len(state.metrics)


def save_state(run: Run, state: RunState, name: str = ckpt.TRAIN_STATE) -> None:
    """The resumable state (rank 0 writes it): weights, optimizer, RNG, step, clock, best val, config. As
    STABLE_STATE: the same, kept from where WSD's final decay begins."""
    t0 = time.perf_counter()
    state.saved_at = state.tick()
    if not run.dist.main:
        return
    report.write_metrics(run.out, state.metrics)  # the training-loss rows since the last evaluation
    weights = {k: v.detach().cpu() for k, v in ckpt.plain_state_dict(run.model).items()}
    ckpt.save_train_state(
        run.out,
        ckpt.TrainState(
            step=state.step,
            elapsed=state.elapsed,
            best_val_loss=state.best_val,
            model=weights,
            optimizer=run.optimizer.state_dict(),
            rng=ckpt.capture_rng(run.batches),
            vocab=run.tokenizer.to_list(),
            config=asdict(run.cfg),
            unknown=run.tokenizer.unknown,
            log_loss_sum=state.log_loss_sum,
            log_loss_count=state.log_loss_count,
            eval_seconds=state.eval_seconds,
            plot_seconds=state.plot_seconds,
            save_seconds=state.save_seconds,
            evals_since_best=state.evals_since_best,
            threads=torch.get_num_threads(),
            data_chars=len(run.train_ids) + len(run.val_ids),
            origin=run.origin,
            lr_anchor=list(state.lr_anchor) if state.lr_anchor is not None else None,
        ),
        name,
    )
    _saved(run)
    state.save_seconds = time.perf_counter() - t0


def _evaluated(state: RunState) -> bool:
    """Whether this step has its evaluation row (rows of other kinds may follow it)."""
    evals = [m for m in state.metrics if report.is_eval(m)]
    return state.last_eval_step == state.step or bool(evals and evals[-1]["step"] == state.step)


def _saved(run: Run) -> None:
    if run.outdir is not None:
        run.outdir.saved()


def finish(run: Run, state: RunState, tok_s: float) -> None:
    """A run that completed gets its final evaluation; any stop saves the resumable state. An interruption
    does not evaluate: that would change the run's metrics and best model."""
    finished = state.stopped_by in ("n_updates", "max_time", "patience")
    if finished and state.step > 0 and not _evaluated(state):
        evaluate_and_save(run, state, tok_s, final=True)
    else:
        evals = [m for m in state.metrics if report.is_eval(m)]
        if evals:
            state.last_val = evals[-1]["val_loss"]
        if state.step > 0 and state.plotted_rows != len(state.metrics):
            draw_plot(run, state)  # the rows since the last drawing
    save_state(run, state)


PLOT_EVERY = 10.0  # seconds between redraws of loss.png during a run (drawing costs ~0.3-1 s on a CPU)


class _EvaluationInterrupted(Exception):
    """A signal arrived while estimating the losses."""


def _stop_pending(run: Run, batch: int, deadline: float) -> tuple[bool, bool]:
    """Whether SIGINT/SIGTERM is pending, and whether the evaluation is past its deadline; with several ranks
    they agree on both (one all-reduce every 16 batches), so every rank evaluates the same batches."""
    caught = run.signals is not None and run.signals.caught is not None
    late = time.perf_counter() > deadline
    if run.dist.world == 1:
        return caught, late
    if batch % 16:
        return False, False
    flags = all_max([1.0 if caught else 0.0, 1.0 if late else 0.0], run.dist)
    return flags[0] > 0, flags[1] > 0


class _Signals:
    """Turn SIGINT/SIGTERM into a flag the loop checks after each step."""

    def __init__(self) -> None:
        self.caught: str | None = None
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.caught == "SIGINT" and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now; the last checkpoint_interval state remains
        self.caught = signal.Signals(signum).name

    def __enter__(self) -> _Signals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        if getattr(self._old.get(signal.SIGINT), "caught", False):  # a start-up Ctrl-C that something swallowed
            self.caught = "SIGINT"
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
