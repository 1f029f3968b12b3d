"""What each `chargpt` command does with its typed settings: call the library, print the result.

Each command imports what it runs inside its function: `chargpt --help`, a bad flag and a one-line error answer
without importing torch (seconds on a busy machine)."""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import math
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chargpt.cli.launch import last_line, launch_torchrun, self_command
from chargpt.cli.options import (
    EvalCommand,
    ExportCommand,
    InfoCommand,
    SampleRuntime,
    SampleText,
    ServeRuntime,
    TrainCommand,
    from_args,
)
from chargpt.config import MODEL_TYPES, OLD_TIME_GOVERNED_UPDATES, TrainConfig
from chargpt.errors import EXIT_SIGNAL, ChargptError, one_line, visible, visible_json
from chargpt.runtime import SampleConfig, ServeConfig

if TYPE_CHECKING:
    from chargpt.data.tokenizer import CharTokenizer
    from chargpt.model import LanguageModel


def setup_logging(quiet: bool) -> None:
    from tqdm import tqdm

    class TqdmHandler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            tqdm.write(self.format(record), file=sys.stderr)

    logger = logging.getLogger("chargpt")
    logger.handlers[:] = [TqdmHandler()]
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    logger.propagate = False


def _legacy_model_flag(cmd: TrainCommand, given: dict[str, Any]) -> None:
    """`train --model gpt|bigram` still works (with a warning); a directory there gets pointed elsewhere."""
    value = cmd.legacy_model
    if value is None:
        return
    if value in MODEL_TYPES:
        sys.stderr.write(f"chargpt: warning: train --model is deprecated; use --arch {value}\n")
        given["arch"] = given.get("arch") or value
        return
    if os.sep in value or "/" in value or Path(value).exists():
        raise ChargptError(
            f"train --model takes an architecture (deprecated: use --arch gpt|bigram), not a model directory; "
            f"to continue training {value} use `chargpt train --resume {value}`, to sample from it "
            f"`chargpt sample --model {value}`"
        )
    raise ChargptError(f"unknown architecture {value!r} for train --model (deprecated); use --arch gpt or bigram")


def train_settings(cmd: TrainCommand, given: dict[str, Any]) -> dict[str, Any]:
    """What `chargpt train`'s flags ask the planner for (chargpt.training.planner.plan's arguments); `given`: the
    TrainConfig settings given as flags (None: not given)."""
    return {
        "preset": cmd.preset, "config": cmd.config, "resume": cmd.resume, "overwrite": cmd.overwrite,
        "add_time": cmd.add_time, "distributed": cmd.nproc is not None, **given,
    }  # fmt: skip


def cmd_train(cmd: TrainCommand, given: dict[str, Any], argv: list[str]) -> int:
    from chargpt.training.loop import train
    from chargpt.training.planner import plan

    _legacy_model_flag(cmd, given)
    planned = plan(**train_settings(cmd, given), on_sizing=None if cmd.quiet else lambda line: print(line, flush=True))
    if cmd.nproc is not None:
        return launch_torchrun(cmd.nproc, planned.config, argv)
    setup_logging(cmd.quiet)
    result = train(
        planned.config, resume=planned.resume, overwrite=cmd.overwrite, progress=not cmd.quiet,
        preset_note=planned.note, sources=planned.sources,
    )  # fmt: skip
    if result.rank == 0:
        return _report_train(result, planned.config)
    return 0


def _report_train(result: Any, cfg: TrainConfig) -> int:
    """The last lines of a run: how it ended, where the model is, and the exact next command."""
    me = self_command()
    if result.stopped_by in EXIT_SIGNAL:
        last_line(
            f"interrupted by {result.stopped_by} at step {result.step}; state saved in {result.out}. "
            f"Resume with: {me} train --resume {result.out}"
        )
        return EXIT_SIGNAL[result.stopped_by]
    if result.stopped_by == "finished":
        # the limit that ended it grows; where a time budget may end it too, both (following advice must train)
        steps_done = result.step >= cfg.step_limit
        longer = " ".join(
            ([f"--n-updates {2 * result.step}"] if steps_done else [])
            + ([f"--max-time {math.ceil(2 * max(cfg.max_time, result.elapsed))}"] if cfg.max_time else [])
        )
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


def cmd_sample(run: SampleRuntime, text: SampleText, cfg: SampleConfig) -> int:
    from chargpt.inference.generate import decode_threads

    cfg.validate()
    with _threads(run.threads, decode_threads(cfg.num_samples) if run.threads is None else None):
        return _sample(run, text.prompt, text.no_stream, cfg)


