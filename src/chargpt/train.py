"""The training loop: set up -> steps -> evaluate and save when due -> finish.

The trainer knows nothing about GPT internals: it needs a module returning (logits, loss), the model
directory helpers, and batches. Under torchrun every rank runs this same loop; `batch_size` is the
global batch, drawn from one seeded generator so that any world size sees the same windows. What a
run is set up with lives in `Run`; what changes as it goes lives in `RunState`; both are passed
explicitly to each step of the run.
"""

from __future__ import annotations

import math
import shutil
import signal
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from chargpt import checkpoint as ckpt
from chargpt import precision, report
from chargpt.config import TrainConfig
from chargpt.data import get_batch, load_corpus, split
from chargpt.distributed import Dist, all_max, all_mean, finish_distributed, init_distributed, rank_rows
from chargpt.errors import ChargptError, first_line
from chargpt.model import build_model
from chargpt.optim import learning_rate, make_optimizer, set_learning_rate
from chargpt.tokenizer import CharTokenizer


@dataclass
class TrainResult:
    out: str
    step: int
    best_val_loss: float
    last_val_loss: float
    elapsed: float
    stopped_by: str  # "n_updates", "max_time", "pause", "SIGINT" or "SIGTERM"
    rank: int = 0  # under torchrun, only rank 0 reports


@dataclass
class Run:
    """What a run is set up with; fixed once the first step starts."""

    cfg: TrainConfig
    dist: Dist
    out: Path
    tokenizer: CharTokenizer
    train_ids: torch.Tensor
    val_ids: torch.Tensor
    model: torch.nn.Module  # the plain model: evaluation, saving
    fwd: torch.nn.Module  # the model as trained: compiled and/or DDP-wrapped
    optimizer: torch.optim.Optimizer
    batches: torch.Generator  # draws every training batch; part of the resumable state
    precision: dict[str, precision.Choice] = field(default_factory=dict)  # "train", "eval" -> fp32 / bf16

    def autocast(self, kind: str = "train") -> AbstractContextManager:
        """bf16 autocast where the run's precision says so for this kind of work; weights stay fp32."""
        choice = self.precision.get(kind) or precision.Choice("fp32", "")
        return precision.autocast(self.dist.device, choice)


@dataclass
class RunState:
    """What changes as a run goes; saved with the weights, optimizer and RNG in train_state.pt."""

    step: int = 0
    elapsed: float = 0.0  # seconds of training (evaluation and saving excluded)
    best_val: float = math.inf
    last_val: float = math.nan
    last_eval_step: int = -1
    metrics: list[dict[str, Any]] = field(default_factory=list)
    stopped_by: str = "n_updates"
    saved_at: float = 0.0  # `elapsed` when the resumable state was last saved (for checkpoint_seconds)


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

    def read(self) -> tuple[int, float] | None:
        """Bring the pending losses to the host; the (step, loss) of the first non-finite one, if any."""
        if not self.pending:
            return None
        values = torch.stack(self.pending).tolist()  # one host-device sync for all of them
        first, self.pending = self.first, []
        for i, value in enumerate(values):
            if self.history is not None:
                self.history.append(value)
            if not math.isfinite(value):
                return first + i, value
        self.last = values[-1]
        return None


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
    loss_history: list[float] | None = None,
    loss_read_every: int | None = None,
) -> TrainResult:
    """Train per `cfg`, writing the model directory `cfg.out`. Returns where and how it stopped.

    resume: continue the run saved in cfg.out (weights, optimizer, schedule, RNG, best val).
    pause_after: stop (resumably) after this many steps of this call, as an interruption would.
    loss_history: a list to append every step's training loss to.
    loss_read_every: steps between reads of the loss from the device (default: see loss_read_interval).
    """
    cfg.validate()
    d = init_distributed(cfg)
    run, state = setup(cfg, d, resume=resume, overwrite=overwrite)
    bar = report.Progress(cfg, state.step, state.elapsed, enabled=progress and d.main)
    losses = LossLog(every=loss_read_every or loss_read_interval(d.device), history=loss_history)
    start_step, t_prev = state.step, bar.restart()
    with _Signals() as signals:
        while state.step < cfg.n_updates:
            stop = stop_reason(run, state, signals, pause_after, start_step)
            if stop:
                state.stopped_by = stop
                break
            losses.add(state.step + 1, train_step(run, state))
            state.step += 1
            now = time.perf_counter()
            delta, t_prev = now - t_prev, now
            state.elapsed += delta
            evaluate_now = state.step % cfg.eval_interval == 0 or state.step == cfg.n_updates
            save_now = save_due(cfg, state)
            if evaluate_now or save_now or state.step % losses.every == 0 or state.step == start_step + 1:
                read_losses(run, losses, bar)  # before anything is evaluated or saved
            bar.step_done(now, delta, state.step, losses.last)
            if evaluate_now:
                evaluate_and_save(run, state, bar.tok_s)
                t_prev = bar.restart()  # evaluation time is not training time
            if save_now:
                save_state(run, state)
                t_prev = bar.restart()
        read_losses(run, losses, bar)
        finish(run, state, bar.tok_s)
    bar.close()
    finish_distributed(d)
    return TrainResult(
        out=str(run.out),
        step=state.step,
        best_val_loss=state.best_val,
        last_val_loss=state.last_val,
        elapsed=state.elapsed,
        stopped_by=state.stopped_by,
        rank=d.rank,
    )


