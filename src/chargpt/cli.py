"""`chargpt train | sample | eval | info`: parses flags, calls the library, prints. Nothing else lives here."""

from __future__ import annotations

import argparse
import contextlib
import difflib
import errno
import gc
import importlib
import io
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

from chargpt import __version__
from chargpt.config import (
    MODEL_TYPES,
    OPTIMIZERS,
    PRECISIONS,
    PRESETS,
    QUANTIZE,
    SCHEDULES,
    TIME_GOVERNED_UPDATES,
    TRAIN_FIELDS,
    TrainConfig,
)
from chargpt.errors import ChargptError, RememberedInterrupt

# set by the --nproc launcher: each rank writes its last line (an error, "interrupted ...") to DIR/rankN,
# and the launcher prints one of them once, instead of every rank's copy and torchrun's traceback
MESSAGES_ENV = "CHARGPT_LAUNCHER_MESSAGES"

EXIT_USAGE = 2
EXIT_SIGNAL = {"SIGINT": 130, "SIGTERM": 143}
# A one-line description of every TrainConfig field, and the --help group it is listed under.
FLAG_HELP = {
    "data": "UTF-8 text file, folder of .txt files, or quoted glob ('books/**/*.txt') to train on",
    "token_cache": "folder for the tokenized corpus (memory-mapped); off = tokenize into memory",
    "vocab": "auto (the corpus's characters) or a UTF-8 file whose characters are the vocabulary",
    "min_char_count": "with --vocab auto: rarer characters map to one unknown symbol (U+FFFD)",
    "init_from": "fine-tune: start from this trained model's weights (its shape; the new text's characters are "
    "added); the learning rate defaults to a third of the preset's, warm-up to 20 steps",
    "val_fraction": "the last part of the text held out for validation",
    "arch": "the model: gpt, or bigram (the lecture's baseline)",
    "block_size": "context length in characters",
    "n_embd": "embedding width",
    "n_heads": "attention heads per layer (must divide n_embd)",
    "n_layers": "transformer blocks",
    "dropout": "dropout probability while training",
    "n_updates": "optimizer steps (with only --max-time given, the clock alone ends the run)",
    "max_time": "wall-clock budget in seconds for the training loop, evaluations included; the LR schedule "
    "ends with it",
    "batch_size": "sequences per step (global, across all processes)",
    "gradient_accumulation_steps": "micro-batches per step; same global batch, less memory",
    "optimizer": "adamw, or muon (Muon for the blocks' matrices, AdamW for embeddings, head, biases, gains)",
    "learning_rate": "peak learning rate (Muon's updates are scaled to AdamW's size: one rate serves both)",
    "schedule": "after warm-up: cosine decay, or wsd (flat, then linear decay over the last --decay-fraction)",
    "decay_fraction": "wsd: the part of the budget (steps or --max-time) the final decay takes",
    "min_lr_ratio": "the decay ends at learning_rate x this",
    "warmup_updates": "linear warm-up steps",
    "weight_decay": "AdamW weight decay on weight matrices only",
    "grad_clip": "max gradient norm; 0 = off",
    "beta2": "AdamW second-moment decay (0.99 suits small batches)",
    "seed": "seeds weights, batches and dropout: same seed, same run",
    "patience": "stop after N evaluations in a row without a better val loss (the best model is kept); 0 = never",
    "out": "model directory to write",
    "eval_interval": "steps between evaluations (metrics row, best-val checkpoint, plot)",
    "eval_iters": "batches per loss estimate",
    "log_interval": "steps between training-loss rows in metrics.jsonl",
    "checkpoint_interval": "steps between saves of the resumable state; 0 = by time only",
    "checkpoint_seconds": "also save the resumable state every this many seconds of training; 0 = off",
    "device": "auto (cuda > mps > cpu), cpu, cuda, cuda:N, mps",
    "compile": "torch.compile the model (needs a C++ compiler on CPU)",
    "threads": "CPU threads; 0 = auto: the cores free at the start, re-checked when steps slow down",
    "precision": "auto (bf16 autocast where this machine runs it faster, else fp32), fp32, bf16",
}
DEVICE_HELP = f"{FLAG_HELP['device']} (default: auto)"
THREADS_HELP = "CPU threads (default: the cores free at start-up)"
PRECISION_HELP = "auto (what is faster on this machine, per kind of work), fp32, or bf16 (default: auto)"
QUANTIZE_HELP = "int8 weights (faster decoding, slightly different numbers), none, or auto: int8 where measured faster"
GROUPS = {
    "data": ("data", "val_fraction", "token_cache", "vocab", "min_char_count", "init_from"),
    "model": ("arch", "block_size", "n_embd", "n_heads", "n_layers", "dropout"),
    "optimisation": (
        "n_updates",
        "max_time",
        "batch_size",
        "gradient_accumulation_steps",
        "optimizer",
        "learning_rate",
        "schedule",
        "decay_fraction",
        "min_lr_ratio",
        "warmup_updates",
        "weight_decay",
        "grad_clip",
        "beta2",
        "seed",
    ),
    "evaluation and checkpoints": (
        "out",
        "eval_interval",
        "eval_iters",
        "log_interval",
        "checkpoint_interval",
        "checkpoint_seconds",
        "patience",
    ),
    "hardware": ("device", "precision", "threads", "compile"),
}
TRAIN_EXAMPLES = """examples:
  chargpt train --out out/demo --max-time 150          # 2.5 minutes on the built-in Shakespeare
  chargpt train --data my.txt --out out/mine --preset seed --n-updates 2000
  chargpt train --resume out/demo --max-time 300       # continue a run with a larger budget
"""
SAMPLE_EXAMPLES = """examples:
  chargpt sample --model out/demo --prompt "ROMEO:" --temperature 0.8 --seed 1
  chargpt sample --model out/demo --top-p 0.9 --num-samples 4 --no-stream
"""
EVAL_EXAMPLES = """example:
  chargpt eval --model out/demo --data held-out.txt    # one JSON line: loss, bits_per_char, chars, precision
"""
SERVE_EXAMPLES = """examples:
  chargpt serve --model out/demo                       # http://127.0.0.1:8000, playground at /
  chargpt serve --model out/demo --host 0.0.0.0 --port 9000 --api-key "$KEY" --max-batch 32
"""
EXPORT_EXAMPLES = """examples:
  chargpt export --model out/demo --format onnx --out demo.onnx   # then run it with onnxruntime (README)
  chargpt export --model out/demo --format web --out demo-site    # open demo-site/index.html in a browser
"""
INFO_EXAMPLES = """examples:
  chargpt info out/demo
  chargpt info out/demo --json
"""
MAIN_EXAMPLES = """start here:
  chargpt train --out out/demo --max-time 150    # train a small GPT on Shakespeare (CPU: ~2.5 minutes)
  chargpt sample --model out/demo --prompt "ROMEO:"
  chargpt info out/demo
each command has its own --help.
"""


