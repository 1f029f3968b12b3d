"""Evaluation during training: train and val loss on fixed batches within the time budget's share, the metrics
row with the model's sample, the best-val model saved, and loss.png redrawn."""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import asdict
from typing import TYPE_CHECKING

import torch

from chargpt.data.corpus import get_batch
from chargpt.errors import first_line
from chargpt.fileio import DiskFullError
from chargpt.storage import checkpoint as ckpt
from chargpt.training import report, samples
from chargpt.training.budget import Budget
from chargpt.training.distributed import all_max, all_mean, rank_rows, sum_dtype, to_device
from chargpt.training.optim import learning_rate
from chargpt.training.state import RunState, mark_saved

if TYPE_CHECKING:
    from chargpt.training.assembly import Run

PLOT_EVERY = 10.0  # seconds between redraws of loss.png during a run (drawing costs ~0.3-1 s on a CPU)


class EvaluationInterrupted(Exception):
    """A signal arrived while estimating the losses."""


@torch.no_grad()
def estimate(
    run: Run, seconds: float = math.inf, batches: int | None = None, splits: int = 2
) -> tuple[list[float], int]:
    """Mean loss over eval_iters batches (or `batches`) of train and val (or val only: splits=1), and how many
    batches per split were used: fewer when the evaluation would outlast `seconds` (a time budget's share; each
    split gets its part, and at least one batch).

    The same windows at every evaluation of a run (and for any resume or world size): two evaluations then differ
    by what the model learned, not by which windows they drew, so the best-scoring one is the best model
    (docs/design.md, "Evaluations")."""
    cfg, d = run.cfg, run.dist
    run.model.eval()
    losses, used = [], batches or cfg.eval_iters
    start = time.perf_counter()
    for i, part in enumerate((run.train_ids, run.val_ids)[-splits:]):
        deadline = start + seconds * (i + 1) / splits
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003)
        total = torch.zeros((), dtype=sum_dtype(d.device), device=d.device)  # summed there: one read per split
        n = 0
        while n < used:
            signal, late = stop_pending(run, n, deadline)
            if signal:
                raise EvaluationInterrupted
            if late and n > 0:
                break
            x, y = get_batch(part, cfg.batch_size, cfg.block_size, gen)
            with run.autocast("eval"):
                total += run.model(to_device(rank_rows(x, d), d.device), to_device(rank_rows(y, d), d.device))[1]
            n += 1
        used = n
        losses.append(all_mean(total.item() / n, d))
    run.model.train()
    return losses, used


def evaluate_and_save(run: Run, state: RunState, tok_s: float, final: bool = False) -> None:
    """Estimate the losses; rank 0 records them, saves the model if val improved, redraws the plot (at most
    every PLOT_EVERY seconds, and at the end). Step 0 (the untrained model) is recorded, never saved.
    A signal during the estimate skips it: a resumed run evaluates this step first."""
    t0 = time.perf_counter()
    state.tick()
    average = run.average if run.average.ready else None
    seconds = Budget(run.cfg.max_time).evaluation_seconds(state.elapsed, state.timings(), final)
    seconds *= 2 / 3 if average else 1  # the average: its val split too
    try:
        (train_loss, val_loss), used = estimate(run, seconds)
        if average:  # scored on the same val batches: the two compare closely even where the batches are few
            with average.swapped_in():
                average_val = estimate(run, batches=used, splits=1)[0][0]
    except EvaluationInterrupted:
        run.model.train()
        return
    if used < run.cfg.eval_iters:
        report.log.info(
            "step %d: evaluated on %d of %d batches per split to fit the time budget", state.step, used,
            run.cfg.eval_iters,
        )  # fmt: skip
    lr = learning_rate(run.cfg, max(state.step - 1, 0), state.elapsed, state.lr_anchor)
    row = {
        "kind": "eval",
        "step": state.step,
        "train_loss": train_loss,
        "val_loss": val_loss,
        **({"ema_val_loss": average_val} if average else {}),
        "lr": lr,
        "tokens_per_s": tok_s,
        "time": round(state.elapsed, 3),
        **({"eval_batches": used} if used < run.cfg.eval_iters else {}),
    }
    state.metrics.append(row)
    offered, use_average = report.offered(row)  # the better of the trained and the averaged weights
    improved = offered < state.best_val_loss and state.step > 0  # the run's own best so far (--patience)
    kept = state.kept_row  # the saved model's evaluation, when a resume went back over its step
    again = kept is not None and kept["step"] == state.step and report.offered(kept)[0] == offered
    best = state.step > 0 and (again or (improved and offered < state.saved_bar))  # saved: never a worse model
    if kept is not None and kept["step"] == state.step and best:
        state.metrics = [m for m in state.metrics if m is not kept]  # this row is the saved model's now
        state.kept_row = None
    if run.dist.main:
        with average.swapped_in() if use_average and average else nullcontext():
            row["prompt"], row["sample"] = run.prompt, write_sample(run, state, offered)
            save_evaluated(run, state, row, best, offered, use_average)
        shown = row["prompt"] + row["sample"] if row["sample"] else ""
        report.log_evaluation(state.step, train_loss, val_loss, best, shown, average_val if average else None)
    if state.step > 0:
        state.best_val_loss = min(state.best_val_loss, offered)
        state.evals_since_best = 0 if improved else state.evals_since_best + 1
    if best:
        state.saved_bar = offered
    state.last_val, state.last_eval_step = offered, state.step
    state.eval_seconds = max(state.eval_seconds, time.perf_counter() - t0)  # the worst seen: end early, not late
    if final or state.step == 0 or state.tick() - state.plotted_at >= PLOT_EVERY:
        draw_plot(run, state)


def write_sample(run: Run, state: RunState, val_loss: float) -> str:
    """The sample of the weights in the model (rank 0), or "": none from a diverged model (the loop stops next),
    nor where the budget has no time left for it."""
    if not math.isfinite(val_loss) or not Budget(run.cfg.max_time).sample_fits(state.tick(), state.timings()):
        return ""
    t_sample = time.perf_counter()
    text = samples.write(run.model, run.tokenizer, run.prompt)
    state.sample_seconds = max(state.sample_seconds, time.perf_counter() - t_sample)  # the worst seen
    return text


def save_evaluated(run: Run, state: RunState, row: dict, best: bool, val_loss: float, use_average: bool) -> None:
    """Rank 0's part of an evaluation, with the weights it offers in the model (their val loss, and whether they are
    the average: report.offered): the model saved when it is the best so far, metrics.jsonl and samples.txt."""
    if best:
        info = {"step": state.step, "val_loss": val_loss, "train_config": asdict(run.cfg)}
        if not use_average:  # (the average's train loss is not estimated)
            info["train_loss"] = row["train_loss"]
        if run.cfg.ema:
            info["weights"] = run.average.describe() if use_average else "as trained"
        if run.cfg.init_from is not None:
            info["init_from"] = run.origin or {"path": run.cfg.init_from}
        if run.sources:
            info["settings_from"] = run.sources
        ckpt.save_model(run.out, run.model, run.tokenizer, info=info)
        mark_saved(run)
    report.write_metrics(run.out, state.metrics)
    samples.save(run.out, state.metrics)


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


def stop_pending(run: Run, batch: int, deadline: float) -> tuple[bool, bool]:
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