# ---------------------------------------------------------------------------------------------
# set up


def setup(cfg: TrainConfig, d: Dist, *, resume: bool, overwrite: bool) -> tuple[Run, RunState]:
    """Data, model, optimizer and (when resuming) the saved state, in that order."""
    out = Path(cfg.out)
    saved: dict[str, Any] | None = None
    if resume:
        saved = ckpt.load_train_state(out)
    elif ckpt.holds_model(out) and not overwrite:
        raise ChargptError(
            f"{out} already holds a model; pass --resume {out} to continue it, --overwrite to replace it, "
            f"or choose another --out"
        )
    # data (checked before --out is created, so bad data leaves no empty folders behind)
    text = load_corpus(cfg.data)
    tokenizer = CharTokenizer(list(saved["vocab"])) if saved else CharTokenizer.from_text(text)
    train_ids, val_ids = split(torch.from_numpy(tokenizer.encode(text)), cfg.val_fraction, cfg.block_size)
    if d.main:
        ckpt.check_writable(out)

    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model_config(tokenizer.vocab_size)).to(d.device)
    optimizer = make_optimizer(model, cfg, d.device)
    batches = torch.Generator().manual_seed(cfg.seed)
    state = RunState()
    if saved is not None:
        state = restore(saved, out, model, optimizer, batches)
    elif d.main:
        for stale in (ckpt.TRAIN_STATE, report.METRICS, report.PLOT):  # an overwritten run's leftovers must go
            (out / stale).unlink(missing_ok=True)
    if d.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    fwd = _maybe_compile(model, cfg, d.device)
    if d.world > 1:
        fwd = DDP(fwd, device_ids=[d.device.index] if d.device.type == "cuda" else None)  # broadcasts rank 0's weights
        if d.rank:  # dropout: each rank its own masks (rank 0 keeps the single-process stream)
            torch.manual_seed(cfg.seed + 1_000_003 * d.rank + state.step)
    choices = {kind: precision.resolve(cfg.precision, d.device, kind) for kind in ("train", "eval")}
    if d.main:
        report.log.info("precision: %s", precision.describe(choices))
    run = Run(cfg, d, out, tokenizer, train_ids, val_ids, model, fwd, optimizer, batches, choices)
    return run, state