class _Parser(argparse.ArgumentParser):
    """argparse without abbreviations, and a usage error is one line (with a suggestion) and exit code 2."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message}{self.suggestion(message)} (see {self.prog} --help)\n")
        sys.exit(EXIT_USAGE)

    def suggestion(self, message: str) -> str:
        if message.startswith("argument COMMAND: invalid choice: "):  # a mistyped subcommand
            word = message.split("invalid choice: ", 1)[1].split(" (choose", 1)[0].strip("'")
            commands = [c for a in self._actions if isinstance(a, argparse._SubParsersAction) for c in a.choices]
            close = difflib.get_close_matches(word, commands, n=1, cutoff=0.5)
            return f"; did you mean {close[0]}?" if close else ""
        if "unrecognized arguments: " not in message:
            return ""
        known = [s for a in self._actions for s in a.option_strings if s.startswith("--")]
        for word in message.split("unrecognized arguments: ", 1)[1].split():
            word = word.split("=")[0]
            if word[:2] != "--":
                continue
            starts = [k for k in known if k.startswith(word)]  # an abbreviation: what it abbreviates
            close = starts if len(starts) == 1 else difflib.get_close_matches(word, known, n=1, cutoff=0.6)
            if close:
                return f"; did you mean {close[0]}?"
        return ""

    footer: Any = None  # a function adding a last paragraph to --help, computed only when help is shown

    def format_help(self) -> str:
        return super().format_help() + (f"\n{self.footer()}\n" if self.footer else "")


def _preset_here() -> str:
    from chargpt.config import resolve_preset

    try:
        preset = resolve_preset(None, "auto")
    except ChargptError:
        preset = "cpu"
    why = "no GPU found" if preset == "cpu" else "a GPU was found"
    return (
        f"on this machine: --preset {preset} applies unless you name one ({why}); cpu = a 0.8M-parameter model "
        f"tuned for a laptop CPU, gpu = the classic 10.8M-parameter model tuned for a GPU, seed = the same model "
        f"as in the lecture"
    )


def _default_text(name: str) -> str:
    """`default X`, or the two presets' values for the fields a preset sets."""
    f = TRAIN_FIELDS[name]
    if name == "data":
        return "default: the complete Shakespeare plays, built in"
    if f.type == "bool":
        return f"default: {'on' if f.default else 'off'}"
    if name == "max_time":
        return "default: 0, no limit"
    if name == "token_cache":
        return "default: the tokens folder in chargpt's cache folder"
    if name == "init_from":
        return "default: a fresh model"
    values = {p: PRESETS[p].get(name, f.default) for p in ("cpu", "gpu", "seed")}
    if len(set(values.values())) == 1:
        return f"default: {f.default}"
    shown = [f"{value} with --preset {p}" for p, value in values.items()]
    return f"default: {', '.join(shown)}"


