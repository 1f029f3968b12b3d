"""What a user sees and keeps of a run: the announcement, the progress bar, the evaluation lines,
`metrics.jsonl` and `loss.png`.

Only rank 0 reports. The library never prints: the bar writes to stderr through tqdm (the CLI turns it
off with --quiet), and the announcement and evaluation lines go through `logging`.

metrics.jsonl holds three kinds of rows: `{"kind": "eval", "step", "train_loss", "val_loss", "lr", ...}` at
every evaluation (step 0 included), `{"kind": "train", "step", "loss", "lr", ...}` every log_interval
steps (the mean training loss since the previous such row), and `{"kind": "resume", "step", "time"}` where a
resumed run went on (loss.png marks it). Files from before "kind" hold eval rows only.
"""

from __future__ import annotations

import io
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from chargpt.config import TrainConfig
from chargpt.fileio import atomic_write_bytes
from chargpt.storage.layout import METRICS, PLOT

log = logging.getLogger("chargpt.training.loop")


def write_metrics(out: Path, metrics: list[dict[str, Any]]) -> None:
    """metrics.jsonl, strict JSON: a number that is not finite (a diverged loss) is written as null."""
    lines = "".join(json.dumps(_finite(m), allow_nan=False) + "\n" for m in metrics)
    atomic_write_bytes(out / METRICS, lines.encode())


def _finite(row: dict[str, Any]) -> dict[str, Any]:
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}


LOSS_KEYS = ("loss", "train_loss", "val_loss", "ema_val_loss", "lr", "tokens_per_s")  # null read back as NaN


def is_eval(row: dict[str, Any]) -> bool:
    return row.get("kind", "eval") == "eval"


def read_metrics(out: Path, up_to_step: int) -> list[dict[str, Any]]:
    """The saved loss history up to `up_to_step` (a resumed run continues it); unreadable -> restart it."""
    path = out / METRICS
    try:
        lines = path.read_text().splitlines() if path.is_file() else []
        rows = [m for m in map(json.loads, filter(str.strip, lines)) if m["step"] <= up_to_step]
        return [{k: math.nan if v is None and k in LOSS_KEYS else v for k, v in m.items()} for m in rows]
    except (OSError, ValueError, KeyError, TypeError):
        log.warning("%s is unreadable; the loss history restarts at step %d", path, up_to_step)
        return []


def evaluation_row(out: Path, step: int, val_loss: float) -> dict[str, Any] | None:
    """The metrics row of the evaluation at `step` that offered `val_loss` (the saved model's), or None."""
    try:
        rows = read_metrics(out, step)
        return next(m for m in reversed(rows) if is_eval(m) and m["step"] == step and offered(m)[0] == val_loss)
    except (KeyError, TypeError, StopIteration):
        return None


def prepare_plot() -> None:
    """matplotlib, headless. Its import warns over three lines when it cannot write its cache folder (it then uses
    a temporary one, and the plot is drawn all the same): not worth the user's attention, so not shown."""
    mpl_log = logging.getLogger("matplotlib")
    level = mpl_log.level
    mpl_log.setLevel(logging.ERROR)
    try:  # matplotlib (a second of import) only when a plot is drawn; a bare Figure: no pyplot, no GUI backend
        import matplotlib.figure  # noqa: F401
    finally:
        mpl_log.setLevel(level)