def restore(
    saved: dict[str, Any], out: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches: torch.Generator
) -> RunState:
    """Load a saved run's weights, optimizer and RNG into the fresh ones; return its RunState."""
    ckpt.load_state(model, saved["model"], str(out / ckpt.TRAIN_STATE))
    try:
        optimizer.load_state_dict(saved["optimizer"])
        ckpt.restore_rng(saved["rng"], batches)
    except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as e:
        raise ChargptError(
            f"{out / ckpt.TRAIN_STATE} holds an optimizer or RNG state this run cannot use ({first_line(e)}); "
            f"start a new run with --overwrite"
        ) from None
    step = int(saved["step"])
    return RunState(
        step=step,
        elapsed=float(saved["elapsed"]),
        best_val=float(saved["best_val_loss"]),
        metrics=report.read_metrics(out, step),
        saved_at=float(saved["elapsed"]),
    )


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
    and the same decision to stop."""
    state.elapsed, caught = all_max([state.elapsed, 1.0 if signals.caught else 0.0], run.dist)
    if caught:
        return signals.caught or "SIGTERM"
    if run.cfg.max_time and state.elapsed >= run.cfg.max_time:
        return "max_time"
    if pause_after is not None and state.step - start_step >= pause_after:
        return "pause"
    return None


def train_step(run: Run, state: RunState) -> torch.Tensor:
    """One optimizer step on one global batch (this rank's rows, in micro-batches); returns the mean loss as a
    0-dim float64 tensor on the device, unread: reading it would make the host wait for the device."""
    cfg, d = run.cfg, run.dist
    set_learning_rate(run.optimizer, learning_rate(cfg, state.step, state.elapsed))
    x_all, y_all = get_batch(run.train_ids, cfg.batch_size, cfg.block_size, run.batches)
    accum = cfg.gradient_accumulation_steps
    loss_sum = torch.zeros((), dtype=torch.float64, device=d.device)
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


def save_due(cfg: TrainConfig, state: RunState) -> bool:
    """The resumable state is saved every checkpoint_interval steps and/or checkpoint_seconds of training."""
    by_steps = cfg.checkpoint_interval > 0 and state.step % cfg.checkpoint_interval == 0
    by_time = cfg.checkpoint_seconds > 0 and state.elapsed - state.saved_at >= cfg.checkpoint_seconds
    return by_steps or by_time


def read_losses(run: Run, losses: LossLog, bar: report.Progress) -> None:
    """Read the pending losses (the host waits for the device here); stop the run at a non-finite one."""
    diverged = losses.read()
    if diverged:
        bar.close()
        raise _diverged(run, *diverged)


def _diverged(run: Run, step: int, loss: float) -> ChargptError:
    cfg, out = run.cfg, run.out
    kept = f"the best model in {out} is intact" if (out / ckpt.WEIGHTS).exists() else "nothing was saved"
    return ChargptError(
        f"the loss became {loss} at step {step}; training stopped and {kept}; "
        f"lower --learning-rate (now {cfg.learning_rate:g}, try {cfg.learning_rate / 10:g})"
    )


# ---------------------------------------------------------------------------------------------
# evaluate, save, finish


@torch.no_grad()
def estimate(run: Run, at_step: int) -> tuple[float, float]:
    """Mean train and val loss over eval_iters batches, the same batches for any resume or world size."""
    cfg, d = run.cfg, run.dist
    run.model.eval()
    losses = []
    for part in (run.train_ids, run.val_ids):
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + at_step)
        total = torch.zeros((), dtype=torch.float64, device=d.device)  # summed on the device: one read per split
        for _ in range(cfg.eval_iters):
            x, y = get_batch(part, cfg.batch_size, cfg.block_size, gen)
            with run.autocast("eval"):
                total += run.model(_to_device(rank_rows(x, d), d.device), _to_device(rank_rows(y, d), d.device))[1]
        losses.append(all_mean(total.item() / cfg.eval_iters, d))
    run.model.train()
    return losses[0], losses[1]


def evaluate_and_save(run: Run, state: RunState, tok_s: float) -> None:
    """Estimate the losses; rank 0 records them, saves the model if val improved, redraws the plot."""
    train_loss, val_loss = estimate(run, state.step)
    best = val_loss < state.best_val
    lr = learning_rate(run.cfg, max(state.step - 1, 0), state.elapsed)
    state.metrics.append(
        {
            "step": state.step,
            "train_loss": train_loss,
            "val_loss": val_loss,
            "lr": lr,
            "tokens_per_s": tok_s,
            "time": round(state.elapsed, 3),
        }
    )
    if run.dist.main:
        if best:
            info = {"step": state.step, "val_loss": val_loss, "train_loss": train_loss, "train_config": asdict(run.cfg)}
            ckpt.save_model(run.out, run.model, run.tokenizer, info=info)
        report.write_metrics(run.out, state.metrics)
        report.plot(run.out, state.metrics)
        report.log_evaluation(state.step, train_loss, val_loss, best)
    state.best_val = min(state.best_val, val_loss)
    state.last_val, state.last_eval_step = val_loss, state.step


def save_state(run: Run, state: RunState) -> None:
    """The resumable state (rank 0 writes it): weights, optimizer, RNG, step, clock, best val, config."""
    state.saved_at = state.elapsed
    if not run.dist.main:
        return
    weights = {k: v.detach().cpu() for k, v in ckpt.plain_state_dict(run.model).items()}
    ckpt.save_train_state(
        run.out,
        {
            "step": state.step,
            "elapsed": state.elapsed,
            "best_val_loss": state.best_val,
            "model": weights,
            "optimizer": run.optimizer.state_dict(),
            "rng": ckpt.capture_rng(run.batches),
            "vocab": run.tokenizer.to_list(),
            "config": asdict(run.cfg),
        },
    )


def finish(run: Run, state: RunState, tok_s: float) -> None:
    """A run that completed gets its final evaluation; any stop saves the resumable state. An interruption
    does not evaluate: that would change the run's metrics and best model."""
    finished = state.stopped_by in ("n_updates", "max_time")
    evaluated = state.last_eval_step == state.step or (state.metrics and state.metrics[-1]["step"] == state.step)
    if finished and state.step > 0 and not evaluated:
        evaluate_and_save(run, state, tok_s)
    elif state.metrics:
        state.last_val = state.metrics[-1]["val_loss"]
    save_state(run, state)


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
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
