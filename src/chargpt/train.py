"""The training loop: schedule, evaluation, checkpoints, exact resume, signals, DDP.

The trainer knows nothing about GPT internals: it needs a module returning (logits, loss), the
model directory helpers, and batches. Under torchrun every rank runs this same loop; `batch_size`
is the global batch, drawn from one seeded generator so that any world size sees the same windows.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import random
import shutil
import signal
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from chargpt import checkpoint as ckpt
from chargpt.config import TIME_GOVERNED_UPDATES, TrainConfig, build_train_config, load_toml, resolve_preset
from chargpt.data import get_batch, prepare_data
from chargpt.errors import ChargptError, first_line
from chargpt.fileio import atomic_write_bytes
from chargpt.model import build_model
from chargpt.tokenizer import CharTokenizer

log = logging.getLogger("chargpt.train")
METRICS, PLOT = "metrics.jsonl", "loss.png"


@dataclass
class TrainResult:
    out: str
    step: int
    best_val_loss: float
    last_val_loss: float
    elapsed: float
    stopped_by: str  # "n_updates", "max_time", "pause", "SIGINT" or "SIGTERM"
    rank: int = 0  # under torchrun, only rank 0 reports


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device(f"cuda:{local_rank}")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ChargptError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    if name == "cuda":
        return torch.device(f"cuda:{local_rank}")
    return torch.device(name)


def make_train_config(preset: str | None = None, config_path: str | None = None, **overrides: Any) -> TrainConfig:
    """What the CLI does: defaults < preset (auto: 'cpu' on CPU, 'seed' elsewhere) < TOML < overrides."""
    toml = load_toml(config_path) if config_path else {}
    unknown = sorted(set(overrides) - set(TrainConfig.__dataclass_fields__))
    if unknown:
        raise ChargptError(f"unknown training option(s): {', '.join(unknown)}")
    device = overrides.get("device") or toml.get("device") or "auto"
    preset = resolve_preset(preset, resolve_device(device).type if device in ("auto", "cpu") else "gpu")
    given = {**toml, **{k: v for k, v in overrides.items() if v is not None}}
    if given.get("max_time") and "n_updates" not in given:
        # a time budget alone governs the run: no preset step count may end it (and its schedule) early
        overrides = {**overrides, "n_updates": TIME_GOVERNED_UPDATES}
    return build_train_config(preset, toml, overrides)


def resume_config(out: str, **overrides: Any) -> TrainConfig:
    """The config of the run saved in `out`, with any explicitly given settings on top (e.g. more n_updates)."""
    saved = ckpt.load_train_state(out, mmap=True)["config"]  # train() reads the tensors; here only the config
    if not isinstance(saved, dict) or set(saved) - set(TrainConfig.__dataclass_fields__):
        raise ChargptError(f"the train state in {out} holds an unknown config; start a new run with --overwrite")
    saved.update({k: v for k, v in overrides.items() if v is not None})
    saved["out"] = str(out)
    cfg = TrainConfig(**saved)
    cfg.validate()
    return cfg


# ---------------------------------------------------------------------------------------------
# distributed helpers


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world: int = 1
    owns_group: bool = False  # train() joined the process group, so train() leaves it at the end
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # this rank's device

    @property
    def main(self) -> bool:
        return self.rank == 0


def check_batch(cfg: TrainConfig, world: int) -> int:
    """The rows each rank feeds per micro-batch: batch_size is global, split over ranks, then micro-batches."""
    per_micro, rem = divmod(cfg.batch_size, world * cfg.gradient_accumulation_steps)
    if rem or per_micro == 0:
        raise ChargptError(
            f"batch_size {cfg.batch_size} must divide by world size {world} x gradient_accumulation_steps "
            f"{cfg.gradient_accumulation_steps}; pick a batch_size that is a multiple of "
            f"{world * cfg.gradient_accumulation_steps}"
        )
    return per_micro


def init_distributed(cfg: TrainConfig) -> Dist:
    """Join the process group torchrun set up, or run alone if there is none. Checks before it joins."""
    env = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    if env["WORLD_SIZE"] is None and env["RANK"] is None:
        check_batch(cfg, 1)
        return Dist(device=resolve_device(cfg.device))
    missing = [k for k, v in env.items() if v is None]
    if missing:
        raise ChargptError(
            f"broken distributed launch: {', '.join(missing)} not set; launch with torchrun "
            f"(e.g. torchrun --nproc_per_node=2 -m chargpt train ...) or unset WORLD_SIZE/RANK"
        )
    try:
        d = Dist(rank=int(env["RANK"]), local_rank=int(env["LOCAL_RANK"]), world=int(env["WORLD_SIZE"]))
    except ValueError:
        raise ChargptError("broken distributed launch: RANK, LOCAL_RANK and WORLD_SIZE must be integers") from None
    if not 0 <= d.rank < d.world:
        raise ChargptError(f"broken distributed launch: RANK={d.rank} is outside WORLD_SIZE={d.world}")
    check_batch(cfg, d.world)
    d.device = device = resolve_device(cfg.device, d.local_rank)
    if device.type == "cuda":
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ChargptError(
                f"LOCAL_RANK {d.local_rank} has no GPU: this machine has {torch.cuda.device_count()}; "
                f"launch at most that many processes per node (--nproc_per_node / --nproc)"
            )
        torch.cuda.set_device(device)
    if d.world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", rank=d.rank, world_size=d.world)
        d.owns_group = True
    return d


def _all_max(values: list[float], d: Dist, device: torch.device) -> list[float]:
    if d.world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def _all_mean(value: float, d: Dist, device: torch.device) -> float:
    if d.world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.item() / d.world


# ---------------------------------------------------------------------------------------------
# optimisation pieces


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on weight matrices only (not on biases, LayerNorm gains)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(0.9, cfg.beta2), fused=fused)


def learning_rate(cfg: TrainConfig, step: int, elapsed: float) -> float:
    """Linear warm-up, then cosine decay to min_lr_ratio that ends with n_updates or max_time, whichever first."""
    if step < cfg.warmup_updates:
        return cfg.learning_rate * (step + 1) / cfg.warmup_updates
    progress = step / cfg.n_updates
    if cfg.max_time > 0:
        progress = max(progress, elapsed / cfg.max_time)
    progress = min(1.0, progress)
    floor = cfg.learning_rate * cfg.min_lr_ratio
    return floor + (cfg.learning_rate - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def _maybe_compile(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.nn.Module:
    if not cfg.compile:
        return model
    if device.type == "cpu" and not (shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")):
        log.warning("torch.compile needs a C++ compiler on CPU and none was found; training uncompiled")
        return model
    try:
        return torch.compile(model)
    except Exception as e:  # compile support varies by platform; eager is always correct
        log.warning("torch.compile is unavailable here (%s); training uncompiled", e)
        return model


# ---------------------------------------------------------------------------------------------
# the run


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


def _rng_state(train_gen: torch.Generator) -> dict[str, Any]:
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "python": list(py_state[1]),
        "batches": train_gen.get_state(),
    }


def _set_rng_state(state: dict[str, Any], train_gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    random.setstate((3, tuple(state["python"]), None))
    train_gen.set_state(state["batches"])


def _write_metrics(out: Path, metrics: list[dict[str, Any]]) -> None:
    lines = "".join(json.dumps(m) + "\n" for m in metrics)
    atomic_write_bytes(out / METRICS, lines.encode())


def _plot(out: Path, metrics: list[dict[str, Any]]) -> None:
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


def train(
    cfg: TrainConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    pause_after: int | None = None,
) -> TrainResult:
    """Train per `cfg`, writing the model directory `cfg.out`. Returns where and how it stopped.

    resume: continue the run saved in cfg.out (weights, optimizer, schedule, RNG, best val).
    pause_after: stop (resumably) after this many steps of this call, as an interruption would.
    """
    cfg.validate()
    d = init_distributed(cfg)
    device = d.device
    out = Path(cfg.out)
    state: dict[str, Any] | None = None
    tokenizer: CharTokenizer | None = None
    if resume:
        state = ckpt.load_train_state(out)
        tokenizer = CharTokenizer(list(state["vocab"]), unknown=state.get("unknown"))
    elif ckpt.holds_model(out) and not overwrite:
        raise ChargptError(
            f"{out} already holds a model; pass --resume {out} to continue it, --overwrite to replace it, "
            f"or choose another --out"
        )

    # data (checked before --out is created, so bad data leaves no empty folders behind)
    data = prepare_data(cfg, tokenizer, d, progress=progress and d.main)
    tokenizer, train_ids, val_ids = data.tokenizer, data.train, data.val
    if d.main:
        ckpt.check_writable(out)

    # model and optimizer
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model_config(tokenizer.vocab_size)).to(device)
    optimizer = make_optimizer(model, cfg, device)
    train_gen = torch.Generator().manual_seed(cfg.seed)
    step, elapsed, best_val, metrics = 0, 0.0, float("inf"), []
    if state is not None:
        ckpt.load_state(model, state["model"], str(out / ckpt.TRAIN_STATE))
        try:
            optimizer.load_state_dict(state["optimizer"])
            _set_rng_state(state["rng"], train_gen)
        except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as e:
            first = first_line(e)
            raise ChargptError(
                f"{out / ckpt.TRAIN_STATE} holds an optimizer or RNG state this run cannot use ({first}); "
                f"start a new run with --overwrite"
            ) from None
        step, elapsed, best_val = int(state["step"]), float(state["elapsed"]), float(state["best_val_loss"])
        try:
            lines = (out / METRICS).read_text().splitlines() if (out / METRICS).is_file() else []
            metrics = [m for m in map(json.loads, filter(str.strip, lines)) if m["step"] <= step]
        except (OSError, ValueError, KeyError, TypeError):
            log.warning("%s is unreadable; the loss history restarts at step %d", out / METRICS, step)
            metrics = []
    elif d.main:
        for stale in (ckpt.TRAIN_STATE, METRICS, PLOT):  # an overwritten run's leftovers must not mix with this one
            (out / stale).unlink(missing_ok=True)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    fwd = _maybe_compile(model, cfg, device)
    if d.world > 1:
        fwd = DDP(fwd, device_ids=[device.index] if device.type == "cuda" else None)  # broadcasts rank 0's weights
        if d.rank:  # dropout: each rank its own masks (rank 0 keeps the single-process stream)
            torch.manual_seed(cfg.seed + 1_000_003 * d.rank + step)
    accum = cfg.gradient_accumulation_steps
    tokens_per_step = cfg.batch_size * cfg.block_size

    def rank_rows(x: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous share of a global batch (every rank drew the same global batch)."""
        rows = x.size(0) // d.world
        return x[d.rank * rows : (d.rank + 1) * rows]

    @torch.no_grad()
    def estimate(at_step: int) -> tuple[float, float]:
        model.eval()
        losses = []
        for part in (train_ids, val_ids):
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + at_step)  # same batches for any resume
            total = 0.0
            for _ in range(cfg.eval_iters):
                x, y = get_batch(part, cfg.batch_size, cfg.block_size, gen)
                x, y = rank_rows(x).to(device), rank_rows(y).to(device)
                with amp:
                    total += model(x, y)[1].item()
            losses.append(_all_mean(total / cfg.eval_iters, d, device))
        model.train()
        return losses[0], losses[1]

    def save_state() -> None:
        if d.main:
            ckpt.save_train_state(
                out,
                {
                    "step": step,
                    "elapsed": elapsed,
                    "best_val_loss": best_val,
                    "model": {k: v.detach().cpu() for k, v in ckpt.plain_state_dict(model).items()},
                    "optimizer": optimizer.state_dict(),
                    "rng": _rng_state(train_gen),
                    "vocab": tokenizer.to_list(),
                    "unknown": tokenizer.unknown,
                    "config": asdict(cfg),
                },
            )

    def evaluate_and_save(tok_s: float) -> float:
        nonlocal best_val
        train_loss, val_loss = estimate(step)
        if d.main:
            metrics.append(
                {
                    "step": step,
                    "train_loss": train_loss,
                    "val_loss": val_loss,
                    "lr": learning_rate(cfg, max(step - 1, 0), elapsed),
                    "tokens_per_s": tok_s,
                    "time": round(elapsed, 3),
                }
            )
            if val_loss < best_val:
                ckpt.save_model(
                    out,
                    model,
                    tokenizer,
                    info={"step": step, "val_loss": val_loss, "train_loss": train_loss, "train_config": asdict(cfg)},
                )
            _write_metrics(out, metrics)
            _plot(out, metrics)
            log.info(
                "step %d: train loss %.4f, val loss %.4f%s",
                step,
                train_loss,
                val_loss,
                " (best, saved)" if val_loss < best_val else "",
            )
        best_val = min(best_val, val_loss)
        return val_loss

    from tqdm import tqdm

    # with a time budget the bar counts training seconds, so its ETA is the budget's end
    time_bar = cfg.max_time > 0
    bar = tqdm(
        total=cfg.max_time if time_bar else cfg.n_updates,
        initial=min(elapsed, cfg.max_time) if time_bar else step,
        disable=not (progress and d.main),
        unit="s" if time_bar else "step",
        bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f}s [{elapsed}<{remaining}{postfix}]" if time_bar else None,
        dynamic_ncols=True,
        leave=True,
    )
    model.train()
    last_eval_step, last_val, stopped_by, start_step = -1, float("nan"), "n_updates", step
    tok_s, window_t, window_steps = 0.0, time.perf_counter(), 0
    t_prev = time.perf_counter()
    with _Signals() as signals:
        while step < cfg.n_updates:
            # one all-reduce keeps every rank on the same clock and the same decision to stop
            caught = 1.0 if signals.caught else 0.0
            elapsed, caught = _all_max([elapsed, caught], d, device)
            if caught:
                stopped_by = signals.caught or "SIGTERM"
                break
            if cfg.max_time and elapsed >= cfg.max_time:
                stopped_by = "max_time"
                break
            if pause_after is not None and step - start_step >= pause_after:
                stopped_by = "pause"
                break
            lr = learning_rate(cfg, step, elapsed)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x_all, y_all = get_batch(train_ids, cfg.batch_size, cfg.block_size, train_gen)
            x_rank, y_rank = rank_rows(x_all), rank_rows(y_all)
            loss_sum = 0.0
            for micro, (x, y) in enumerate(zip(x_rank.chunk(accum), y_rank.chunk(accum), strict=True)):
                sync = nullcontext() if d.world == 1 or micro == accum - 1 else fwd.no_sync()
                with sync:
                    with amp:
                        _, loss = fwd(x.to(device, non_blocking=True), y.to(device, non_blocking=True))
                    (loss / accum).backward()
                loss_sum += loss.item()
            loss_value = loss_sum / accum
            if not math.isfinite(loss_value):
                bar.close()
                kept = f"the best model in {out} is intact" if (out / ckpt.WEIGHTS).exists() else "nothing was saved"
                raise ChargptError(
                    f"the loss became {loss_value} at step {step + 1}; training stopped and {kept}; "
                    f"lower --learning-rate (now {cfg.learning_rate:g}, try {cfg.learning_rate / 10:g})"
                )
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            now = time.perf_counter()
            delta, t_prev = now - t_prev, now
            elapsed += delta
            window_steps += 1
            if now - window_t > 2.0:
                tok_s = window_steps * tokens_per_step / (now - window_t)
                window_t, window_steps = now, 0
            bar.update(min(delta, cfg.max_time - bar.n) if time_bar else 1)
            shown = {"step": step} if time_bar else {}
            bar.set_postfix(**shown, loss=f"{loss_value:.4f}", tok_s=f"{tok_s:,.0f}" if tok_s else "…", refresh=False)
            if step % cfg.eval_interval == 0 or step == cfg.n_updates:
                last_val, last_eval_step = evaluate_and_save(tok_s), step
                t_prev = time.perf_counter()  # evaluation time is not training time
                window_t, window_steps = t_prev, 0  # nor part of the tokens/s window
            if step % cfg.checkpoint_interval == 0:
                save_state()
                t_prev = time.perf_counter()
                window_t, window_steps = t_prev, 0
        # an interruption only saves the state: evaluating there would change the run's metrics and best model
        finished = stopped_by in ("n_updates", "max_time")
        if finished and last_eval_step != step and step > 0 and (not metrics or metrics[-1]["step"] != step):
            last_val = evaluate_and_save(tok_s)
        elif metrics:
            last_val = metrics[-1]["val_loss"]
        save_state()
    bar.close()
    if d.world > 1:
        dist.barrier()  # rank 0 has finished writing before any rank returns
    if d.owns_group:
        dist.destroy_process_group()  # so that this process can train() again
    return TrainResult(
        out=str(out),
        step=step,
        best_val_loss=best_val,
        last_val_loss=last_val,
        elapsed=elapsed,
        stopped_by=stopped_by,
        rank=d.rank,
    )
