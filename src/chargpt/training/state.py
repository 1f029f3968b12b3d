"""What a run saves and resumes from: its changing state (RunState), written to train_state.pt (and, where WSD's
final decay begins, stable_state.pt) and read back; and where a resumed run continues from."""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from chargpt.config import TrainConfig, renamed
from chargpt.errors import ChargptError, first_line
from chargpt.storage import checkpoint as ckpt
from chargpt.storage import layout, trainstate
from chargpt.training import report
from chargpt.training.averaging import Average
from chargpt.training.budget import Timings
from chargpt.training.optim import (
    SCHEDULE_KEYS,
    Anchor,
    Optimizer,
    budget_grew,
    in_final_decay,
    same_schedule,
)

if TYPE_CHECKING:
    from chargpt.training.assembly import Run


@dataclass
class RunState(trainstate.Counters):
    """What changes as a run goes. Its counters (storage.trainstate.Counters: step, elapsed, best val, the loss
    row being summed, the measured eval/plot/save times, --patience's count, the schedule's anchor) are saved in
    train_state.pt under their names and restored from it: a new resumable counter is a field there, and nothing
    else. The fields here are this call's own, or derived on resume."""

    last_val: float = math.nan
    last_eval_step: int = -1
    metrics: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl, read back on resume
    stopped_by: str = "n_updates"
    saved_at: float = 0.0  # `elapsed` when the resumable state was last saved (for checkpoint_seconds)
    clock_start: float = field(default_factory=time.perf_counter)
    clock_base: float = 0.0  # elapsed when this call started
    step_seconds: float = 0.0
    sample_seconds: float = 0.0  # how long the last evaluation's sample took
    plotted_at: float = -math.inf  # elapsed at the last drawing of loss.png
    plotted_rows: int = 0  # metrics rows it showed
    decaying: bool = False  # WSD past its flat stretch: the state from just before is saved (STABLE_STATE)
    resume_note: str = ""  # how a resume continues the schedule, for the announcement
    saved_bar: float = math.inf  # the val loss of the model on disk: a model is saved only if it is better
    kept_row: dict[str, Any] | None = None  # the saved model's evaluation, from steps this resume goes back over

    def evaluations(self) -> list[dict[str, Any]]:
        """This run's evaluation rows in order (the kept row of the saved model left out)."""
        return [m for m in self.metrics if report.is_eval(m) and m is not self.kept_row]

    def tick(self) -> float:
        """Bring `elapsed` up to now; --max-time counts everything the loop does, evaluations included."""
        self.elapsed = self.clock_base + time.perf_counter() - self.clock_start
        return self.elapsed

    def timings(self) -> Timings:
        """What the time budget (chargpt.training.budget) needs to know: how long the run's work took."""
        return Timings(self.step_seconds, self.eval_seconds, self.sample_seconds, self.plot_seconds, self.save_seconds)


def saved_schedule(cfg: TrainConfig, saved: trainstate.TrainState) -> TrainConfig:
    """`cfg` with the budget and schedule the saved run had (what its learning rates were computed from)."""
    config = renamed(saved.config)
    return dataclasses.replace(cfg, **{k: config[k] for k in SCHEDULE_KEYS if k in config})


def resume_point(cfg: TrainConfig, out: Path, end: trainstate.TrainState) -> tuple[trainstate.TrainState, str]:
    """Where a resumed run continues from, and how (for the announcement). Usually the end of the saved run. A
    WSD run given a larger budget after its final decay began goes back to the state saved just before that
    decay (STABLE_STATE), so the flat stretch goes on and the decay comes at the new end: the best val loss so
    far stays the bar a new model must beat, so the model on disk is only ever replaced by a better one."""
    old = saved_schedule(cfg, end)
    if not (
        same_schedule(old, cfg)
        and budget_grew(old, cfg)
        and in_final_decay(old, end.step, end.elapsed, saved_anchor(end.lr_anchor))
    ):
        return end, ""
    if not os.path.lexists(out / layout.STABLE_STATE):
        return end, ""  # an older folder: extended_anchor re-warms the rate
    try:
        stable = trainstate.load_train_state(out, name=layout.STABLE_STATE)
    except ChargptError:  # damaged or not a file: the end state, re-warmed, still trains on
        return end, ""
    if end.run_id is not None and stable.run_id != end.run_id:
        raise ChargptError(
            f"{out / layout.STABLE_STATE} belongs to another run than {out / layout.TRAIN_STATE}; remove it (the "
            f"run then goes on from its end, its learning rate warmed up again), then resume again"
        )
    if stable.step >= end.step or in_final_decay(cfg, stable.step, stable.elapsed, saved_anchor(stable.lr_anchor)):
        return end, ""
    stable.best_val_loss, stable.evals_since_best = end.best_val_loss, 0
    note = (
        f"going back to step {stable.step:,}, where the final learning-rate decay began: the flat stretch goes on "
        f"and the decay comes at the new budget's end (steps {stable.step + 1:,}-{end.step:,} are dropped; the "
        f"best model so far, val {end.best_val_loss:.4f}, stays until a better one)"
    )
    return stable, note


