"""The `chargpt` command's flags and help: one parser per command, and the checks of what was parsed."""

from __future__ import annotations

import argparse
import difflib
import os
import sys
from dataclasses import fields
from typing import Any

from chargpt import __version__
from chargpt.cli.options import (
    TYPES,
    EvalCommand,
    ExportCommand,
    InfoCommand,
    SampleRuntime,
    SampleText,
    ServeRuntime,
    TrainCommand,
    add_fields,
)
from chargpt.config import (
    PRESETS,
    TRAIN_FIELDS,
    TrainConfig,
    check_path,
)
from chargpt.errors import EXIT_USAGE
from chargpt.runtime import SampleConfig, ServeConfig
from chargpt.training import sizing

# nanoGPT's (train.py's) names for what chargpt's train flags set; its names that are chargpt's too (--dropout,
# --compile, --device) just work. Said in one line, never taken as abbreviations.
NANOGPT_NAMES = {
    "--max_iters": "--n-updates",
    "--lr": "--learning-rate",
    "--learning_rate": "--learning-rate",
    "--n_layer": "--n-layers",
    "--n_head": "--n-heads",
    "--n_embd": "--n-embd",
    "--batch_size": "--batch-size",
    "--block_size": "--block-size",
    "--eval_interval": "--eval-interval",
    "--eval_iters": "--eval-iters",
    "--out_dir": "--out",
    "--init_from": "--resume DIR to continue a run (init_from=resume), --init-from DIR to fine-tune a model",
    "--warmup_iters": "--warmup-updates",
    "--lr_decay_iters": "--n-updates (the learning rate decays over the run's steps or --max-time)",
    "--min_lr": "--min-lr-ratio (the end of the decay as a fraction of --learning-rate)",
    "--weight_decay": "--weight-decay",
    "--grad_clip": "--grad-clip",
    "--gradient_accumulation_steps": "--gradient-accumulation-steps",
    "--dtype": "--precision",
    "--dataset": "--data",
    "--log_interval": "--log-interval",
}
GROUPS = ("settings", "data", "model", "optimisation", "evaluation and checkpoints", "hardware")  # train --help


TRAIN_EXAMPLES = """examples:
  chargpt train --out out/demo --max-time 150          # 2.5 minutes on the built-in Shakespeare
  chargpt train --data my.txt --out out/mine --preset seed --n-updates 2000
  chargpt train --resume out/demo --add-time 150       # train a run on, 150 s more
  chargpt train --resume out/demo --max-time 300       # the same: --max-time is the run's total
from nanoGPT: --max_iters is --n-updates, --lr --learning-rate, --n_layer/--n_head/--n_embd --n-layers/
--n-heads/--n-embd, --batch_size/--block_size --batch-size/--block-size, --out_dir --out, init_from=resume
--resume DIR; --dropout, --compile and --device are the same (a nanoGPT name is answered with chargpt's)
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
  chargpt serve --model out/demo --chat-speakers user=ROMEO,assistant=JULIET   # chat as Romeo and Juliet
"""


EXPORT_EXAMPLES = """examples:
  chargpt export --model out/demo --format onnx --out demo.onnx   # then run it with onnxruntime (README)
  chargpt export --model out/demo --format web --out demo-site    # open demo-site/index.html in a browser
"""