@contextlib.contextmanager
def _threads(requested: int | None, default: int | None = None) -> Iterator[None]:
    """Run a command with `requested` CPU threads (at most the cores), else `default`, else the free cores; the
    process's count is put back after: `main` may be called in-process (tests, notebooks)."""
    import torch

    from chargpt.machine import cores

    _check_threads(requested)
    before = torch.get_num_threads()
    torch.set_num_threads(default if default is not None else cores.choose_threads(requested))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _check_threads(requested: int | None) -> None:
    if requested is not None and requested < 1:
        raise ChargptError(f"--threads must be >= 1, got {requested}")


def _sample(run: SampleRuntime, prompt: str, no_stream: bool, cfg: SampleConfig) -> int:
    from chargpt.inference.generate import generate, stream
    from chargpt.machine import memory
    from chargpt.machine.devices import resolve_device
    from chargpt.storage.checkpoint import load_model

    device = resolve_device(run.device)
    model, tokenizer = load_model(run.model, device)
    memory.check(
        memory.inference_bytes(model.config, cfg.num_samples),
        device,
        f"sampling {cfg.num_samples} sequence(s) at once",
        "use a smaller --num-samples",
    )
    tokenizer.encode(prompt)  # a prompt outside the vocabulary fails before anything is printed
    if sys.stderr.isatty():  # on a terminal, say how it decodes (pipes and logs get the text only)
        from chargpt.inference import quantize as quant

        choice = quant.apply(model, cfg.quantize, device)[1]  # the int8 copy is kept for the generation
        weights = "int8 weights" if choice.name == "int8" else "weights as trained"
        sys.stderr.write(f"decoding with {weights} ({choice.reason})\n")
    out = sys.stdout
    if cfg.num_samples == 1 and not no_stream:
        out.write(prompt)
        out.flush()
        for chunk in stream(model, tokenizer, prompt, cfg):
            out.write(chunk)
            out.flush()
        out.write("\n")
        return 0
    texts = generate(model, tokenizer, prompt, cfg)
    for i, text in enumerate(texts):
        if len(texts) > 1:
            out.write(f"--- sample {i + 1} ---\n")
        out.write(prompt + text + "\n")
    return 0


def cmd_eval(cmd: EvalCommand) -> int:
    """Its inputs are checked first: a bad model or file is answered at once, before the free cores are watched."""
    from chargpt.machine.devices import resolve_device
    from chargpt.storage.checkpoint import load_model

    setup_logging(cmd.quiet)
    _check_threads(cmd.threads)
    model, tokenizer = load_model(cmd.model, resolve_device(cmd.device))
    path = Path(cmd.data)
    if not path.is_file():
        what = "is not a file" if path.exists() else "does not exist"
        raise ChargptError(f"data file {path} {what}; pass a UTF-8 text file")
    if path.stat().st_size == 0:
        raise ChargptError(f"{path} is empty; give it some text to score")
    with _threads(cmd.threads):
        return _eval(cmd, model, tokenizer, path)


def _eval(cmd: EvalCommand, model: LanguageModel, tokenizer: CharTokenizer, path: Path) -> int:
    from chargpt.inference.evaluate import evaluate_file

    # streamed through the token cache; bars (tokenizing, scoring) on a terminal only, not in pipes and logs
    result = evaluate_file(
        model, tokenizer, path, token_cache=cmd.token_cache, progress=not cmd.quiet, precision=cmd.precision,
        quantize=cmd.quantize,
    )  # fmt: skip
    if not all(math.isfinite(result[k]) for k in ("loss", "bits_per_char")):
        raise ChargptError(f"the loss on {path} is {result['loss']}: the model's outputs overflow; it is broken")
    if cmd.json or not sys.stdout.isatty():  # pipes, files and scripts get one JSON object
        print(json.dumps(result, allow_nan=False))
        return 0
    print(
        f"{path}: loss {result['loss']:.4f} nats per character ({result['bits_per_char']:.3f} bits, perplexity "
        f"{math.exp(result['loss']):.2f}) over {result['chars']:,} predicted characters, {result['precision']}"
    )
    if "loss_unquantized" in result:
        print(f"with int8 weights; the model as trained: loss {result['loss_unquantized']:.4f}")
    return 0


