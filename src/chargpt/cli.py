"""`chargpt train | sample | eval`: parses flags, calls the library, prints. Nothing else lives here."""

from __future__ import annotations

import argparse
import gc
import json
import logging
import signal
import subprocess
import sys
from dataclasses import fields
from typing import Any

from chargpt.config import PRESETS, TrainConfig
from chargpt.errors import ChargptError

EXIT_USAGE = 2
EXIT_SIGNAL = {"SIGINT": 130, "SIGTERM": 143}
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
    "checkpoint_interval": "steps between saves of the resumable state",
    "max_time": "seconds of training; the LR schedule ends with it; 0 = no limit",
    "device": "auto (cuda > mps > cpu), cpu, cuda, cuda:N, mps",
    "compile": "torch.compile the model",
}


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
            if f.name in PRESETS["cpu"]:
                default = f"seed preset {f.default!r}, cpu preset {PRESETS['cpu'][f.name]!r}"
            text = f"{FLAG_HELP[f.name]} ({default})" if f.name in FLAG_HELP else f"({default})"
            p.add_argument(flag, type=kind, default=None, metavar=f.name.upper(), help=text)
    p.add_argument("--config", help="TOML file of settings (keys = flag names with underscores); flags override it")
    p.add_argument(
        "--preset", choices=sorted(PRESETS), help="cpu: tuned for a CPU (default there); seed: the 10.8M model"
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

    e = sub.add_parser("eval", help="score a model on a text file (JSON: loss, bits_per_char, chars)")
    e.add_argument("--model", required=True, metavar="DIR", help="model directory")
    e.add_argument("--data", required=True, metavar="FILE", help="UTF-8 text file")
    e.add_argument("--device", default="auto")

    v = sub.add_parser("serve", help="an OpenAI-compatible HTTP API and a browser playground for a model")
    v.add_argument("--model", required=True, metavar="DIR", help="model directory")
    v.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (this machine only); 0.0.0.0: all")
    v.add_argument("--port", type=int, default=8000, help="0 = any free port (default 8000)")
    v.add_argument("--api-key", metavar="KEY", help="require 'Authorization: Bearer KEY' on every /v1/ request")
    v.add_argument("--max-batch", type=int, default=32, metavar="N", help="sequences decoded together (default 32)")
    v.add_argument("--max-queue", type=int, default=64, metavar="N", help="requests that may wait (default 64)")
    v.add_argument("--max-tokens-limit", type=int, default=4096, metavar="N", help="max_tokens cap (default 4096)")
    v.add_argument("--max-prompt-chars", type=int, default=65536, metavar="N", help="prompt cap (default 65536)")
    v.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:N, mps")
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
    from chargpt.train import make_train_config, resume_config, train

    overrides: dict[str, Any] = {f.name: getattr(args, f.name) for f in fields(TrainConfig)}
    if args.resume:
        if args.out is not None and args.out != args.resume:
            raise ChargptError("--resume DIR continues in DIR; drop --out or make it the same directory")
        if args.config or args.preset:
            raise ChargptError("--resume takes the saved run's settings; give single flags to change them")
        cfg = resume_config(args.resume, **{k: v for k, v in overrides.items() if k != "out"})
    else:
        cfg = make_train_config(args.preset, args.config, **overrides)
    if args.nproc is not None:
        return _launch_torchrun(args.nproc, cfg, argv)
    _setup_logging(args.quiet)
    result = train(cfg, resume=bool(args.resume), overwrite=args.overwrite, progress=not args.quiet)
    if result.rank == 0:
        if result.stopped_by in EXIT_SIGNAL:
            print(
                f"interrupted by {result.stopped_by} at step {result.step}; state saved in {result.out}. "
                f"Resume with: chargpt train --resume {result.out}",
                file=sys.stderr,
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

    from chargpt.train import check_batch, resolve_device

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
    # torchrun in its own session: a Ctrl-C reaches it once (forwarded below), it stops the ranks together
    proc = subprocess.Popen([*cmd, "-m", "chargpt", *rest], start_new_session=True)
    caught: list[str] = []

    def forward(signum: int, frame: Any) -> None:
        name = "SIGINT" if signum == signal.SIGINT else "SIGTERM"
        caught.append(name)
        proc.send_signal(signal.SIGINT if name == "SIGINT" else signal.SIGTERM)

    old = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        code = proc.wait()
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    return EXIT_SIGNAL[caught[0]] if caught else code


def _cmd_sample(args: argparse.Namespace) -> int:
    from chargpt.checkpoint import load_model
    from chargpt.generate import SampleConfig, generate, stream
    from chargpt.train import resolve_device

    cfg = SampleConfig(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        num_samples=args.num_samples,
        stop=tuple(args.stop),
    )
    cfg.validate()
    model, tokenizer = load_model(args.model, resolve_device(args.device))
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
    from pathlib import Path

    from chargpt.checkpoint import load_model
    from chargpt.data import read_text_file
    from chargpt.evaluate import evaluate
    from chargpt.train import resolve_device

    model, tokenizer = load_model(args.model, resolve_device(args.device))
    path = Path(args.data)
    if not path.is_file():
        what = "is not a file" if path.exists() else "does not exist"
        raise ChargptError(f"data file {path} {what}; pass a UTF-8 text file")
    text = read_text_file(path)
    if not text:
        raise ChargptError(f"{path} is empty; give it some text to score")
    print(json.dumps(evaluate(model, tokenizer, text)))
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    try:
        from chargpt.serve import ServeConfig, describe, serve
    except ImportError as e:
        raise ChargptError(f"chargpt serve needs FastAPI and uvicorn ({e}); pip install 'chargpt[serve]'") from None
    from chargpt.train import resolve_device

    cfg = ServeConfig(
        model=args.model,
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        max_tokens_limit=args.max_tokens_limit,
        max_prompt_chars=args.max_prompt_chars,
    )
    cfg.validate()

    def ready(url: str, card: Any) -> None:
        print(
            f"serving {describe(card)} at {url}  (playground {url}/ , OpenAI API {url}/v1 ; Ctrl-C stops)", flush=True
        )

    serve(cfg, resolve_device(args.device), ready)
    gc.freeze()  # the exit need not walk torch's objects: that takes seconds on a busy machine
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        if args.command == "train":
            return _cmd_train(args, argv)
        if args.command == "sample":
            return _cmd_sample(args)
        if args.command == "serve":
            return _cmd_serve(args)
        return _cmd_eval(args)
    except ChargptError as e:
        sys.stderr.write(f"chargpt: error: {e}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        sys.stderr.write("\ninterrupted\n")
        return EXIT_SIGNAL["SIGINT"]
    except BrokenPipeError:  # `chargpt sample | head`
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        return 0


if __name__ == "__main__":
    sys.exit(main())
