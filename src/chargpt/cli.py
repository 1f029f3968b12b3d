"""`chargpt train | sample | eval`: parses flags, calls the library, prints. Nothing else lives here."""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import fields
from typing import Any

from chargpt.config import PRECISIONS, PRESETS, TrainConfig
from chargpt.errors import ChargptError

EXIT_USAGE = 2
EXIT_SIGNAL = {"SIGINT": 130, "SIGTERM": 143}
# set by the --nproc launcher: each rank writes its last line (an error, "interrupted ...") to DIR/rankN,
# and the launcher prints one of them once, instead of every rank's copy and torchrun's traceback
MESSAGES_ENV = "CHARGPT_LAUNCHER_MESSAGES"
FLAG_HELP = {
    "data": "UTF-8 text file or folder of .txt files; none = the complete Shakespeare plays",
    "out": "model directory to write",
    "val_fraction": "the last part of the text held out for validation",
    "model": "gpt, or bigram (the lecture's baseline)",
    "n_updates": "optimizer steps",
    "batch_size": "sequences per step (global, across all processes)",
    "gradient_accumulation_steps": "micro-batches per step; same global batch, less memory",
    "learning_rate": "peak AdamW learning rate",
    "min_lr_ratio": "cosine decay ends at learning_rate x this",
    "warmup_updates": "linear warm-up steps",
    "weight_decay": "AdamW weight decay on weight matrices only",
    "grad_clip": "max gradient norm; 0 = off",
    "eval_interval": "steps between evaluations (metrics, best-val checkpoint, plot)",
    "eval_iters": "batches per loss estimate",
    "checkpoint_interval": "steps between saves of the resumable state; 0 = by time only",
    "checkpoint_seconds": "also save the resumable state every this many seconds of training; 0 = off",
    "max_time": "seconds of training; the LR schedule ends with it; 0 = no limit",
    "device": "auto (cuda > mps > cpu), cpu, cuda, cuda:N, mps",
    "compile": "torch.compile the model",
    "precision": "auto (bf16 autocast where this machine runs it faster, else fp32), fp32, bf16",
}
PRECISION_HELP = "auto (default: what is faster on this machine, per kind of work), fp32, or bf16"


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        sys.exit(EXIT_USAGE)


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field (`--n-embd` <-> n_embd); default None = not given."""
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        else:
            kind = {"int": int, "float": float}.get(f.type, str)
            default = f"default {f.default!r}"
            if f.name in PRESETS["cpu"] or f.name in PRESETS["gpu"]:
                shown = [f"seed preset {f.default!r}"] + [
                    f"{name} preset {PRESETS[name][f.name]!r}" for name in ("cpu", "gpu") if f.name in PRESETS[name]
                ]
                default = ", ".join(shown)
            text = f"{FLAG_HELP[f.name]} ({default})" if f.name in FLAG_HELP else f"({default})"
            p.add_argument(flag, type=kind, default=None, metavar=f.name.upper(), help=text)
    p.add_argument("--config", help="TOML file of settings (keys = flag names with underscores); flags override it")
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="cpu: tuned for a CPU (default there); gpu: the 10.8M model tuned for a GPU (default on CUDA); "
        "seed: the 10.8M model as in the lecture",
    )
    p.add_argument("--resume", metavar="DIR", help="continue the run saved in this model directory")
    p.add_argument("--overwrite", action="store_true", help="replace a model already in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar or eval lines")
    p.add_argument("--nproc", type=int, help="launch N processes with torchrun (DDP) on this machine")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="chargpt", description="Character-level GPT: train, sample, evaluate.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser("train", help="train a model (default data: the complete Shakespeare plays)")
    _add_train_flags(t)

    s = sub.add_parser("sample", help="generate text from a trained model")
    s.add_argument("--model", required=True, metavar="DIR", help="model directory")
    s.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    s.add_argument("--max-new-tokens", type=int, default=500)
    s.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    s.add_argument("--top-k", type=int, default=None)
    s.add_argument("--top-p", type=float, default=None, help="nucleus sampling, in (0, 1]")
    s.add_argument("--seed", type=int, default=None, help="same seed, same text")
    s.add_argument("--num-samples", type=int, default=1, help="samples generated together as one batch")
    s.add_argument("--stop", action="append", default=[], help="end a sample at this string (repeatable)")
    s.add_argument("--no-stream", action="store_true", help="print when done instead of as generated")
    s.add_argument("--device", default="auto")
    s.add_argument("--precision", default="auto", choices=PRECISIONS, help=PRECISION_HELP)

    e = sub.add_parser("eval", help="score a model on a text file (JSON: loss, bits_per_char, chars)")
    e.add_argument("--model", required=True, metavar="DIR", help="model directory")
    e.add_argument("--data", required=True, metavar="FILE", help="UTF-8 text file")
    e.add_argument("--device", default="auto")
    e.add_argument("--precision", default="auto", choices=PRECISIONS, help=PRECISION_HELP)
    return p


def _setup_logging(quiet: bool) -> None:
    from tqdm import tqdm

    class TqdmHandler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            tqdm.write(self.format(record), file=sys.stderr)

    logger = logging.getLogger("chargpt")
    logger.handlers[:] = [TqdmHandler()]
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    logger.propagate = False


def _cmd_train(args: argparse.Namespace, argv: list[str]) -> int:
    from chargpt.checkpoint import resume_config
    from chargpt.config import make_train_config, resume_settings
    from chargpt.train import train

    overrides: dict[str, Any] = {f.name: getattr(args, f.name) for f in fields(TrainConfig)}
    if args.resume:
        if args.out is not None and os.path.abspath(args.out) != os.path.abspath(args.resume):
            raise ChargptError("--resume DIR continues in DIR; drop --out or make it the same directory")
        # the launch command plus --resume DIR: settings equal to the saved ones are fine, changes are checked
        given, sources = resume_settings(args.preset, args.config, **{k: v for k, v in overrides.items() if k != "out"})
        cfg = resume_config(args.resume, sources, **given)
    else:
        cfg = make_train_config(args.preset, args.config, **overrides)
    if args.nproc is not None:
        return _launch_torchrun(args.nproc, cfg, argv)
    _setup_logging(args.quiet)
    result = train(cfg, resume=bool(args.resume), overwrite=args.overwrite, progress=not args.quiet)
    if result.rank == 0:
        if result.stopped_by in EXIT_SIGNAL:
            _last_line(
                f"interrupted by {result.stopped_by} at step {result.step}; state saved in {result.out}. "
                f"Resume with: chargpt train --resume {result.out}"
            )
            return EXIT_SIGNAL[result.stopped_by]
        print(
            f"done: {result.step} steps in {result.elapsed:.0f}s (stopped by {result.stopped_by}), "
            f"best val loss {result.best_val_loss:.4f}, model in {result.out}"
        )
        print(f"sample with: chargpt sample --model {result.out}")
    return 0


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
    from chargpt import memory
    from chargpt.checkpoint import load_model
    from chargpt.distributed import resolve_device
    from chargpt.generate import SampleConfig, generate, stream

    cfg = SampleConfig(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        num_samples=args.num_samples,
        stop=tuple(args.stop),
        precision=args.precision,
    )
    cfg.validate()
    device = resolve_device(args.device)
    model, tokenizer = load_model(args.model, device)
    memory.check(
        memory.inference_bytes(model.config, args.num_samples),
        device,
        f"sampling {args.num_samples} sequence(s) at once",
        "use a smaller --num-samples",
    )
    tokenizer.encode(args.prompt)  # a prompt outside the vocabulary fails before anything is printed
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
    import math
    from pathlib import Path

    from chargpt.checkpoint import load_model
    from chargpt.data import read_text_file
    from chargpt.distributed import resolve_device
    from chargpt.evaluate import evaluate

    model, tokenizer = load_model(args.model, resolve_device(args.device))
    path = Path(args.data)
    if not path.is_file():
        what = "is not a file" if path.exists() else "does not exist"
        raise ChargptError(f"data file {path} {what}; pass a UTF-8 text file")
    text = read_text_file(path)
    if not text:
        raise ChargptError(f"{path} is empty; give it some text to score")
    result = evaluate(model, tokenizer, text, precision=args.precision)
    if not all(map(math.isfinite, result.values())):
        raise ChargptError(f"the loss on {path} is {result['loss']}: the model's outputs overflow; it is broken")
    print(json.dumps(result, allow_nan=False))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
        if args.command == "train":
            code = _cmd_train(args, argv)
        elif args.command == "sample":
            code = _cmd_sample(args)
        else:
            code = _cmd_eval(args)
        sys.stdout.flush()  # a full disk or a closed pipe shows here, not as a traceback at exit
        return code
    except ChargptError as e:
        _last_line(f"chargpt: error: {_one_line(str(e))}")
        return EXIT_USAGE
    except KeyboardInterrupt:  # also during start-up (imports, data loading), before training handles signals
        _quiet_stdout()
        sys.stderr.write("\ninterrupted\n")
        return EXIT_SIGNAL["SIGINT"]
    except BrokenPipeError:  # `chargpt sample | head`: the reader has all it wants
        _quiet_stdout()
        return 0
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO):
            raise
        _quiet_stdout()
        sys.stderr.write(f"chargpt: error: cannot write the output ({e.strerror}); is the disk it goes to full?\n")
        return EXIT_USAGE


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