def cmd_info(cmd: InfoCommand) -> int:
    from chargpt.storage.runs import describe, is_run_folder, list_runs

    if cmd.machine:
        if cmd.dir is not None or cmd.plot:
            raise ChargptError("info --machine describes this machine: give it no DIR and no --plot")
        from chargpt.cli import machine

        report = machine.describe()
        print(json.dumps(report, indent=1) if cmd.json else "\n".join(machine.lines(report)))
        return 0
    if cmd.dir is None:
        raise ChargptError("info needs a model directory (chargpt info out/demo), or --machine for this machine")
    folder = Path(cmd.dir)
    if folder.is_dir() and not is_run_folder(folder):
        runs = list_runs(folder)
        if runs:
            _print_runs(folder, runs, cmd.json)
            if cmd.plot:
                _plot_runs(folder, runs, Path(cmd.plot))
            return 0
    if cmd.plot:
        raise ChargptError(f"--plot draws a folder of runs; {folder} is not one (use its loss.png)")
    info = describe(cmd.dir)
    info["last_sample"] = _last_sample(folder)
    if cmd.json:  # what a model folder holds is printed with its control characters made visible
        print(visible_json(json.dumps(info, indent=1, ensure_ascii=False)))
        return 0
    for line in _info_lines(info):
        print(visible(line))
    return 0


def _last_sample(folder: Path) -> dict[str, Any] | None:
    """The sample the run wrote at its latest evaluation (metrics.jsonl; never through a link)."""
    from chargpt.training import report, samples

    if (folder / report.METRICS).is_symlink():
        return None
    row = samples.last(report.read_metrics(folder, 10**18))
    return None if row is None else {"step": row["step"], "text": row.get("prompt", "") + row["sample"]}


def _plot_runs(folder: Path, runs: list[dict[str, Any]], path: Path) -> None:
    from chargpt.training.report import METRICS, compare_plot, read_metrics

    # a run folder is read without following links (it may not be the user's own)
    curves = {r["name"]: read_metrics(folder / r["name"], 10**18) for r in runs
              if not (folder / r["name"] / METRICS).is_symlink()}  # fmt: skip
    compare_plot(path, curves)
    print(f"wrote {path}")


def _print_runs(folder: Path, runs: list[dict[str, Any]], as_json: bool) -> None:
    """`chargpt info FOLDER` on a folder of runs: one line each, to compare them."""
    if as_json:
        print(visible_json(json.dumps({"dir": str(folder), "runs": runs}, indent=1, ensure_ascii=False)))
        return
    width = max(3, *(len(r["name"]) for r in runs))
    print(f"{'run':<{width}}  {'shape (LxHxC, context)':<22}  {'steps':>8}  {'time':>7}  {'best val':>8}  at step")
    for r in runs:
        elapsed = f"{r['elapsed']:.0f}s" if r.get("elapsed") is not None else "-"
        steps = r.get("steps", "-")
        line = f"{r['name']:<{width}}  {r.get('shape', '-'):<22}  {steps:>8}  {elapsed:>7}  "
        best = _num(r.get("best_val_loss")) if r.get("best_step") is not None else "-"
        line += f"{best:>8}  {r.get('best_step', '-')}"
        print(visible(line) + (f"  ({one_line(r['problem'], 100)})" if "problem" in r and "shape" not in r else ""))


def _info_lines(info: dict[str, Any]) -> list[str]:
    m, t = info["model"], info["training"]
    shape = f"{m['n_layers']} layers x {m['n_heads']} heads, n_embd {m['n_embd']}, context {m['block_size']}"
    vocab = "".join(info["vocab"]).replace("\n", "\\n")
    lines = [
        f"{info['dir']}: a {m['arch']} model, {info['parameters']:,} parameters"
        + (f" ({shape}, dropout {m['dropout']})" if m["arch"] != "bigram" else ""),
        f"vocabulary: {len(info['vocab'])} characters: {vocab[:80]}{' ...' if len(vocab) > 80 else ''}",
    ]
    if t.get("best_step") is not None:
        line = f"saved (best val) model: step {t['best_step']}, val loss {_num(t.get('best_val_loss'))}"
        line += f", train loss {_num(t['best_train_loss'])}" if t.get("best_train_loss") is not None else ""
        lines.append(line + (f"; weights: {one_line(t['weights'], 120)}" if t.get("weights") else ""))
    if t.get("steps") is not None:
        lines.append(f"training: {t['steps']} steps in {t['elapsed']:.0f}s, resumable (train_state.pt)")
    if t.get("saved") is False:
        lines.append(
            f"no model saved yet: the run stopped before its first evaluation; continue it with "
            f"`chargpt train --resume {info['dir']}`"
        )
    origin = t.get("init_from")
    if isinstance(origin, dict):
        where = f"its step {origin.get('step')}, val loss {_num(origin.get('val_loss'))}"
        lines.append(f"fine-tuned from {origin.get('path')} ({where})")
    cfg = t.get("config") or {}
    if cfg:
        settings = ", ".join(f"{k}={v}" for k, v in _user_settings(cfg).items())
        lines.append(f"trained on {cfg.get('data') or 'the built-in Shakespeare plays'} with {settings}")
    sources = t.get("settings_from")
    if sources:
        by_source: dict[str, list[str]] = {}
        for key, source in sources.items():
            by_source.setdefault(str(source), []).append(str(key))
        lines.append("settings from: " + "; ".join(f"{s} ({', '.join(keys)})" for s, keys in by_source.items()))
    lines.append("files: " + ", ".join(f"{name} {_size(size)}" for name, size in info["files"].items()))
    sample = info.get("last_sample")
    if sample:
        lines.append(f"its sample at step {sample['step']:,} (samples.txt has one per evaluation):")
        lines += ["  | " + line for line in sample["text"].rstrip("\n").split("\n")]
    return lines


