"""What a user sees and keeps of a run: the progress bar, the evaluation lines, `metrics.jsonl` and `loss.png`.

Only rank 0 reports. The library never prints: the bar writes to stderr through tqdm (the CLI turns it
off with --quiet), and evaluation lines go through `logging`.
"""

from __future__ import annotations

import io
import json
import logging
import time
from pathlib import Path
from typing import Any

from chargpt.config import TrainConfig
from chargpt.fileio import atomic_write_bytes

log = logging.getLogger("chargpt.train")
METRICS, PLOT = "metrics.jsonl", "loss.png"


def write_metrics(out: Path, metrics: list[dict[str, Any]]) -> None:
    lines = "".join(json.dumps(m) + "\n" for m in metrics)
    atomic_write_bytes(out / METRICS, lines.encode())


def read_metrics(out: Path, up_to_step: int) -> list[dict[str, Any]]:
    """The saved loss history up to `up_to_step` (a resumed run continues it); unreadable -> restart it."""
    path = out / METRICS
    try:
        lines = path.read_text().splitlines() if path.is_file() else []
        return [m for m in map(json.loads, filter(str.strip, lines)) if m["step"] <= up_to_step]
    except (OSError, ValueError, KeyError, TypeError):
        log.warning("%s is unreadable; the loss history restarts at step %d", path, up_to_step)
        return []


def plot(out: Path, metrics: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    steps = [m["step"] for m in metrics]
    ax.plot(steps, [m["train_loss"] for m in metrics], label="train", marker=".")
    ax.plot(steps, [m["val_loss"] for m in metrics], label="val", marker=".")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/char)")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"{out.name}: best val {min(m['val_loss'] for m in metrics):.4f}")
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(out / PLOT, buf.getvalue())


def log_evaluation(step: int, train_loss: float, val_loss: float, best: bool) -> None:
    log.info("step %d: train loss %.4f, val loss %.4f%s", step, train_loss, val_loss, " (best, saved)" if best else "")


class Progress:
    """The bar: steps (or, under --max-time, seconds of training, so its ETA is the budget's end), the loss,
    and tokens/s over a ~2 s window that leaves out evaluation and checkpoint time."""

    def __init__(self, cfg: TrainConfig, step: int, elapsed: float, enabled: bool):
        from tqdm import tqdm

        self.cfg = cfg
        self.time_bar = cfg.max_time > 0
        self.bar = tqdm(
            total=cfg.max_time if self.time_bar else cfg.n_updates,
            initial=min(elapsed, cfg.max_time) if self.time_bar else step,
            disable=not enabled,
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

    def step_done(self, now: float, delta: float, step: int, loss: float) -> None:
        self.window_steps += 1
        if now - self.window_t > 2.0:
            self.tok_s = self.window_steps * self.cfg.batch_size * self.cfg.block_size / (now - self.window_t)
            self.window_t, self.window_steps = now, 0
        self.bar.update(min(delta, self.cfg.max_time - self.bar.n) if self.time_bar else 1)
        shown = {"step": step} if self.time_bar else {}
        tok_s = f"{self.tok_s:,.0f}" if self.tok_s else "…"
        self.bar.set_postfix(**shown, loss=f"{loss:.4f}", tok_s=tok_s, refresh=False)

    def close(self) -> None:
        self.bar.close()
