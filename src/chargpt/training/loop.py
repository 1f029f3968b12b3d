"""The training loop: set up -> steps -> evaluate and save when due -> finish.

The trainer knows nothing about GPT internals: it needs a module returning (logits, loss), the model
directory helpers, and batches. Under torchrun every rank runs this same loop; `batch_size` is the
global batch, drawn from one seeded generator so that any world size sees the same windows. What a
run is set up with lives in `Run` (assembly.py, which builds it); what changes as it goes lives in `RunState`
(state.py, which also saves and restores it); both are passed explicitly to each step of the run. Evaluation
(evaluation.py) and signals (signals.py) have rooms of their own; this module holds the loop and the step.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from chargpt.config import TrainConfig
from chargpt.data.corpus import training_batch
from chargpt.errors import ChargptError
from chargpt.machine import precision
from chargpt.storage import checkpoint as ckpt
from chargpt.storage import layout
from chargpt.training import report
from chargpt.training.assembly import Run, setup
from chargpt.training.budget import Budget
from chargpt.training.distributed import (
    Dist,
    all_max,
    all_mean,
    finish_distributed,
    init_distributed,
    rank_rows,
    sum_dtype,
    to_device,
)
from chargpt.training.evaluation import draw_plot, evaluate_and_save
from chargpt.training.optim import (
    in_final_decay,
    learning_rate,
    set_learning_rate,
)
from chargpt.training.outdir import OutDir
from chargpt.training.planner import plan
from chargpt.training.settings import describe
from chargpt.training.signals import Signals
from chargpt.training.state import RunState, evaluated, save_state


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
    cfg: TrainConfig | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    pause_after: int | None = None,
    preset_note: str = "",
    loss_history: list[float] | None = None,
    loss_read_every: int | None = None,
    sources: dict[str, str] | None = None,
    preset: str | None = None,
    config: str | None = None,
    **settings: Any,
) -> TrainResult:
    """Train, writing the model directory `out`. Returns where and how it stopped.

    Either the settings as `chargpt train` takes them (`train(data="my.txt", out="out/m", max_time=60)`, and
    `preset`, `config` for a TOML file): planned as the command line plans them (chargpt.training.planner),
    sized for a time budget included; or a TrainConfig built beforehand (make_train_config), used as it is.
    resume: continue the run saved in `out` (weights, optimizer, schedule, RNG, best val).
    pause_after: stop (resumably) after this many steps of this call, as an interruption would.
    preset_note: how the settings were chosen (e.g. "preset cpu, the default on a CPU"), for the announcement.
    sources: where each setting came from (chargpt.training.settings), announced and saved for `info`.
    loss_history: a list to append every step's training loss to.
    loss_read_every: steps between reads of the loss from the device (default: see loss_read_interval).
    """
    if cfg is None:
        out = settings.get("out")
        if resume and out is None:
            raise ChargptError("train(resume=True) continues the run in `out`: give out=FOLDER")
        planned = plan(preset=preset, config=config, resume=out if resume else None, overwrite=overwrite,
                       **settings)  # fmt: skip
        cfg, preset_note, sources = planned.config, planned.note, planned.sources
    elif settings or preset is not None or config is not None:
        raise TypeError("train() takes a TrainConfig or settings (data=..., max_time=...), not both")
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"train() takes a TrainConfig (see chargpt.make_train_config), got {type(cfg).__name__}")
    cfg.validate()
    d = init_distributed(cfg)
    threads = torch.get_num_threads()
    try:  # the process's thread count is put back: train() may be called again in the same process
        how = (preset_note, sources or {})
        return _train(cfg, d, resume, overwrite, progress, pause_after, how, loss_history, loss_read_every)
    finally:
        torch.set_num_threads(threads)


def _train(
    cfg: TrainConfig,
    d: Dist,
    resume: bool,
    overwrite: bool,
    progress: bool,
    pause_after: int | None,
    chosen: tuple[str, dict[str, str]],
    loss_history: list[float] | None,
    loss_read_every: int | None,
) -> TrainResult:
    with OutDir(cfg.out, resume=resume, overwrite=overwrite, main=d.main) as outdir:  # locked for the whole run
        run, state = setup(cfg, d, resume=resume, overwrite=overwrite, progress=progress)
        run.outdir = outdir
        preset_note, run.sources = chosen
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
            if run.sources:
                report.log.info("settings: %s", describe(run.cfg, run.sources))
            if state.resume_note:
                report.log.info("resuming: %s", state.resume_note)
        losses = LossLog(every=loss_read_every or loss_read_interval(d.device), history=loss_history)
        return _loop(run, state, losses, progress=progress, pause_after=pause_after)


def _loop(run: Run, state: RunState, losses: LossLog, *, progress: bool, pause_after: int | None) -> TrainResult:
    """Steps until the run is done or stopped, evaluating and saving when due, then the finish."""
    cfg, d = run.cfg, run.dist
    state.clock_start, state.clock_base = time.perf_counter(), state.elapsed  # cfg.max_time counts from here
    with Signals() as signals:  # a signal during the first evaluation cuts it short too
        run.signals = signals
        if state.step == 0 and not state.metrics:
            evaluate_and_save(run, state, 0.0)  # step 0: the untrained model's loss starts the curve
        elif state.step % cfg.eval_interval == 0 < state.step and not evaluated(state):  # a signal cut it short
            evaluate_and_save(run, state, 0.0)
        bar = report.Progress(cfg, state.step, state.elapsed, enabled=progress and d.main)
        start_step, t_prev = state.step, bar.restart()
        while state.step < cfg.step_limit:
            stop = stop_reason(run, state, signals, pause_after, start_step)
            if stop:
                state.stopped_by = stop
                break
            if not state.decaying and in_final_decay(cfg, state.step, state.elapsed, state.lr_anchor):
                save_state(run, state, layout.STABLE_STATE)  # what a longer budget continues from
                state.decaying, t_prev = True, bar.restart()
            losses.add(state.step + 1, train_step(run, state))
            state.step += 1
            run.average.update()
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
    evals = [m for m in state.evaluations() if m["step"] > 0]
    best_step = min(evals, key=lambda m: report.offered(m)[0])["step"] if evals else -1
    best_val = state.best_val_loss
    theirs = run.outdir is not None and run.outdir.pending  # an overwritten run's model, not yet replaced
    saved = ckpt.saved_model(run.out) if run.dist.main and not theirs else None
    if saved is not None and saved.step is not None and saved.val_loss is not None:
        best_step, best_val = saved.step, saved.val_loss  # the model on disk (maybe from steps gone back over)
    return TrainResult(
        out=str(run.out),
        step=state.step,
        best_val_loss=best_val,
        last_val_loss=report.offered(evals[-1])[0] if math.isnan(state.last_val) and evals else state.last_val,
        elapsed=state.elapsed,
        stopped_by=stopped_by,
        rank=run.dist.rank,
        best_step=best_step,
    )


def already_finished(run: Run, state: RunState) -> bool:
    """A resumed run with nothing left to do: its steps are done, or its time budget (not extended) is spent."""
    cfg = run.cfg
    spent = Budget(cfg.max_time).spent(state.elapsed, state.timings())
    return evaluated(state) and (state.step >= cfg.step_limit or spent)


def stop_reason(run: Run, state: RunState, signals: Signals, pause_after: int | None, start_step: int) -> str | None:
    """Why the run stops before this step, if it does. One all-reduce keeps every rank on the same clock
    and the same decision to stop. A time budget stops the run early enough for its final evaluation
    and save to end within it."""
    state.tick()
    budget = Budget(run.cfg.max_time)
    reserve = budget.reserve(state.timings())
    state.elapsed, reserve, caught = all_max([state.elapsed, reserve, 1.0 if signals.caught else 0.0], run.dist)
    if caught:
        return signals.caught or "SIGTERM"
    if budget.seconds and state.elapsed + reserve >= budget.seconds and state.step > 0:
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
    x_all, y_all = training_batch(run.train_ids, cfg.batch_size, cfg.block_size, state.step, run.batches, run.passes)
    accum = cfg.gradient_accumulation_steps
    loss_sum = torch.zeros((), dtype=sum_dtype(d.device), device=d.device)
    for micro, (x, y) in enumerate(
        zip(rank_rows(x_all, d).chunk(accum), rank_rows(y_all, d).chunk(accum), strict=True)
    ):
        sync = nullcontext() if d.world == 1 or micro == accum - 1 else run.fwd.no_sync()
        with sync:
            with run.autocast("train"):
                _, loss = run.fwd(to_device(x, d.device), to_device(y, d.device))
            (loss / accum).backward()
        loss_sum += loss.detach()
    # A diverged step (non-finite loss) is taken too: the loop notices it at its next read of the loss,
    # before anything is saved, and stops with an error; the weights it produced are never written.
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    return loss_sum / accum


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
    kept = f"the best model in {out} is intact" if (out / layout.WEIGHTS).exists() else "nothing was saved"
    shrink = cfg.learning_rate * cfg.weight_decay  # AdamW scales every matrix by (1 - shrink) each step
    if shrink >= 0.5 and cfg.weight_decay > 1:  # an unusual weight decay, not the learning rate, is at fault
        advice = (
            f"lower --weight-decay (now {cfg.weight_decay:g}: each step multiplies the weights by 1 - learning "
            f"rate x weight decay = {1 - shrink:g}; 0.1 is usual)"
        )
    else:
        advice = f"lower --learning-rate (now {cfg.learning_rate:g}, try {cfg.learning_rate / 10:g})"
    return ChargptError(f"the loss became {loss} at step {step}; training stopped and {kept}; {advice}")


def finish(run: Run, state: RunState, tok_s: float) -> None:
    """A run that completed gets its final evaluation; any stop saves the resumable state. An interruption
    does not evaluate: that would change the run's metrics and best model."""
    finished = state.stopped_by in ("n_updates", "max_time", "patience")
    if finished and state.step > 0 and not evaluated(state):
        evaluate_and_save(run, state, tok_s, final=True)
    else:
        evals = state.evaluations()
        if evals:
            state.last_val = report.offered(evals[-1])[0]
        if state.step > 0 and state.plotted_rows != len(state.metrics):
            draw_plot(run, state)  # the rows since the last drawing
    save_state(run, state)
