"""Each command's settings as dataclasses whose fields carry their help: chargpt.cli.parser makes every flag from
them (`add_fields`), and the commands read them back (`from_args`). The settings a library call also takes live
with it (TrainConfig in chargpt.config; SampleConfig, ServeConfig in chargpt.runtime); the flags that
exist only on the command line are here. A new flag is one field, in one place."""

from __future__ import annotations

import argparse
from dataclasses import MISSING, dataclass, fields
from typing import Any

from chargpt.config import PRESETS, setting
from chargpt.runtime import device_setting, model_setting, precision_setting, quantize_setting, threads_setting


@dataclass
class Runtime:
    """Where a command runs a trained model."""

    model: str = model_setting()
    device: str = device_setting()
    threads: int | None = threads_setting()


@dataclass
class SampleRuntime(Runtime):
    threads: int | None = threads_setting("1 for one sample; more for a batch, as cores are free")


@dataclass
class SampleText:
    prompt: str = setting("\n", "text to continue (default: a newline)")
    no_stream: bool = setting(False, "print when done instead of as generated (default: off)")


@dataclass(kw_only=True)
class EvalCommand(Runtime):
    data: str = setting(help="UTF-8 text file, any size: streamed (required)", required=True, metavar="FILE")
    token_cache: str | None = setting(
        None, "folder for the tokenized file (default: chargpt's cache folder)", metavar="DIR"
    )
    precision: str = precision_setting()
    quantize: str = quantize_setting("none", "none, the model as trained; with int8, scores the text both ways")
    quiet: bool = setting(False, "no progress bar (default: a bar on a terminal)")
    json: bool = setting(False, "print one JSON object (default: text on a terminal, JSON otherwise)")


@dataclass
class ServeRuntime:
    """Where `chargpt serve` runs (its --model is ServeConfig's)."""

    device: str = device_setting()
    threads: int | None = threads_setting("the cores free at start-up but one, for HTTP")


@dataclass
class InfoCommand:
    dir: str | None = setting(None, "model directory (or a folder of runs)", name="dir", nargs="?", metavar="DIR")
    machine: bool = setting(
        False,
        "what chargpt decides on this machine and why: CPU flags, free cores and threads, auto's number formats, "
        "int8, whether the server batches exactly, the caches (times a few steps once; default: off)",
    )
    json: bool = setting(False, "print one JSON object instead of text (default: off)")
    plot: str | None = setting(
        None, "with a folder of runs: draw their val curves in one PNG (default: none)", metavar="FILE"
    )


@dataclass(kw_only=True)
class ExportCommand:
    model: str = model_setting()
    format: str = setting(
        "onnx", "onnx (a file) or web (a folder: a page that runs the model in the browser) (default: onnx)",
        choices=("onnx", "web"),
    )  # fmt: skip
    out: str = setting(
        help="the .onnx file, or the web page's folder, to write (required)", required=True, metavar="PATH"
    )
    overwrite: bool = setting(False, "replace an existing --out (default: refuse)")


@dataclass
class TrainCommand:
    """`chargpt train`'s flags besides TrainConfig's (one flag per field, made by parser._add_train_flags)."""

    preset: str | None = setting(
        None,
        "cpu (a small model tuned for a CPU), gpu (the 10.8M model tuned for a GPU) or seed (the 10.8M model as in "
        "the lecture) (default: cpu on a CPU, gpu on a CUDA GPU)",
        choices=sorted(PRESETS), group="settings",
    )  # fmt: skip
    config: str | None = setting(
        None,
        "TOML file of settings (keys: flag names with underscores); flags override it (default: none)",
        metavar="FILE", group="settings",
    )  # fmt: skip
    quiet: bool = setting(False, "no announcement, progress bar or eval lines (default: off)", group="settings")
    legacy_model: str | None = setting(
        None, argparse.SUPPRESS, name="--model", metavar="ARCH", group="model"
    )  # the old spelling of --arch
    resume: str | None = setting(
        None, "continue the run saved in this model directory (default: a new run)", metavar="DIR",
        group="evaluation and checkpoints",
    )  # fmt: skip
    add_time: float | None = setting(
        None, "with --resume: train this many seconds more (--max-time is the run's total: seconds done + this) "
        "(default: none)",
        metavar="S", group="evaluation and checkpoints",
    )  # fmt: skip
    overwrite: bool = setting(
        False, "replace a model already in --out (default: off)", group="evaluation and checkpoints"
    )
    nproc: int | None = setting(
        None, "launch N processes with torchrun (DDP) on this machine (default: 1, no torchrun)", metavar="N",
        group="hardware",
    )  # fmt: skip


TYPES = {"int": int, "float": float, "str": str}


def add_fields(parser: Any, *classes: type, groups: dict[str, Any] | None = None) -> None:
    """One flag per field of each dataclass that carries a help text (`--max-new-tokens` <-> max_new_tokens), its
    type from the field's, its default the field's; in `groups[flag["group"]]` where given."""
    for cls in classes:
        for f in fields(cls):
            if "flag" not in f.metadata:
                continue  # not a command-line setting
            opts = dict(f.metadata["flag"])
            target = (groups or {}).get(opts.pop("group", ""), parser)
            name = opts.pop("name", "--" + f.name.replace("_", "-"))
            kind = str(f.type).replace(" | None", "")
            if kind == "bool":
                opts.setdefault("action", "store_true")
            elif opts.get("action") != "append":
                opts.setdefault("type", TYPES.get(kind, str))
            if name.startswith("--"):
                opts["dest"] = f.name
            if f.default is not MISSING and not opts.get("required"):
                opts.setdefault("default", f.default)
            target.add_argument(name, help=f.metadata["help"], **opts)
    parser.set_defaults(_settings=classes)  # the command is handed these, filled in (chargpt.cli.commands.run)


def from_args(cls: type, args: argparse.Namespace) -> Any:
    """The dataclass `cls` with the parsed values of its flags (a repeatable flag's list as a tuple)."""
    values = {}
    for f in fields(cls):
        if "flag" not in f.metadata:
            continue
        value = getattr(args, f.name)
        if value is None and f.default_factory is not MISSING:
            value = f.default_factory()
        values[f.name] = tuple(value) if isinstance(value, list) else value
    return cls(**values)