def _add_train_flags(p: _Parser) -> None:
    """One flag per TrainConfig field (`--n-embd` <-> n_embd), in --help groups; default None = not given."""
    groups = {title: p.add_argument_group(title) for title in ("settings", *GROUPS)}
    group_of = {name: title for title, names in GROUPS.items() for name in names}
    general = groups["settings"]
    general.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="cpu (a small model tuned for a CPU), gpu (the 10.8M model tuned for a GPU) or seed (the 10.8M model "
        "as in the lecture) (default: cpu on a CPU, gpu on a CUDA GPU)",
    )
    general.add_argument(
        "--config",
        metavar="FILE",
        help="TOML file of settings (keys: flag names with underscores); flags override it (default: none)",
    )
    general.add_argument(
        "--quiet", action="store_true", help="no announcement, progress bar or eval lines (default: off)"
    )
    for f in fields(TrainConfig):
        group = groups.get(group_of.get(f.name, ""), general)
        flag = "--" + f.name.replace("_", "-")
        text = f"{FLAG_HELP.get(f.name, '')} ({_default_text(f.name)})".lstrip()
        if f.type == "bool":
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            kind = {"int": int, "float": float}.get(f.type, str)
            metavar = {"int": "N", "float": "X"}.get(f.type, "PATH" if f.name in ("data", "out") else "NAME")
            metavar = "DIR" if f.name == "init_from" else metavar
            choices = {"arch": MODEL_TYPES, "optimizer": OPTIMIZERS, "schedule": SCHEDULES}.get(f.name)
            group.add_argument(flag, type=kind, default=None, metavar=metavar, choices=choices, help=text)
    groups["model"].add_argument(
        "--model",
        dest="legacy_model",
        metavar="ARCH",
        help=argparse.SUPPRESS,  # the old spelling of --arch
    )
    checkpoints = groups["evaluation and checkpoints"]
    checkpoints.add_argument(
        "--resume", metavar="DIR", help="continue the run saved in this model directory (default: a new run)"
    )
    checkpoints.add_argument("--overwrite", action="store_true", help="replace a model already in --out (default: off)")
    groups["hardware"].add_argument(
        "--nproc", type=int, help="launch N processes with torchrun (DDP) on this machine (default: 1, no torchrun)"
    )


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="chargpt",
        description="Character-level GPT: train, sample, evaluate, inspect.",
        epilog=MAIN_EXAMPLES,
    )
    p.add_argument("--version", action="version", version=_version())
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")

    t = sub.add_parser(
        "train",
        help="train a model (default data: the complete Shakespeare plays)",
        description="Train a model; write weights, metrics.jsonl and loss.png to --out. Defaults < --preset < "
        "--config < flags.",
        epilog=TRAIN_EXAMPLES,
    )
    t.footer = _preset_here
    _add_train_flags(t)

    s = sub.add_parser(
        "sample", help="generate text from a trained model", description="Generate text.", epilog=SAMPLE_EXAMPLES
    )
    s.add_argument("--model", required=True, metavar="DIR", help="model directory (required)")
    s.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    s.add_argument("--max-new-tokens", type=int, default=500, help="characters to generate (default: 500)")
    s.add_argument(
        "--temperature", type=float, default=1.0, help="<1 = safer, >1 = wilder, 0 = greedy (it loops) (default: 1.0)"
    )
    s.add_argument("--top-k", type=int, default=None, help="sample from the K likeliest characters (default: off)")
    s.add_argument("--top-p", type=float, default=None, help="nucleus sampling, in (0, 1] (default: off)")
    s.add_argument("--seed", type=int, default=None, help="same seed, same text (default: random)")
    s.add_argument("--num-samples", type=int, default=1, help="samples generated together as one batch (default: 1)")
    s.add_argument(
        "--stop", action="append", default=[], help="end a sample at this string; repeatable (default: none)"
    )
    s.add_argument("--no-stream", action="store_true", help="print when done instead of as generated (default: off)")
    s.add_argument("--device", default="auto", help=DEVICE_HELP)
    s.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for decoding (default: 1 for one sample; more for a batch, as cores are free)",
    )
    s.add_argument("--precision", default="auto", choices=PRECISIONS, help=PRECISION_HELP)
    s.add_argument("--quantize", default="auto", choices=QUANTIZE, help=QUANTIZE_HELP + " (default: auto)")

    e = sub.add_parser(
        "eval",
        help="score a model on a text file (JSON: loss, bits_per_char, chars)",
        description="Mean per-character loss of a model on a text file, printed as one JSON line.",
        epilog=EVAL_EXAMPLES,
    )
    e.add_argument("--model", required=True, metavar="DIR", help="model directory (required)")
    e.add_argument("--data", required=True, metavar="FILE", help="UTF-8 text file, any size: streamed (required)")
    e.add_argument("--device", default="auto", help=DEVICE_HELP)
    e.add_argument("--quiet", action="store_true", help="no progress bar (default: a bar on a terminal)")
    e.add_argument(
        "--token-cache", metavar="DIR", help="folder for the tokenized file (default: chargpt's cache folder)"
    )
    e.add_argument("--precision", default="auto", choices=PRECISIONS, help=PRECISION_HELP)
    e.add_argument(
        "--quantize",
        default="none",
        choices=QUANTIZE,
        help=QUANTIZE_HELP + "; scores the text with and without it (default: none, the model as trained)",
    )
    e.add_argument("--threads", type=int, default=None, help=THREADS_HELP)

    i = sub.add_parser(
        "info",
        help="what a model directory holds: shape, parameters, vocabulary, training, files",
        description="Describe a model directory.",
        epilog=INFO_EXAMPLES,
    )
    i.add_argument("dir", metavar="DIR", help="model directory")
    i.add_argument("--json", action="store_true", help="print one JSON object instead of text (default: off)")
    i.add_argument(
        "--plot", metavar="FILE", help="with a folder of runs: draw their val curves in one PNG (default: none)"
    )

    x = sub.add_parser(
        "export",
        help="write a model as an ONNX file (onnxruntime, any language) or a web page that runs it in the browser",
        description="Write a model directory's model as one ONNX graph (the forward with a KV cache, which serves "
        "as the full forward and as the one-token decode step; needs pip install 'chargpt[export]'), or as a "
        "folder with a page that samples from it in the browser, offline, with nothing installed.",
        epilog=EXPORT_EXAMPLES,
    )
    x.add_argument("--model", required=True, metavar="DIR", help="model directory (required)")
    x.add_argument(
        "--format", default="onnx", choices=("onnx", "web"), help="onnx (a file) or web (a folder: a page that "
        "runs the model in the browser) (default: onnx)",
    )  # fmt: skip
    x.add_argument(
        "--out", required=True, metavar="PATH", help="the .onnx file, or the web page's folder, to write (required)"
    )
    x.add_argument("--overwrite", action="store_true", help="replace an existing --out (default: refuse)")

    v = sub.add_parser(
        "serve",
        help="an OpenAI-compatible HTTP API and a browser playground for a model",
        description="Serve a model over HTTP: OpenAI-style /v1/completions (streaming, batching) and a playground.",
        epilog=SERVE_EXAMPLES,
    )
    v.add_argument("--model", required=True, metavar="DIR", help="model directory (required)")
    v.add_argument(
        "--host",
        default="127.0.0.1",
        help="127.0.0.1 = this machine only; 0.0.0.0 = every interface (default: 127.0.0.1)",
    )
    v.add_argument("--port", type=int, default=8000, help="0 = any free port (default: 8000)")
    v.add_argument(
        "--api-key", metavar="KEY", help="require 'Authorization: Bearer KEY' on every /v1/ request (default: none)"
    )
    v.add_argument("--max-batch", type=int, default=32, metavar="N", help="sequences decoded together (default: 32)")
    v.add_argument(
        "--max-queue", type=int, default=64, metavar="N", help="requests that may wait; beyond: 503 (default: 64)"
    )
    v.add_argument(
        "--max-tokens-limit", type=int, default=4096, metavar="N", help="cap on max_tokens per request (default: 4096)"
    )
    v.add_argument(
        "--max-prompt-chars",
        type=int,
        default=65536,
        metavar="N",
        help="cap on a prompt's length in characters (default: 65536)",
    )
    v.add_argument("--device", default="auto", help=DEVICE_HELP)
    v.add_argument("--precision", default="auto", choices=PRECISIONS, help=PRECISION_HELP)
    v.add_argument("--quantize", default="auto", choices=QUANTIZE, help=QUANTIZE_HELP + " (default: auto)")
    v.add_argument(
        "--threads", type=int, default=None, help="CPU threads (default: the cores free at start-up but one, for HTTP)"
    )
    return p


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        torch_version = version("torch")
    except PackageNotFoundError:
        torch_version = "not installed"
    return f"chargpt {__version__} (torch {torch_version}, Python {sys.version.split()[0]})"


