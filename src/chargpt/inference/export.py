"""`chargpt export`: a trained model as an ONNX file that other runtimes (onnxruntime, in any language) can run,
or as a web page that runs it in the browser.

The web format is a folder: index.html (the sampling page, and the model written out in plain JavaScript)
and model.js (the weights, float32, base64, and the model's description), loaded by a <script> tag so that
the page works from any static host and from a double-click on the file, offline.

The ONNX file holds one graph, the forward with a KV cache, that serves both as the full forward and as the
one-token decode step:

    inputs   idx (B, T) int64, past_k and past_v (n_layers, B, n_heads, block_size, head_size) float32,
             start () int64: the position of idx[:, 0]
    outputs  logits (B, T, vocab), present_k, present_v (the cache with positions start..start+T-1 written)

A prefill feeds the prompt (up to block_size tokens) with start 0 and a zero cache; each next token is
fed alone (T = 1) with start = the number of tokens before it and the cache the previous call returned.
Attention reads every cache slot with the slots after each query masked out, so the shapes do not depend
on the position. Past block_size the model must see the last block_size tokens at positions
0..block_size-1 (as `chargpt sample` does): prefill them again from start 0.

Metadata (`metadata_props`): `vocab` (the characters, JSON), `block_size`, `n_layers`, `n_heads`,
`head_size`, `chargpt_version`.
"""

from __future__ import annotations

import base64
import contextlib
import importlib
import io
import json
import logging
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from chargpt import __version__
from chargpt.data.tokenizer import CharTokenizer
from chargpt.errors import ChargptError
from chargpt.fileio import atomic_write_bytes
from chargpt.model import EPS, GPT, KVCache
from chargpt.storage.checkpoint import load_model, read_config

FORMATS = ("onnx", "web")
OPSET = 18


