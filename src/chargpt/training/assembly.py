"""Run assembly: everything a run is set up with before its first step (data, model, optimizer, the saved state
of a resume, threads, number formats, compile, DDP), in the order they depend on each other."""

from __future__ import annotations

import os
import secrets
import shutil
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from chargpt.config import TrainConfig
from chargpt.data.corpus import ShuffledPasses, prepare_data
from chargpt.data.tokenizer import CharTokenizer
from chargpt.errors import ChargptError
from chargpt.machine import cores, memory, precision
from chargpt.model import build_model
from chargpt.storage import layout, trainstate
from chargpt.training import finetune, report, samples
from chargpt.training.averaging import Average
from chargpt.training.distributed import (
    Dist,
    all_max,
)
from chargpt.training.optim import (
    Optimizer,
    extended_anchor,
    in_final_decay,
    make_optimizer,
)
from chargpt.training.outdir import OutDir
from chargpt.training.signals import Signals
from chargpt.training.state import RunState, restore, resume_point, saved_schedule


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
    batches: torch.Generator  # draws every random training batch; part of the resumable state
    passes: ShuffledPasses | None  # window_order "shuffled": where each step's windows start (from the step alone)
    average: Average  # the averaged weights (part of the resumable state too)
    outdir: OutDir | None = None  # the locked output folder, told when the run first saves
    signals: Signals | None = None  # a signal pending during evaluation cuts it short
    precision: dict[str, precision.Choice] = field(default_factory=dict)  # "train", "eval" -> fp32 / bf16
    tuner: cores.ThreadTuner | None = None  # re-checks the thread count (auto threads on a CPU)
    threads_note: str = ""  # how many CPU threads, and why, for the announcement
    origin: dict[str, Any] | None = None  # a fine-tune's source: path, step, val loss (for config.json)
    sources: dict[str, str] = field(default_factory=dict)  # where each setting came from (for config.json)
    prompt: str = "\n"  # what each evaluation's sample continues (samples.prompt_from)
    run_id: str = ""  # the run's identity, in each state it saves (a state from another run is refused)

    def autocast(self, kind: str) -> AbstractContextManager:
        """bf16 autocast where the run's precision says so for this kind of work ("train", "eval"); weights
        stay fp32."""
        return precision.autocast(self.dist.device, self.precision[kind])


def setup(cfg: TrainConfig, d: Dist, *, resume: bool, overwrite: bool, progress: bool = False) -> tuple[Run, RunState]:
    """Data, model, optimizer and (when resuming) the saved state, in that order."""
    out = Path(cfg.out)  # locked and checked by OutDir: a user's files are never replaced
    saved: trainstate.TrainState | None = None
    note = ""
    if resume:
        saved, note = resume_point(cfg, out, trainstate.load_train_state(out))
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
    passes = ShuffledPasses(len(train_ids), cfg.block_size, cfg.seed) if cfg.window_order == "shuffled" else None
    average = Average(cfg.ema, model)
    state = RunState()
    if saved is not None:
        name = layout.STABLE_STATE if note else layout.TRAIN_STATE
        state = restore(saved, out, model, optimizer, batches, average, name)
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
    run = Run(cfg, d, out, tokenizer, train_ids, val_ids, model, fwd, optimizer, batches, passes, average,
              precision=choices)  # fmt: skip
    run.tuner, run.threads_note = tuner, threads_note
    run.origin = begin.origin if begin is not None else saved.origin if saved else None
    run.prompt = samples.prompt_from(tokenizer, train_ids)
    run.run_id = (saved.run_id if saved else None) or secrets.token_hex(8)
    return run, state


def set_threads(cfg: TrainConfig, d: Dist, saved: trainstate.TrainState | None) -> tuple[cores.ThreadTuner | None, str]:
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
# (seconds at most, share of a budgeted run) that --precision auto may time each kind of work for: a 10 s run does
# not spend seconds choosing its number format
PROBE_LIMITS = {"train": (2.5, 0.01), "eval": (1.0, 0.004)}


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

    budget = {k: min(most, share * cfg.max_time) if cfg.max_time else most for k, (most, share) in PROBE_LIMITS.items()}
    probes = {
        "train": precision.Probe(f"train {shape} dropout{cfg.dropout}", step, budget["train"]),
        "eval": precision.Probe(f"eval {shape}", forward, budget["eval"]),
    }
    choices = {kind: precision.resolve(cfg.precision, d.device, kind, probe=probes[kind]) for kind in probes}
    if d.world > 1:
        fp32 = all_max([1.0 if choices[kind].name == "fp32" else 0.0 for kind in probes], d)
        for kind, veto in zip(probes, fp32, strict=True):
            if veto and choices[kind].name == "bf16":
                choices[kind] = precision.Choice("fp32", "another process measured bf16 slower")
    return choices


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