def _user_settings(cfg: dict[str, Any]) -> dict[str, Any]:
    """A saved run's settings as the user would give them: not the shape (said above), not the paths, not the
    step count that stands for 'the clock decides', not defaults that mean 'none'."""
    skip = {"data", "out", "arch", "block_size", "n_embd", "n_heads", "n_layers", "dropout"}
    shown = {k: v for k, v in cfg.items() if k not in skip and v is not None}
    if shown.get("n_updates") == OLD_TIME_GOVERNED_UPDATES:  # a run saved when this stood for "the clock decides"
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


def cmd_export(cmd: ExportCommand) -> int:
    from chargpt.inference.export import export

    out = export(cmd.model, cmd.out, cmd.format, overwrite=cmd.overwrite)
    if cmd.format == "web":
        size = sum(f.stat().st_size for f in out.iterdir())
        print(f"wrote {out}/ ({_size(size)}): open {out / 'index.html'} in a browser, or put the folder on any host")
    else:
        print(f"wrote {out} ({_size(out.stat().st_size)}): run it with onnxruntime (see the README's export section)")
    return 0


def cmd_serve(cfg: ServeConfig, run: ServeRuntime) -> int:
    try:
        from chargpt.serve import describe, serve
    except ImportError as e:
        raise ChargptError(f"chargpt serve needs FastAPI and uvicorn ({e}); pip install 'chargpt[serve]'") from None
    from chargpt.machine.devices import resolve_device

    cfg.validate()

    def ready(url: str, card: Any) -> None:
        print(
            f"serving {describe(card)} at {url}  (playground {url}/ , OpenAI API {url}/v1 ; Ctrl-C stops)", flush=True
        )

    with _threads(run.threads, _serve_threads() if run.threads is None else None):
        serve(cfg, resolve_device(run.device), ready)
    gc.freeze()  # the exit need not walk torch's objects: that takes seconds on a busy machine
    return 0


def _serve_threads() -> int:
    """The server's default: the free cores but one, which its HTTP side needs: with every core in torch's
    matrix products, the event loop that streams the text waits for them (bench_serve, docs/benchmarks.md)."""
    from chargpt.machine import cores

    return max(1, cores.choose_threads(None) - 1)


COMMANDS: dict[str, Callable[..., int]] = {
    "train": cmd_train,
    "sample": cmd_sample,
    "eval": cmd_eval,
    "info": cmd_info,
    "serve": cmd_serve,
    "export": cmd_export,
}


def run(args: argparse.Namespace, argv: list[str]) -> int:
    """The command args.command, given its settings as typed objects (typed_settings)."""
    return COMMANDS[args.command](*typed_settings(args, argv))


def typed_settings(args: argparse.Namespace, argv: list[str]) -> list[Any]:
    """What a command is handed: the dataclasses its flags were made from (chargpt.cli.options.add_fields records
    them), filled from the parsed flags; train also gets the TrainConfig settings given (None: not given) and
    the command line, which --nproc hands on to torchrun."""
    typed: list[Any] = [from_args(cls, args) for cls in args._settings]
    if args.command == "train":
        typed += [{f.name: getattr(args, f.name) for f in fields(TrainConfig)}, argv]
    return typed