def _setup_logging(quiet: bool) -> None:
    from tqdm import tqdm

    class TqdmHandler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            tqdm.write(self.format(record), file=sys.stderr)

    logger = logging.getLogger("chargpt")
    logger.handlers[:] = [TqdmHandler()]
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    logger.propagate = False


def _legacy_model_flag(args: argparse.Namespace) -> None:
    """`train --model gpt|bigram` still works (with a warning); a directory there gets pointed elsewhere."""
    value = args.legacy_model
    if value is None:
        return
    if value in MODEL_TYPES:
        sys.stderr.write(f"chargpt: warning: train --model is deprecated; use --arch {value}\n")
        args.arch = args.arch or value
        return
    if os.sep in value or "/" in value or Path(value).exists():
        raise ChargptError(
            f"train --model takes an architecture (deprecated: use --arch gpt|bigram), not a model directory; "
            f"to continue training {value} use `chargpt train --resume {value}`, to sample from it "
            f"`chargpt sample --model {value}`"
        )
    raise ChargptError(f"unknown architecture {value!r} for train --model (deprecated); use --arch gpt or bigram")


def _preset_note(args: argparse.Namespace, cfg: TrainConfig) -> str:
    note = _preset_choice(args, cfg)
    return f"{note}; fine-tuning {cfg.init_from}" if cfg.init_from and not args.resume else note


def _preset_choice(args: argparse.Namespace, cfg: TrainConfig) -> str:
    if args.resume:
        return "the saved run's settings"
    if args.preset:
        return f"preset {args.preset} (as asked)"
    from chargpt.config import resolve_preset

    preset = resolve_preset(None, cfg.device)
    why = "no GPU found" if preset == "cpu" else "a GPU was found"
    other = "--preset seed for the 10.8M model" if preset == "cpu" else "--preset cpu for a small model"
    return f"preset {preset} ({why}; {other})"


def _sized(args: argparse.Namespace, overrides: dict[str, Any]) -> Any:
    """The rung chargpt.sizing picks for a --max-time run on a CPU with no shape given (one process only), or None."""
    from chargpt.config import sizing_request

    given = sizing_request(args.preset, args.config, **overrides)
    if given is None or args.nproc is not None or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return None
    from chargpt import cores, sizing

    if not args.quiet:
        print(f"sizing the model for {given['max_time']:g} s: timing a few shapes on this machine ...", flush=True)
    return sizing.for_budget(given["max_time"], given.get("data"), cores.choose_threads(given.get("threads") or None))


def _cmd_train(args: argparse.Namespace, argv: list[str]) -> int:
    from chargpt.checkpoint import resume_config
    from chargpt.config import make_train_config, resume_settings
    from chargpt.train import train

    _legacy_model_flag(args)
    overrides: dict[str, Any] = {f.name: getattr(args, f.name) for f in fields(TrainConfig)}
    if args.resume:
        if args.out is not None and os.path.abspath(args.out) != os.path.abspath(args.resume):
            raise ChargptError("--resume DIR continues in DIR; drop --out or make it the same directory")
        # the launch command plus --resume DIR: settings equal to the saved ones are fine, changes are checked
        given, sources = resume_settings(args.preset, args.config, **{k: v for k, v in overrides.items() if k != "out"})
        cfg = resume_config(args.resume, sources, **given)
        sized = None
    else:
        sized = _sized(args, overrides)
        cfg = make_train_config(args.preset, args.config, sized=sized and sized.rung.settings(), **overrides)
    if args.nproc is not None:
        return _launch_torchrun(args.nproc, cfg, argv)
    _setup_logging(args.quiet)
    note = sized.reason if sized else _preset_note(args, cfg)
    result = train(cfg, resume=bool(args.resume), overwrite=args.overwrite, progress=not args.quiet, preset_note=note)
    if result.rank == 0:
        return _report_train(result, cfg)
    return 0