SAVED = tuple(f.name for f in fields(trainstate.Counters))


def restore(
    saved: trainstate.TrainState,
    out: Path,
    model: torch.nn.Module,
    optimizer: Optimizer,
    batches: torch.Generator,
    average: Average,
    name: str = layout.TRAIN_STATE,
) -> RunState:
    """Load a saved run's weights, optimizer, RNG and averaged weights (read from out / name) into the fresh ones;
    return its RunState."""
    ckpt.load_state(model, saved.model, str(out / name))
    broken = [k for k, v in saved.model.items() if not torch.isfinite(v).all()]
    if broken:
        raise ChargptError(
            f"{out / name} holds NaN or infinite weights (in {broken[0]}); it is damaged: start a new run with "
            f"--overwrite (or --init-from a model that is intact)"
        )
    try:
        optimizer.load_state_dict(saved.optimizer)
        trainstate.restore_rng(saved.rng, batches)
        average.load(saved.average, saved.average_steps)
    except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as e:
        raise ChargptError(
            f"{out / name} holds an optimizer, RNG or averaged-weights state this run cannot use ({first_line(e)}); "
            f"start a new run with --overwrite"
        ) from None
    values = {name: getattr(saved, name) for name in SAVED}
    values["lr_anchor"] = saved_anchor(saved.lr_anchor)
    state = RunState(**values)
    state.metrics, state.saved_at = report.read_metrics(out, state.step), state.elapsed
    beat_the_saved_model(state, out)
    return state


def beat_the_saved_model(state: RunState, out: Path) -> None:
    """A resumed run saves a model only if it beats the model on disk, whatever the train state says: a state
    saved before that model (a run killed between the two saves, or one that goes back to an earlier state) would
    otherwise let a worse model replace it. Its evaluation row stays in the metrics too, so metrics.jsonl,
    samples.txt and the run's summary name the model that is saved."""
    state.saved_bar = state.best_val_loss
    saved = ckpt.saved_model(out)
    if saved is None or saved.val_loss is None or saved.step is None:
        return
    state.saved_bar = saved.val_loss
    if saved.step > state.step:
        state.kept_row = report.evaluation_row(out, saved.step, saved.val_loss)
        if state.kept_row is not None:
            state.metrics.append(state.kept_row)


def saved_anchor(value: Any) -> Anchor | None:
    """A saved schedule anchor: [step, elapsed, lr], or None (a run never extended, or from before anchors)."""
    if value is None:
        return None
    try:
        step, elapsed, lr = value
        return int(step), float(elapsed), float(lr)
    except (TypeError, ValueError):
        raise ChargptError("the train state's lr_anchor is malformed; start a new run with --overwrite") from None


def save_state(run: Run, state: RunState, name: str = layout.TRAIN_STATE) -> None:
    """The resumable state (rank 0 writes it): weights, optimizer, RNG, step, clock, best val, config. As
    STABLE_STATE: the same, kept from where WSD's final decay begins."""
    t0 = time.perf_counter()
    state.saved_at = state.tick()
    if not run.dist.main:
        return
    report.write_metrics(run.out, state.metrics)  # the training-loss rows since the last evaluation
    weights = {k: v.detach().cpu() for k, v in ckpt.plain_state_dict(run.model).items()}
    trainstate.save_train_state(
        run.out,
        trainstate.TrainState(
            **{name: getattr(state, name) for name in SAVED},
            model=weights,
            optimizer=run.optimizer.state_dict(),
            rng=trainstate.capture_rng(run.batches),
            vocab=run.tokenizer.to_list(),
            config=asdict(run.cfg),
            unknown=run.tokenizer.unknown,
            threads=torch.get_num_threads(),
            data_chars=len(run.train_ids) + len(run.val_ids),
            origin=run.origin,
            average=run.average.state_dict(),
            average_steps=run.average.count,
            run_id=run.run_id,
        ).with_lists(),
        name,
    )
    mark_saved(run)
    state.save_seconds = time.perf_counter() - t0


def evaluated(state: RunState) -> bool:
    """Whether this step has its evaluation row (rows of other kinds may follow it)."""
    evals = state.evaluations()
    return state.last_eval_step == state.step or bool(evals and evals[-1]["step"] == state.step)


def mark_saved(run: Run) -> None:
    if run.outdir is not None:
        run.outdir.saved()