class CachedForward(nn.Module):
    """The exported graph: the model's own forward over new tokens at positions start.. with a KV cache of
    block_size slots (KVCache.attend with a tensor position: fixed shapes, every slot read through the mask),
    returning the cache with the new keys and values written."""

    def __init__(self, model: GPT):
        super().__init__()
        self.model = model

    def forward(
        self, idx: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor, start: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cache = KVCache.holding(past_k, past_v, self.model.config.block_size)
        logits = self.model(idx, cache=cache, at=start)[0]  # (B, T, vocab)
        return logits, torch.stack(cache.k), torch.stack(cache.v)


def empty_cache(model: GPT, batch: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    cfg = model.config
    shape = (cfg.n_layers, batch, cfg.n_heads, cfg.block_size, cfg.head_size)
    return torch.zeros(shape), torch.zeros(shape)


NOT_EXPORTED = (
    "the bigram model is a lookup table, and a lecture model is the same GPT written per head: load its weights "
    "into chargpt.GPT with chargpt.lecture.to_fast_weights, or train with --arch gpt"
)


def onnx_bytes(model: GPT, tokenizer: CharTokenizer) -> bytes:
    """The ONNX file's bytes: the cached forward with dynamic batch and length, and the metadata."""
    for name in ("onnx", "onnxscript"):  # the exporter needs both: say which is missing, and how to get it
        try:
            importlib.import_module(name)
        except ImportError:
            raise ChargptError(f"export to ONNX needs the {name} package: pip install 'chargpt[export]'") from None
    import onnx  # the optional `export` extra: imported once it is known to be there

    if not isinstance(model, GPT):
        raise ChargptError(f"only --arch gpt models export to ONNX; {NOT_EXPORTED}")
    model = model.float().eval().cpu()
    wrapped = CachedForward(model).eval()
    past_k, past_v = empty_cache(model, 2)
    example = (torch.zeros(2, 3, dtype=torch.long), past_k, past_v, torch.tensor(0))
    batch, length = torch.export.Dim("batch", max=4096), torch.export.Dim("length", max=model.config.block_size)
    dynamic = ({0: batch, 1: length}, {1: batch}, {1: batch}, None)
    chatty = logging.getLogger("torch.onnx")  # the exporter's notes (e.g. torchvision's ops skipped) are not news
    level = chatty.level
    chatty.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                wrapped, example, dynamo=True, dynamic_shapes=dynamic, opset_version=OPSET, verbose=False,
                input_names=["idx", "past_k", "past_v", "start"], output_names=["logits", "present_k", "present_v"],
            )  # fmt: skip
    finally:
        chatty.setLevel(level)
    proto = program.model_proto
    cfg = model.config
    meta = {
        "vocab": json.dumps(tokenizer.to_list(), ensure_ascii=False),
        "block_size": str(cfg.block_size),
        "n_layers": str(cfg.n_layers),
        "n_heads": str(cfg.n_heads),
        "head_size": str(cfg.head_size),
        "chargpt_version": __version__,
    }
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    buf = io.BytesIO()
    onnx.save_model(proto, buf)
    return buf.getvalue()


def web_files(model: GPT, tokenizer: CharTokenizer, name: str, info: dict) -> dict[str, bytes]:
    """index.html and model.js for the web format."""
    if not isinstance(model, GPT):
        raise ChargptError(f"only --arch gpt models export to the web page; {NOT_EXPORTED}")
    tensors, parts, offset = {}, [], 0
    for key, value in model.state_dict().items():
        flat = value.detach().float().cpu().contiguous().view(-1)
        tensors[key] = [offset, flat.numel()]
        parts.append(flat.numpy().astype("<f4").tobytes())
        offset += flat.numel()
    cfg = model.config
    meta = {
        "name": name, "n_params": model.num_params(), "val_loss": info.get("val_loss"), "step": info.get("step"),
        "vocab": tokenizer.to_list(), "block_size": cfg.block_size, "n_embd": cfg.n_embd,
        "n_heads": cfg.n_heads, "n_layers": cfg.n_layers, "layer_norm_eps": EPS, "chargpt_version": __version__,
    }  # fmt: skip
    spec = {"meta": meta, "tensors": tensors, "data": base64.b64encode(b"".join(parts)).decode("ascii")}
    script = "window.CHARGPT_MODEL = " + json.dumps(spec, ensure_ascii=True) + ";\n"
    return {"index.html": page().encode("utf-8"), "model.js": script.encode("ascii")}


WEB_FILES = ("index.html", "model.js")


def check_apart(model_dir: Path, out: Path) -> None:
    """An export never writes into, over or around the model it exports: --out equal to, inside or above
    --model is refused (replacing it would delete the model)."""
    src, dst = Path(os.path.realpath(model_dir)), Path(os.path.realpath(out))
    if dst == src or src in dst.parents or dst in src.parents:
        where = "is" if dst == src else "is inside" if src in dst.parents else "holds"
        raise ChargptError(
            f"--out {out} {where} the model folder {model_dir}; an export goes beside the model: choose another --out"
        )


PAGE_MARK = b'<meta name="generator" content="chargpt export --format web">'  # in every exported index.html
SCRIPT_MARK = b"window.CHARGPT_MODEL = "  # how every exported model.js begins


def check_replaceable(out: Path, fmt: str) -> None:
    """--overwrite replaces only an earlier export: an ONNX file that chargpt wrote, or a web folder holding
    nothing but the page's two files, each a plain file whose content shows chargpt wrote it. Anything else is
    the user's, and is refused."""
    if fmt == "web":
        others = sorted(p.name for p in out.iterdir() if p.name not in WEB_FILES or not _is_chargpt_web_file(p))
        if others:
            named = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
            raise ChargptError(
                f"{out} holds files that are not a chargpt web export ({named}); --overwrite replaces only an "
                f"earlier export: choose another --out"
            )
        return
    if not _is_chargpt_onnx(out):
        raise ChargptError(
            f"{out} is not an ONNX file that chargpt exported; --overwrite replaces only an earlier export: "
            f"choose another --out"
        )


def _is_chargpt_web_file(path: Path) -> bool:
    """Whether `path` is a plain file (no folder, no link) that a web export wrote: the page with chargpt's
    generator tag, or the script that begins as chargpt's model.js does."""
    if path.is_symlink() or not path.is_file():
        return False
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return False
    return PAGE_MARK in head if path.name == "index.html" else head.startswith(SCRIPT_MARK)


def _is_chargpt_onnx(path: Path) -> bool:
    """Whether `path` is a regular file holding an ONNX model with chargpt's metadata (read without its data)."""
    try:
        if not path.is_file() or path.is_symlink():
            return False
        onnx = importlib.import_module("onnx")
        proto = onnx.load_model(str(path), load_external_data=False)
    except Exception:  # not protobuf, not ONNX, no onnx package: not provably an earlier export
        return False
    return any(p.key == "chargpt_version" for p in proto.metadata_props)


def page() -> str:
    """The web page: web/index.html with the server playground's style inlined (one look, kept in one place)."""
    here = Path(__file__).parents[1]  # the package: web/ and serve/ are its folders
    playground = (here / "serve" / "playground.html").read_text(encoding="utf-8")
    style = playground[playground.index("<style>") : playground.index("</style>") + len("</style>")]
    template = (here / "web" / "index.html").read_text(encoding="utf-8")
    return re.sub(r"<style>/\*.*?\*/</style>", lambda _: style, template, count=1)


def export(model_dir: str | Path, out: str | Path, fmt: str = "onnx", overwrite: bool = False) -> Path:
    """Write the model in `model_dir` to `out` in format `fmt` (a file for onnx, a folder for web), atomically:
    a Ctrl-C or an error leaves no half export, and an --overwrite replaces the old one only when the new one
    is complete."""
    if fmt not in FORMATS:
        raise ChargptError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")
    out = Path(out)
    if os.path.lexists(out) and not overwrite:
        raise ChargptError(f"{out} exists; pass --overwrite to replace it, or choose another --out")
    if fmt == "onnx" and out.is_dir():
        raise ChargptError(f"{out} is a folder; --out names the .onnx file to write")
    if fmt == "web" and os.path.lexists(out) and not (out.is_dir() and not out.is_symlink()):
        raise ChargptError(f"{out} is not a folder; --out names the folder the page goes to")
    if not out.absolute().parent.is_dir():
        raise ChargptError(f"the folder {out.absolute().parent} does not exist; create it first")
    check_apart(Path(model_dir), out)
    if os.path.lexists(out):
        check_replaceable(out, fmt)
    model, tokenizer = load_model(model_dir, torch.device("cpu"))
    if fmt == "onnx":
        atomic_write_bytes(out, onnx_bytes(model, tokenizer))  # type: ignore[arg-type]
        return out
    info = read_config(model_dir)[2]
    files = web_files(model, tokenizer, Path(model_dir).resolve().name, info)  # type: ignore[arg-type]
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.absolute().parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # a folder to publish, not mkdtemp's private 0700
    try:
        for name, data in files.items():
            atomic_write_bytes(staging / name, data)
        if os.path.lexists(out):  # --overwrite: the old folder goes only once the new one is whole
            old = staging.with_name(staging.name + ".old")
            os.replace(out, old)
            os.replace(staging, out)
            for name in WEB_FILES:  # only the export's own files (checked above); never a whole tree
                (old / name).unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                old.rmdir()
        else:
            os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out