INFO_EXAMPLES = """examples:
  chargpt info out/demo
  chargpt info out/demo --json
  chargpt info --machine          # what chargpt chose on this machine, and why (--json for a bug report)
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

    seen: list[str] = []  # the words this parser was given (for a suggestion when a required flag is missing)

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:  # type: ignore[override]
        self.seen = list(args) if args is not None else []
        return super().parse_known_args(args, namespace)

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message}{self.suggestion(message)} (see {self.prog} --help)\n")
        sys.exit(EXIT_USAGE)

    def suggestion(self, message: str) -> str:
        if message.startswith("the following arguments are required: "):  # often a typo, or the value bare
            missing = message.split(": ", 1)[1].split(", ")[0]
            typo = self.suggestion("unrecognized arguments: " + " ".join(self.seen))
            if typo:
                return typo
            bare = [w for w in self.seen if not w.startswith("-") and "\0" not in w and os.path.exists(w)]
            return f"; give it as {missing} {bare[0]}" if bare and missing.startswith("--") else ""
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
            if word[:2] != "--" or word in known:
                continue
            if word in NANOGPT_NAMES and "--n-updates" in known:  # train's flags under nanoGPT's names
                return f"; {word} is nanoGPT's name: chargpt's is {NANOGPT_NAMES[word]}"
            if word.replace("_", "-") in known:  # a field's name, as in a TOML file
                return f"; flags use dashes: {word.replace('_', '-')}"
            starts = [k for k in known if k.startswith(word)]  # an abbreviation: what it abbreviates
            close = starts if len(starts) == 1 else difflib.get_close_matches(word, known, n=1, cutoff=0.6)
            if close:
                return f"; did you mean {close[0]}?"
        return ""

    footer: Any = None  # a function adding a last paragraph to --help, computed only when help is shown

    def format_help(self) -> str:
        return super().format_help() + (f"\n{self.footer()}\n" if self.footer else "")


def _preset_here() -> str:
    from chargpt.training.planner import preset_here

    preset, why = preset_here()
    return (
        f"on this machine: --preset {preset} applies unless you name one ({why}); cpu = a 0.8M-parameter model "
        f"tuned for a laptop CPU, gpu = the classic 10.8M-parameter model tuned for a GPU, seed = the same model "
        f"as in the lecture"
        + (
            "; with --max-time alone (no preset, shape or --n-updates) the model is instead sized to the budget: "
            "the largest shape this machine can feed enough tokens in that time (Muon, WSD schedule)"
            if preset == "cpu"
            else ""
        )
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
        text = f"default: {f.default}"
    else:
        text = f"default: {', '.join(f'{value} with --preset {p}' for p, value in values.items())}"
    return text + _sized_text(name)


def _sized_text(name: str) -> str:
    """What a run sized for --max-time (the default with a budget alone on a CPU) uses instead, if it differs."""
    if name in sizing.COMMON:
        return f"; {sizing.COMMON[name]} in a run sized for --max-time"
    if name in SIZED_BY_BUDGET:
        return f"; in a run sized for --max-time: {SIZED_BY_BUDGET[name]}"
    return ""


SIZED_BY_BUDGET = {  # the settings a sized run (chargpt.training.sizing) picks from the budget and the machine
    **dict.fromkeys(("block_size", "n_embd", "n_heads", "n_layers", "batch_size"), "picked for the budget"),
    "learning_rate": "the picked shape's",
    "weight_decay": "by the passes over the text",
    "ema": f"{sizing.EMA} in runs of {sizing.EMA_MIN_STEPS:,} steps or more",
    "eval_interval": f"about {sizing.EVAL_POINTS} evaluations",
    "eval_iters": "by the evaluations' share",
}


def _add_train_flags(p: _Parser) -> None:
    """One flag per TrainConfig field (`--n-embd` <-> n_embd), its group, choices and metavar from the field
    (config.setting), in --help groups; default None = not given (the planner fills in the rest)."""
    groups = {title: p.add_argument_group(title) for title in GROUPS}
    add_fields(p, TrainCommand, groups=groups)
    for f in fields(TrainConfig):
        opts = dict(f.metadata["flag"])
        group = groups[opts.pop("group", "settings")]
        flag = "--" + f.name.replace("_", "-")
        text = f"{f.metadata['help']} ({_default_text(f.name)})".lstrip()
        kind = str(f.type).replace(" | None", "")
        if kind == "bool":
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            opts.setdefault("metavar", {"int": "N", "float": "X"}.get(kind, "NAME"))
            group.add_argument(flag, type=TYPES.get(kind, str), default=None, help=text, **opts)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="chargpt",
        description="Character-level GPT: train, sample, evaluate, inspect.",
        epilog=MAIN_EXAMPLES,
    )
    p.add_argument("--version", action="version", version=version_line())
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
    _add_sample(sub)
    _add_eval(sub)
    _add_info(sub)
    _add_export(sub)
    _add_serve(sub)
    return p


def _add_sample(sub: Any) -> None:
    s = sub.add_parser(
        "sample", help="generate text from a trained model", description="Generate text.", epilog=SAMPLE_EXAMPLES
    )
    add_fields(s, SampleRuntime, SampleText, SampleConfig)


def _add_eval(sub: Any) -> None:
    e = sub.add_parser(
        "eval",
        help="score a model on a text file (JSON: loss, bits_per_char, chars)",
        description="Mean per-character loss of a model on a text file, printed as one JSON line.",
        epilog=EVAL_EXAMPLES,
    )
    add_fields(e, EvalCommand)


def _add_info(sub: Any) -> None:
    i = sub.add_parser(
        "info",
        help="what a model directory holds: shape, parameters, vocabulary, training, files",
        description="Describe a model directory.",
        epilog=INFO_EXAMPLES,
    )
    add_fields(i, InfoCommand)


def _add_export(sub: Any) -> None:
    x = sub.add_parser(
        "export",
        help="write a model as an ONNX file (onnxruntime, any language) or a web page that runs it in the browser",
        description="Write a model directory's model as one ONNX graph (the forward with a KV cache, which serves "
        "as the full forward and as the one-token decode step; needs pip install 'chargpt[export]'), or as a "
        "folder with a page that samples from it in the browser, offline, with nothing installed.",
        epilog=EXPORT_EXAMPLES,
    )
    add_fields(x, ExportCommand)


def _add_serve(sub: Any) -> None:
    v = sub.add_parser(
        "serve",
        help="an OpenAI-compatible HTTP API and a browser playground for a model",
        description="Serve a model over HTTP: OpenAI-style /v1/completions (with scores) and /v1/chat/completions "
        "(streaming, batching), vLLM's tokenizer routes, Prometheus' /metrics and a playground.",
        epilog=SERVE_EXAMPLES,
    )
    add_fields(v, ServeConfig, ServeRuntime)


def version_line() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        torch_version = version("torch")
    except PackageNotFoundError:
        torch_version = "not installed"
    return f"chargpt {__version__} (torch {torch_version}, Python {sys.version.split()[0]})"


PATH_FLAGS = ("resume", "config", "model", "data", "out", "vocab", "token_cache", "dir", "init_from")


def check_paths(args: argparse.Namespace) -> None:
    """A path flag given as '' or with a NUL byte is a mistake (a shell variable that was empty, a bad paste):
    said at once, rather than read as 'not given' (an empty --resume started a fresh run) or failing deep inside."""
    for name in PATH_FLAGS:
        value = getattr(args, name, None)
        flag = "DIR" if name == "dir" else "--" + name.replace("_", "-")
        check_path(flag, value)