def _report_train(result: Any, cfg: TrainConfig) -> int:
    """The last lines of a run: how it ended, where the model is, and the exact next command."""
    me = self_command()
    if result.stopped_by in EXIT_SIGNAL:
        _last_line(
            f"interrupted by {result.stopped_by} at step {result.step}; state saved in {result.out}. "
            f"Resume with: {me} train --resume {result.out}"
        )
        return EXIT_SIGNAL[result.stopped_by]
    if result.stopped_by == "finished":
        if cfg.max_time and cfg.n_updates >= TIME_GOVERNED_UPDATES:
            longer = f"--max-time {2 * cfg.max_time:g}"
        else:
            longer = f"--n-updates {2 * result.step}"
            longer += f" (or --max-time {2 * cfg.max_time:g})" if cfg.max_time else ""
        print(
            f"{result.out} is already finished ({result.step} steps, best val loss {result.best_val_loss:.4f}); "
            f"to train it further, give it a larger budget: {me} train --resume {result.out} {longer}"
        )
        return 0
    why = {"max_time": "the time budget", "n_updates": "--n-updates", "pause": "pause_after"}.get(result.stopped_by)
    if result.stopped_by == "patience":
        why = f"--patience: {cfg.patience} evaluations in a row without a better val loss"
    steps = f"{result.step} step" + ("" if result.step == 1 else "s")
    print(f"done: {steps} in {result.elapsed:.0f}s (stopped by {why or result.stopped_by})")
    if result.best_step >= 0:
        print(f"best val loss {result.best_val_loss:.4f} (step {result.best_step}); the model is in {result.out}")
    print(f"next: {me} sample --model {result.out}    (and: {me} info {result.out})")
    return 0


def self_command() -> str:
    """How the user can run chargpt again: `chargpt` when that is on PATH and is this program, else a path."""
    argv0 = Path(sys.argv[0])
    here = argv0 if argv0.name == "chargpt" else Path(sys.executable).with_name("chargpt")
    on_path = shutil.which("chargpt")
    if on_path and here.exists() and Path(on_path).resolve() == here.resolve():
        return "chargpt"
    if not here.exists():
        return f"{sys.executable} -m chargpt"
    try:
        return str(here.absolute().relative_to(Path.cwd()))
    except ValueError:
        return str(here.absolute())