def _figure(right: float = 0.89) -> Any:
    """An 8 x 4.5 inch figure whose fixed margins hold the tick and axis labels (`right`: room for a second axis)
    and the title; test_report checks that every text lies inside (tight_layout measured them at every drawing:
    a plot took 1.4x as long)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5))
    fig.subplots_adjust(left=0.085, right=right, bottom=0.115, top=0.925)
    return fig


def _save(fig: Any, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    atomic_write_bytes(path, buf.getvalue())


def plot(out: Path, metrics: list[dict[str, Any]]) -> None:
    """loss.png: the smoothed training loss, the evaluations' train and val points, the best val, and
    the learning rate on a second axis."""
    _save(loss_figure(out.name, metrics), out / PLOT)


def loss_figure(name: str, metrics: list[dict[str, Any]]) -> Any:
    """The figure of `plot`, for the run folder `name`."""
    prepare_plot()
    from matplotlib.ticker import FormatStrFormatter

    evals = sorted((m for m in metrics if is_eval(m)), key=lambda m: m["step"])  # a kept row may come late
    rows = [m for m in metrics if m.get("kind") == "train"]
    resumes = [m["step"] for m in metrics if m.get("kind") == "resume"]
    fig = _figure()
    ax = fig.subplots()
    smoothed: list[float] = []
    if rows:
        steps, losses = [m["step"] for m in rows], [m["loss"] for m in rows]
        smoothed = smooth(losses, weight=1 - 1 / max(1, len(losses) // 20))  # a window of ~5% of the run
        ax.plot(steps, losses, color="tab:blue", alpha=0.25, linewidth=0.8)
        ax.plot(steps, smoothed, color="tab:blue", label="train (smoothed)")
    steps = [m["step"] for m in evals]
    ax.plot(steps, [m["train_loss"] for m in evals], "o", color="tab:blue", markersize=4, label="train (eval)")
    ax.plot(steps, [m["val_loss"] for m in evals], "o-", color="tab:orange", markersize=4, label="val")
    averaged = [m for m in evals if "ema_val_loss" in m]
    if averaged:
        ax.plot([m["step"] for m in averaged], [m["ema_val_loss"] for m in averaged], "s-", color="tab:green",
                markersize=3, label="val, EMA of the weights")  # fmt: skip
    trained = [m for m in evals if m["step"] > 0]
    name = name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")  # a name that is not UTF-8
    title = name
    if trained:
        best = min(trained, key=lambda m: offered(m)[0])
        best_val = offered(best)[0]
        ax.plot([best["step"]], [best_val], "*", color="tab:red", markersize=14, label="best val (saved)")
        title = f"{name}: best val {best_val:.4f} at step {best['step']}"
        # from the first evaluation after step 0 down: the untrained model's ~ln(vocab) would flatten the rest
        finite = [v for v in smoothed if math.isfinite(v)]  # a diverged run's rows hold nan/inf
        high = max([trained[0]["val_loss"]] + finite[len(finite) // 10 : len(finite) // 10 + 1])
        low = min([min(offered(m)[0], m["train_loss"]) for m in trained] + finite)
        pad = 0.08 * (high - low) + 0.02
        if math.isfinite(low - pad) and math.isfinite(high + pad):
            ax.set_ylim(low - pad, high + pad)
            start = evals[0] if evals and evals[0]["step"] == 0 else None
            if start is not None and start["val_loss"] > high + pad:  # off the top: say where it is
                ax.annotate(
                    f"step 0: val {start['val_loss']:.2f} (above)", xy=(0, high + pad), xytext=(4, -12),
                    textcoords="offset points", fontsize=8, color="tab:orange",
                    arrowprops={"arrowstyle": "->", "color": "tab:orange"},
                )  # fmt: skip
    for i, step in enumerate(resumes):
        ax.axvline(step, color="gray", linestyle=":", linewidth=1.2, label="resumed" if i == 0 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/char)")
    ax.grid(alpha=0.3)
    lr_rows = rows or evals
    lr_ax = ax.twinx()
    lr_ax.plot([m["step"] for m in lr_rows], [m["lr"] for m in lr_rows], "--", color="gray", linewidth=1, label="lr")
    lr_ax.set_ylabel("learning rate", color="gray")
    lr_ax.tick_params(axis="y", colors="gray")
    lr_ax.yaxis.set_major_formatter(FormatStrFormatter("%.2g"))  # 2e-06 on the tick: no offset over the title
    lr_ax.set_ylim(bottom=0)
    handles, labels = ax.get_legend_handles_labels()
    lr_handles, lr_labels = lr_ax.get_legend_handles_labels()
    ax.legend(handles + lr_handles, labels + lr_labels, loc="upper right", fontsize=8)
    ax.set_title(title)
    return fig


def compare_plot(path: Path, runs: dict[str, list[dict[str, Any]]]) -> None:
    """One picture of several runs' validation curves (by training time, so runs of different speeds compare
    fairly), for `chargpt info FOLDER --plot FILE`."""
    _save(compare_figure(runs), path)


def compare_figure(runs: dict[str, list[dict[str, Any]]]) -> Any:
    """The figure of `compare_plot`."""
    prepare_plot()
    fig = _figure(right=0.97)
    ax = fig.subplots()
    for name, metrics in runs.items():
        evals = [
            m for m in metrics
            if is_eval(m) and m["step"] > 0 and all(isinstance(m.get(k), (int, float)) for k in ("time", "val_loss"))
        ]  # fmt: skip
        if evals:
            ax.plot([m["time"] for m in evals], [offered(m)[0] for m in evals], "o-", markersize=3, label=name)
    ax.set_xlabel("training time (s)")
    ax.set_ylabel("val loss (nats/char)")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    ax.set_title(f"{len(runs)} runs: validation loss")
    return fig


def smooth(values: list[float], weight: float = 0.9) -> list[float]:
    """Exponential moving average with bias correction (TensorBoard's smoothing): the first points are not
    pulled toward zero."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight**i))
    return out


def offered(row: dict[str, Any]) -> tuple[float, bool]:
    """An evaluation row's val loss for the model it offers, the better of the weights as trained and their
    average (where the run averages), and whether that is the average."""
    averaged = row.get("ema_val_loss")
    if isinstance(averaged, (int, float)) and not isinstance(averaged, bool) and averaged < row["val_loss"]:
        return averaged, True
    return row["val_loss"], False


def log_evaluation(
    step: int, train_loss: float, val_loss: float, best: bool, sample: str = "", average_val: float | None = None
) -> None:
    """The evaluation's line (with the averaged weights' val loss, where the run averages; `best` marks the better
    of the two), and the sample the model writes now, indented under it."""
    note = " (best, saved)" if best else " (before training)" if step == 0 else ""
    if average_val is None:
        log.info("step %d: train loss %.4f, val loss %.4f%s", step, train_loss, val_loss, note)
    else:
        marks = (note, "") if val_loss <= average_val else ("", note)
        log.info("step %d: train loss %.4f, val loss %.4f%s, EMA %.4f%s", step, train_loss, val_loss,
                 marks[0], average_val, marks[1])  # fmt: skip
    if sample:
        log.info("%s", "\n".join("  | " + line for line in sample.rstrip("\n").split("\n")))


def announce(
    cfg: TrainConfig,
    model: Any,
    tokenizer: Any,
    train_ids: Any,
    val_ids: Any,
    device: Any,
    precision: str,
    state: Any,
    preset_note: str,
) -> None:
    """Two lines before the bar: what is trained, how and where; then what it learns from, for how long."""
    n_params = model.num_params()
    if cfg.arch == "bigram":
        shape = f"a bigram model, {n_params:,} parameters"
    elif cfg.arch == "lecture":  # the same model, its heads one by one: slower to train, easier to read
        shape = (
            f"the lecture's GPT as written (chargpt.lecture: per-head attention, no fast paths, slower than --arch "
            f"gpt), {n_params:,} parameters ({cfg.n_layers} layers x {cfg.n_heads} heads, n_embd {cfg.n_embd}, "
            f"context {cfg.block_size})"
        )
    else:
        shape = (
            f"a GPT of {n_params:,} parameters ({cfg.n_layers} layers x {cfg.n_heads} heads, n_embd {cfg.n_embd}, "
            f"context {cfg.block_size})"
        )
    how = f", {preset_note}" if preset_note else ""
    start = f"resuming at step {state.step}: " if state.step else "training "
    log.info("%s%s%s, on %s in %s", start, shape, how, device, precision)
    data = f"data {cfg.data}" if cfg.data else "data: the complete Shakespeare plays (built in)"
    n_chars = len(train_ids) + len(val_ids)
    if cfg.n_updates is None:
        budget = f"{cfg.max_time:g} s (evaluations included)"
    elif cfg.max_time:
        budget = f"{cfg.n_updates:,} steps or {cfg.max_time:g} s, whichever comes first"
    else:
        budget = f"{cfg.n_updates:,} steps"
    if state.step:
        budget += f" in all; {resume_adds(cfg, state)}"
    if tokenizer.vocab_size > LARGE_VOCAB and cfg.vocab == "auto" and cfg.min_char_count == 1:
        log.info(
            "the text has %d distinct characters: --min-char-count N maps those seen fewer than N times to one "
            "unknown symbol (a long tail of rare ones costs parameters and teaches little)", tokenizer.vocab_size,
        )  # fmt: skip
    log.info(
        "%s, %s characters, vocabulary %d, split %s train / %s val; budget %s; writing %s",
        data,
        f"{n_chars:,}",
        tokenizer.vocab_size,
        f"{len(train_ids):,}",
        f"{len(val_ids):,}",
        budget,
        cfg.out,
    )


LARGE_VOCAB = 256  # a vocabulary past this says that --min-char-count exists (Shakespeare: 65-76; code: ~600)


def resume_adds(cfg: TrainConfig, state: Any) -> str:
    """What a resumed run will add to what is done (a budget is the run's total, not this call's)."""
    steps = cfg.n_updates - state.step if cfg.n_updates is not None else None
    seconds = max(cfg.max_time - state.elapsed, 0.0) if cfg.max_time else None
    done = f"{state.step:,} steps in {state.elapsed:.0f} s done"
    if steps is not None and seconds is not None:
        return f"this resume adds up to {steps:,} steps or about {seconds:.0f} s, whichever ends first ({done})"
    if seconds is not None:
        return f"this resume adds about {seconds:.0f} s ({done})"
    return f"this resume adds {steps:,} steps ({done})"


PLAIN_EVERY = 20.0  # seconds between progress lines when stderr is not a terminal


class Progress:
    """The bar: steps (or, under --max-time, seconds of the budget, so its ETA is the budget's end), the loss,
    and tokens/s over a ~2 s window that leaves out evaluation and checkpoint time."""

    def __init__(self, cfg: TrainConfig, step: int, elapsed: float, enabled: bool, terminal: bool | None = None):
        self.cfg = cfg
        self.time_bar = cfg.max_time > 0
        # output to a file or a pipe: no bar redrawn with \r, which fills a log; a plain line every PLAIN_EVERY s
        terminal = sys.stderr.isatty() if terminal is None else terminal
        self.plain = enabled and not terminal
        self.printed_at = time.perf_counter()
        self.bar = tqdm(
            total=cfg.max_time if self.time_bar or cfg.n_updates is None else cfg.n_updates,
            initial=min(elapsed, cfg.max_time) if self.time_bar else step,
            disable=not enabled or self.plain,
            unit="s" if self.time_bar else "step",
            bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f}s [{elapsed}<{remaining}{postfix}]" if self.time_bar else None,
            dynamic_ncols=True,
            leave=True,
        )
        self.tok_s = 0.0
        self.restart()

    def restart(self) -> float:
        """Start a new tokens/s window (after work that is not training); returns the time now."""
        self.window_t, self.window_steps = time.perf_counter(), 0
        return self.window_t

    def step_done(self, now: float, step: int, loss: float, elapsed: float) -> None:
        self.window_steps += 1
        if now - self.window_t > 2.0:
            self.tok_s = self.window_steps * self.cfg.batch_size * self.cfg.block_size / (now - self.window_t)
            self.window_t, self.window_steps = now, 0
        self._advance(step, elapsed)
        shown = {"step": step} if self.time_bar else {}
        tok_s = f"{self.tok_s:,.0f}" if self.tok_s else "…"
        self.bar.set_postfix(**shown, loss=f"{loss:.4f}", tok_s=tok_s, refresh=False)
        if self.plain and now - self.printed_at >= PLAIN_EVERY:
            self.printed_at = now
            where = f", {elapsed:.0f} of {self.cfg.max_time:g} s" if self.time_bar else f" of {self.cfg.n_updates:,}"
            log.info("progress: step %s%s, loss %.4f, %s tokens/s", f"{step:,}", where, loss, tok_s)

    def _advance(self, step: int, elapsed: float) -> None:
        if self.time_bar:
            self.bar.update(max(0.0, min(elapsed, self.cfg.max_time) - self.bar.n))
        else:
            self.bar.update(step - self.bar.n)

    def finish(self, elapsed: float) -> None:
        """Close the bar; a time bar first shows the final evaluation's seconds."""
        if self.time_bar:
            self._advance(0, elapsed)
        self.bar.close()

    def close(self) -> None:
        self.bar.close()