def _launch_torchrun(nproc: int, cfg: TrainConfig, argv: list[str]) -> int:
    """`chargpt train --nproc N ...` = `python -m torch.distributed.run --standalone --nproc_per_node=N -m chargpt
    train ...`, after the checks that would otherwise fail on every rank at once."""
    import os

    import torch

    from chargpt.distributed import check_batch, resolve_device

    if nproc < 1:
        raise ChargptError(f"--nproc must be >= 1, got {nproc}")
    if os.environ.get("WORLD_SIZE") or os.environ.get("RANK"):
        raise ChargptError("--nproc launches torchrun itself; drop --nproc when running under torchrun")
    check_batch(cfg, nproc)
    if resolve_device(cfg.device).type == "cuda" and nproc > torch.cuda.device_count():
        raise ChargptError(
            f"--nproc {nproc} needs {nproc} GPUs and this machine has {torch.cuda.device_count()}; "
            f"use --nproc {torch.cuda.device_count()} or --device cpu"
        )
    rest = [a for i, a in enumerate(argv) if a != "--nproc" and (i == 0 or argv[i - 1] != "--nproc")]
    rest = [a for a in rest if not a.startswith("--nproc=")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    with tempfile.TemporaryDirectory(prefix="chargpt-launch-") as messages:
        env = {**os.environ, MESSAGES_ENV: messages}
        # torchrun in its own session: a Ctrl-C reaches it once (forwarded below), it stops the ranks together
        proc = subprocess.Popen([*cmd, "-m", "chargpt", *rest], start_new_session=True, env=env, stderr=subprocess.PIPE)
        launch = _Launch(proc, messages)
        relay = threading.Thread(target=launch.relay, daemon=True)
        relay.start()
        old = {sig: signal.signal(sig, launch.forward) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        try:
            code = proc.wait()
            relay.join()
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)
        lines = launch.lines()
    if lines:  # one rank's last line, rank 0's first; torchrun's report of the failure is not shown
        sys.stderr.write(lines[0] + "\n")
    elif launch.caught:
        sys.stderr.write(f"interrupted by {launch.caught[0]}\n")
    if launch.caught:
        return EXIT_SIGNAL[launch.caught[0]]
    return EXIT_USAGE if lines and code else code


class _Launch:
    """The --nproc launcher's view of torchrun: relays its stderr (the progress bar) until a rank has said
    its last line or a signal came, forwards signals, and collects the ranks' last lines."""

    def __init__(self, proc: subprocess.Popen, messages: str) -> None:
        self.proc, self.messages = proc, messages
        self.caught: list[str] = []

    def forward(self, signum: int, frame: Any) -> None:
        name = "SIGINT" if signum == signal.SIGINT else "SIGTERM"
        self.caught.append(name)
        self.proc.send_signal(signal.SIGINT if name == "SIGINT" else signal.SIGTERM)

    def relay(self) -> None:
        out = getattr(sys.stderr, "buffer", None)
        while chunk := os.read(self.proc.stderr.fileno(), 65536):
            if self.caught or os.listdir(self.messages) or out is None:
                continue  # what follows is torchrun's account of the stop: the launcher says it in one line
            try:
                out.write(chunk)
                out.flush()
            except OSError:
                pass

    def lines(self) -> list[str]:
        names = sorted(os.listdir(self.messages), key=lambda n: int(n.removeprefix("rank")))
        found = []
        for name in names:
            with open(os.path.join(self.messages, name), encoding="utf-8", errors="replace") as f:
                found.append(f.read().strip())
        return [line for line in found if line]


def _last_line(line: str) -> None:
    """A rank's last line: to stderr, or (under the --nproc launcher) to its file, printed once by the launcher."""
    messages = os.environ.get(MESSAGES_ENV)
    if messages and os.path.isdir(messages):
        rank = os.environ.get("RANK", "0")
        path = os.path.join(messages, f"rank{int(rank) if rank.isdigit() else 0}")
        with open(path, "w", encoding="utf-8") as f:
            f.write(line + "\n")
        return
    sys.stderr.write(line + "\n")


def _cmd_sample(args: argparse.Namespace) -> int:
    from chargpt.generate import SampleConfig, decode_threads

    cfg = SampleConfig(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        num_samples=args.num_samples,
        stop=tuple(args.stop),
        precision=args.precision,
        quantize=args.quantize,
    )
    cfg.validate()
    with _threads(args.threads, decode_threads(args.num_samples) if args.threads is None else None):
        return _sample(args, cfg)


@contextlib.contextmanager
def _threads(requested: int | None, default: int | None = None) -> Iterator[None]:
    """Run a command with `requested` CPU threads (at most the cores), else `default`, else the free cores; the
    process's count is put back after: `main` may be called in-process (tests, notebooks)."""
    import torch

    from chargpt import cores

    if requested is not None and requested < 1:
        raise ChargptError(f"--threads must be >= 1, got {requested}")
    before = torch.get_num_threads()
    torch.set_num_threads(default if default is not None else cores.choose_threads(requested))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _sample(args: argparse.Namespace, cfg: Any) -> int:
    from chargpt import memory
    from chargpt.checkpoint import load_model
    from chargpt.distributed import resolve_device
    from chargpt.generate import generate, stream

    device = resolve_device(args.device)
    model, tokenizer = load_model(args.model, device)
    memory.check(
        memory.inference_bytes(model.config, args.num_samples),
        device,
        f"sampling {args.num_samples} sequence(s) at once",
        "use a smaller --num-samples",
    )
    tokenizer.encode(args.prompt)  # a prompt outside the vocabulary fails before anything is printed
    if sys.stderr.isatty():  # on a terminal, say how it decodes (pipes and logs get the text only)
        from chargpt import quantize as quant

        choice = quant.apply(model, cfg.quantize, device)[1]  # the int8 copy is kept for the generation
        weights = "int8 weights" if choice.name == "int8" else "weights as trained"
        sys.stderr.write(f"decoding with {weights} ({choice.reason})\n")
    out = sys.stdout
    if args.num_samples == 1 and not args.no_stream:
        out.write(args.prompt)
        out.flush()
        for chunk in stream(model, tokenizer, args.prompt, cfg):
            out.write(chunk)
            out.flush()
        out.write("\n")
        return 0
    texts = generate(model, tokenizer, args.prompt, cfg)
    for i, text in enumerate(texts):
        if len(texts) > 1:
            out.write(f"--- sample {i + 1} ---\n")
        out.write(args.prompt + text + "\n")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    _setup_logging(args.quiet)
    with _threads(args.threads):
        return _eval(args)


def _eval(args: argparse.Namespace) -> int:
    import math

    from chargpt.checkpoint import load_model
    from chargpt.distributed import resolve_device
    from chargpt.evaluate import evaluate_file

    model, tokenizer = load_model(args.model, resolve_device(args.device))
    path = Path(args.data)
    if not path.is_file():
        what = "is not a file" if path.exists() else "does not exist"
        raise ChargptError(f"data file {path} {what}; pass a UTF-8 text file")
    if path.stat().st_size == 0:
        raise ChargptError(f"{path} is empty; give it some text to score")
    # streamed through the token cache; bars (tokenizing, scoring) on a terminal only, not in pipes and logs
    result = evaluate_file(
        model, tokenizer, path, token_cache=args.token_cache, progress=not args.quiet, precision=args.precision,
        quantize=args.quantize,
    )  # fmt: skip
    if not all(math.isfinite(result[k]) for k in ("loss", "bits_per_char")):
        raise ChargptError(f"the loss on {path} is {result['loss']}: the model's outputs overflow; it is broken")
    print(json.dumps(result, allow_nan=False))
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from chargpt.checkpoint import describe, is_run_folder, list_runs

    folder = Path(args.dir)
    if folder.is_dir() and not is_run_folder(folder):
        runs = list_runs(folder)
        if runs:
            _print_runs(folder, runs, args.json)
            if args.plot:
                _plot_runs(folder, runs, Path(args.plot))
            return 0
    if args.plot:
        raise ChargptError(f"--plot draws a folder of runs; {folder} is not one (use its loss.png)")
    info = describe(args.dir)
    if args.json:
        print(json.dumps(info, indent=1, ensure_ascii=False))
        return 0
    for line in _info_lines(info):
        print(line)
    return 0


def _plot_runs(folder: Path, runs: list[dict[str, Any]], path: Path) -> None:
    from chargpt.report import METRICS, compare_plot, read_metrics

    # a run folder is read without following links (it may not be the user's own)
    curves = {r["name"]: read_metrics(folder / r["name"], 10**18) for r in runs
              if not (folder / r["name"] / METRICS).is_symlink()}  # fmt: skip
    compare_plot(path, curves)
    print(f"wrote {path}")


def _print_runs(folder: Path, runs: list[dict[str, Any]], as_json: bool) -> None:
    """`chargpt info FOLDER` on a folder of runs: one line each, to compare them."""
    if as_json:
        print(json.dumps({"dir": str(folder), "runs": runs}, indent=1, ensure_ascii=False))
        return
    width = max(3, *(len(r["name"]) for r in runs))
    print(f"{'run':<{width}}  {'shape (LxHxC, context)':<22}  {'steps':>8}  {'time':>7}  {'best val':>8}  at step")
    for r in runs:
        elapsed = f"{r['elapsed']:.0f}s" if r.get("elapsed") is not None else "-"
        steps = r.get("steps", "-")
        line = f"{r['name']:<{width}}  {r.get('shape', '-'):<22}  {steps:>8}  {elapsed:>7}  "
        best = _num(r.get("best_val_loss")) if r.get("best_step") is not None else "-"
        line += f"{best:>8}  {r.get('best_step', '-')}"
        print(line + (f"  ({_one_line(r['problem'], 100)})" if "problem" in r and "shape" not in r else ""))


def _info_lines(info: dict[str, Any]) -> list[str]:
    m, t = info["model"], info["training"]
    shape = f"{m['n_layers']} layers x {m['n_heads']} heads, n_embd {m['n_embd']}, context {m['block_size']}"
    vocab = "".join(info["vocab"]).replace("\n", "\\n")
    lines = [
        f"{info['dir']}: a {m['arch']} model, {info['parameters']:,} parameters"
        + (f" ({shape}, dropout {m['dropout']})" if m["arch"] == "gpt" else ""),
        f"vocabulary: {len(info['vocab'])} characters: {vocab[:80]}{' ...' if len(vocab) > 80 else ''}",
    ]
    if t.get("best_step") is not None:
        lines.append(
            f"saved (best val) model: step {t['best_step']}, val loss {_num(t.get('best_val_loss'))}, "
            f"train loss {_num(t.get('best_train_loss'))}"
        )
    if t.get("steps") is not None:
        lines.append(f"training: {t['steps']} steps in {t['elapsed']:.0f}s, resumable (train_state.pt)")
    origin = t.get("init_from")
    if isinstance(origin, dict):
        where = f"its step {origin.get('step')}, val loss {_num(origin.get('val_loss'))}"
        lines.append(f"fine-tuned from {origin.get('path')} ({where})")
    cfg = t.get("config") or {}
    if cfg:
        settings = ", ".join(f"{k}={v}" for k, v in _user_settings(cfg).items())
        lines.append(f"trained on {cfg.get('data') or 'the built-in Shakespeare plays'} with {settings}")
    lines.append("files: " + ", ".join(f"{name} {_size(size)}" for name, size in info["files"].items()))
    return lines


def _user_settings(cfg: dict[str, Any]) -> dict[str, Any]:
    """A saved run's settings as the user would give them: not the shape (said above), not the paths, not the
    step count that stands for 'the clock decides', not defaults that mean 'none'."""
    skip = {"data", "out", "arch", "block_size", "n_embd", "n_heads", "n_layers", "dropout"}
    shown = {k: v for k, v in cfg.items() if k not in skip and v is not None}
    if shown.get("n_updates") == TIME_GOVERNED_UPDATES:
        del shown["n_updates"]
    return shown


def _num(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "?"


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _cmd_export(args: argparse.Namespace) -> int:
    from chargpt.export import export

    out = export(args.model, args.out, args.format, overwrite=args.overwrite)
    if args.format == "web":
        size = sum(f.stat().st_size for f in out.iterdir())
        print(f"wrote {out}/ ({_size(size)}): open {out / 'index.html'} in a browser, or put the folder on any host")
    else:
        print(f"wrote {out} ({_size(out.stat().st_size)}): run it with onnxruntime (see the README's export section)")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    try:
        from chargpt.serve import ServeConfig, describe, serve
    except ImportError as e:
        raise ChargptError(f"chargpt serve needs FastAPI and uvicorn ({e}); pip install 'chargpt[serve]'") from None
    from chargpt.distributed import resolve_device

    cfg = ServeConfig(
        model=args.model,
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        max_tokens_limit=args.max_tokens_limit,
        max_prompt_chars=args.max_prompt_chars,
        precision=args.precision,
        quantize=args.quantize,
    )
    cfg.validate()

    def ready(url: str, card: Any) -> None:
        print(
            f"serving {describe(card)} at {url}  (playground {url}/ , OpenAI API {url}/v1 ; Ctrl-C stops)", flush=True
        )

    with _threads(args.threads, _serve_threads() if args.threads is None else None):
        serve(cfg, resolve_device(args.device), ready)
    gc.freeze()  # the exit need not walk torch's objects: that takes seconds on a busy machine
    return 0


def _serve_threads() -> int:
    """The server's default: the free cores but one, which its HTTP side needs: with every core in torch's
    matrix products, the event loop that streams the text waits for them (bench_serve, docs/benchmarks.md)."""
    from chargpt import cores

    return max(1, cores.choose_threads(None) - 1)


# torch, and the command's own modules, which import parts of torch (serve's also pydantic's native core)
HEAVY_MODULES = {
    "train": ("torch", "chargpt.train"),
    "sample": ("torch", "chargpt.generate", "chargpt.checkpoint"),
    "eval": ("torch", "chargpt.evaluate", "chargpt.checkpoint"),
    "info": ("torch", "chargpt.checkpoint"),
    "serve": ("torch", "chargpt.serve"),
    "export": ("torch", "chargpt.checkpoint"),
}


def _import_holding_ctrl_c(command: str) -> None:
    """Import the command's heavy modules with Ctrl-C held until they are loaded, then act on it.

    torch's import runs C++ that calls back into Python; a KeyboardInterrupt raised inside such a callback
    cannot unwind through the C++: the process aborted ("terminate called after throwing an instance of
    'pybind11::error_already_set'", exit -6) or killed itself with SIGINT at exit (-2) instead of printing
    "interrupted" and exiting 130 (tests/test_cli_edges.py sends Ctrl-C at points through the import). Held
    for torch's import only: later imports (matplotlib, torch._dynamo) are Python that a KeyboardInterrupt
    unwinds cleanly, and Ctrl-C stays prompt there. A module that cannot be imported is left
    to the command, which says what to install."""

    if threading.current_thread() is not threading.main_thread():  # signals are the main thread's: nothing to hold
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        for name in HEAVY_MODULES.get(command, ()):
            importlib.import_module(name)
    except Exception:  # the command imports it again, and reports it its own way
        pass
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """The `chargpt` command. stderr is made tolerant for its duration: a closed log pipe (`2>&1 | head`) or a
    closed descriptor (`2>&-`) must not end a training run; a closed stdout (`>&-`) discards the output."""
    stderr, stdout = sys.stderr, sys.stdout
    sys.stderr = stderr if isinstance(stderr, _Tolerant) else _Tolerant(stderr)
    if stdout is None:  # started with stdout closed (`>&-`): what it would print goes nowhere
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (closed below)
    try:
        return _main(list(sys.argv[1:] if argv is None else argv))
    finally:
        if sys.stdout is not stdout:
            sys.stdout.close()
        sys.stderr, sys.stdout = stderr, stdout


def _main(argv: list[str]) -> int:
    on_main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if on_main else None
    try:
        return _run(argv)
    finally:  # called in-process (tests, notebooks): the caller's handler back, unless an interrupt set SIG_IGN
        if on_main and previous is not None and isinstance(signal.getsignal(signal.SIGINT), RememberedInterrupt):
            signal.signal(signal.SIGINT, previous)


def _run(argv: list[str]) -> int:
    try:
        parser = build_parser()
        if not argv:  # `chargpt` alone: what it can do, not an error
            parser.print_help()
            return 0
        args, extra = parser.parse_known_args(argv)
        if extra:  # the subcommand's parser reports it, with its own --help and a close match
            sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[args.command]
            sub.error(f"unrecognized arguments: {' '.join(extra)}")
        _check_paths(args)
        if threading.current_thread() is threading.main_thread():  # a Ctrl-C from here on is also remembered
            signal.signal(signal.SIGINT, RememberedInterrupt())
        _import_holding_ctrl_c(args.command)
        commands = {"train": lambda: _cmd_train(args, argv), "sample": lambda: _cmd_sample(args)}
        commands.update(info=lambda: _cmd_info(args), eval=lambda: _cmd_eval(args))
        commands.update(serve=lambda: _cmd_serve(args), export=lambda: _cmd_export(args))
        code = commands[args.command]()
        sys.stdout.flush()  # a full disk or a closed pipe shows here, not as a traceback at exit
        return code
    except ChargptError as e:
        _last_line(f"chargpt: error: {_one_line(str(e))}")
        return EXIT_USAGE
    except KeyboardInterrupt:  # also during start-up (imports, data loading), before training handles signals
        if threading.current_thread() is threading.main_thread():
            # a Ctrl-C still pending (or a second one) must not turn this exit into death by SIGINT
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        _quiet_stdout()
        sys.stderr.write("\ninterrupted\n")
        return EXIT_SIGNAL["SIGINT"]
    except BrokenPipeError:  # `chargpt sample | head`: the reader has all it wants
        _quiet_stdout()
        return 0
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO):
            where = f" {e.filename}" if e.filename else ""
            _last_line(f"chargpt: error: cannot use{where} ({e.strerror or e}); check the path and the machine")
            return EXIT_USAGE
        _quiet_stdout()
        sys.stderr.write(f"chargpt: error: cannot write the output ({e.strerror}); is the disk it goes to full?\n")
        return EXIT_USAGE
    except MemoryError:
        _last_line("chargpt: error: out of memory; ask for less (a smaller model, batch or output)")
        return EXIT_USAGE
    except ImportError as e:  # e.g. torch's libraries cannot be mapped under a small `ulimit -v`
        _last_line(
            f"chargpt: error: cannot load {e.name or 'a module'} ({_one_line(str(e), 200)}); check the "
            f"installation (pip install chargpt) and that the process may use enough memory"
        )
        return EXIT_USAGE
    except RuntimeError as e:
        if "allocate" not in str(e):  # torch's own out-of-memory (e.g. under ulimit -v) is the user's to fix
            raise
        _last_line(f"chargpt: error: out of memory ({_one_line(str(e), 200)}); ask for less, or allow more memory")
        return EXIT_USAGE


PATH_FLAGS = ("resume", "config", "model", "data", "out", "vocab", "token_cache", "dir", "init_from")


def _check_paths(args: argparse.Namespace) -> None:
    """A path flag given as '' or with a NUL byte is a mistake (a shell variable that was empty, a bad paste):
    said at once, rather than read as 'not given' (an empty --resume started a fresh run) or failing deep inside."""
    for name in PATH_FLAGS:
        value = getattr(args, name, None)
        flag = "DIR" if name == "dir" else "--" + name.replace("_", "-")
        if value == "":
            raise ChargptError(f"{flag} got an empty path; give a file or folder (is a shell variable empty?)")
        if isinstance(value, str) and "\0" in value:
            raise ChargptError(f"{flag} contains a NUL byte, which no path can hold; check the value")


class _Tolerant(io.TextIOBase):
    """stderr that stops writing, silently, once its reader has gone (a closed pipe, a closed descriptor): the
    messages and the progress bar are for a person watching; the run's results are in its files."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        if self.stream is not None:
            try:
                self.stream.write(text)
            except (OSError, ValueError):
                self.stream = None
        return len(text)

    def flush(self) -> None:
        if self.stream is not None:
            try:
                self.stream.flush()
            except (OSError, ValueError):
                self.stream = None

    def isatty(self) -> bool:
        try:
            return self.stream is not None and self.stream.isatty()
        except (OSError, ValueError):
            return False

    def fileno(self) -> int:
        if self.stream is None:
            raise OSError(errno.EBADF, "stderr is closed")
        return self.stream.fileno()

    @property
    def buffer(self) -> Any:  # the --nproc launcher relays torchrun's bytes here (and handles a failed write)
        return getattr(self.stream, "buffer", None)

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.stream, "encoding", None) or "utf-8"


def _one_line(message: str, limit: int = 2000) -> str:
    """An error message as one line of sane length, whatever a file or flag put into it."""
    line = " ".join(message.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _quiet_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's final flush of a broken stdout cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


if __name__ == "__main__":
    sys.exit(main())
