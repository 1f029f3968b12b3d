"""UTF-8 corpora streamed in chunks, in bounded memory: pass 1 finds (or counts) the characters and hashes
each file, pass 2 turns each chunk into token ids.

Both passes work on bytes: ASCII bytes are their own code points, so mostly-ASCII text never becomes a
Python string; only its runs of non-ASCII bytes are decoded (which also checks that they are UTF-8).
Reading + hashing, and writing, run in background threads (file I/O and hashlib release the GIL), so
on two cores the byte work overlaps the I/O, and the disk writes while the CPU encodes.
"""

from __future__ import annotations

import hashlib
import io
import os
import queue
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO, TypeVar

import numpy as np
from tqdm import tqdm

from chargpt.data.tokenizer import CharTokenizer
from chargpt.errors import ChargptError

CHUNK_BYTES = 16 << 20  # bounds the memory of both passes: a few times this
JOINER = "\n"  # between the files of a folder, as load_corpus joins them
N_CODEPOINTS = 0x110000
_HIGH = bytes(range(128, 256))
T = TypeVar("T")


@dataclass(frozen=True)
class SourceFile:
    """One file of a corpus as it was listed; `data` holds the text of a corpus that lives in memory."""

    path: str
    size: int
    mtime_ns: int
    data: bytes | None = None


def changed_error(path: str) -> ChargptError:
    return ChargptError(f"{path} changed while it was being tokenized; run again once it is complete (or use a copy)")


class _Changed(Exception):
    """Pass 2 met bytes pass 1 did not see: the file changed in between."""


# ---------------------------------------------------------------------------------------------
# reading


def file_chunks(src: SourceFile, digest: Any, chunk_bytes: int | None = None) -> Iterator[tuple[int, bytes]]:
    """(byte offset, bytes) pieces of a file that end on character boundaries; feeds `digest` what it reads."""
    chunk_bytes = chunk_bytes or CHUNK_BYTES
    try:
        f: Any = io.BytesIO(src.data) if src.data is not None else open(src.path, "rb")  # noqa: SIM115
    except OSError as e:
        raise ChargptError(f"cannot read {src.path}: {e.strerror}; check the path and permissions") from None
    with f:
        carry, offset, size = b"", 0, 0
        while True:
            try:
                data = f.read(chunk_bytes)
            except OSError as e:
                raise ChargptError(f"cannot read {src.path}: {e.strerror}") from None
            if size == 0:
                check_not_utf16(src.path, data)
            size += len(data)
            digest.update(data)
            buf = carry + data if carry else data
            if not data:
                if buf:
                    yield offset, buf  # an incomplete last character: decoding it names the offset
                break
            cut = _complete_prefix(buf)
            if cut:
                yield offset, buf if cut == len(buf) else buf[:cut]
            carry, offset = buf[cut:], offset + cut
    if size != src.size:
        raise changed_error(src.path)


def prefetched(items: Iterator[T], depth: int = 2) -> Iterator[T]:
    """`items`, produced by a background thread up to `depth` ahead; its exceptions are raised here."""
    q: queue.Queue[tuple[str, Any]] = queue.Queue(depth)
    stop = threading.Event()

    def put(kind: str, value: Any) -> bool:
        while not stop.is_set():
            try:
                q.put((kind, value), timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put("item", item):
                    return
            put("done", None)
        except BaseException as e:  # handed to the consumer, which raises it
            put("error", e)
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=produce, name="chargpt-reader", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = q.get()
            if kind == "done":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        thread.join()


def _complete_prefix(buf: bytes) -> int:
    """The length of `buf` without a multi-byte character cut off at its end (kept for the next chunk)."""
    n = len(buf)
    for back in range(1, min(4, n) + 1):
        b = buf[n - back]
        if b < 0x80:
            return n
        if b >= 0xC0:  # the lead byte of the last character: how many bytes it needs
            need = 2 if b < 0xE0 else 3 if b < 0xF0 else 4
            return n - back if back < need else n
    return n  # only continuation bytes: invalid, and decoding will say where


def check_not_utf16(path: str, head: bytes) -> None:
    """Refuse UTF-16 text (a byte-order mark, or every other byte zero) with a message that says so: every
    reader of text files applies this same rule, so a file is refused or accepted alike with or without the cache."""
    sample = head[:4096]
    quarters = [sample[i::4] for i in range(4)]  # UTF-32: three bytes in four zero (BOM: FF FE 00 00, 00 00 FE FF)
    zero = [len(q) > 0 and q.count(0) >= 0.9 * len(q) for q in quarters]
    if sample[:4] in (b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff") or (len(sample) >= 64 and sum(zero) >= 3):
        raise ChargptError(
            f"{path} is not UTF-8 text: it looks like UTF-32 (a byte-order mark, or three bytes in four zero); "
            f"convert it first, e.g. iconv -f utf-32 -t utf-8"
        )
    halves = (sample[0::2], sample[1::2])  # UTF-16 without a byte-order mark: every other byte zero
    alternating = len(sample) >= 64 and any(h.count(0) >= 0.9 * len(h) for h in halves)
    if sample[:2] in (b"\xff\xfe", b"\xfe\xff") or alternating:
        raise ChargptError(
            f"{path} is not UTF-8 text: it looks like UTF-16 (a byte-order mark, or every other byte zero); "
            f"convert it first, e.g. iconv -f utf-16 -t utf-8"
        )


def decode_error(path: str, raw: bytes, offset: int) -> ChargptError:
    try:
        raw.decode("utf-8")
        start = 0  # not reached for invalid input; keeps the message well-formed regardless
    except UnicodeDecodeError as e:
        start = e.start
    return ChargptError(
        f"{path} is not UTF-8 text (byte 0x{raw[start]:02x} at offset {offset + start}); "
        f"convert it first, e.g. iconv -f latin1 -t utf-8"
    )


def _codepoints(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le"), dtype="<u4")


def _runs_decoded(a: np.ndarray, high: np.ndarray) -> str:
    """The non-ASCII characters of a chunk, in order: its runs of non-ASCII bytes (positions `high`) decoded
    with a NUL between runs, so that a run cut short cannot pass for a character with the next run."""
    starts = np.flatnonzero(np.diff(high) > 1) + 1
    return np.insert(a[high], starts, 0).tobytes().decode("utf-8")


# ---------------------------------------------------------------------------------------------
# pass 1: which characters, how many


@dataclass
class Scan:
    counts: np.ndarray  # (N_CODEPOINTS,) int64: occurrences of each character (exact) or 1 if present
    files: list[dict[str, Any]]  # per source: path, size, mtime_ns, sha256, chars
    exact: bool

    @property
    def count(self) -> int:
        """Characters in the corpus, the joiners between files included."""
        return sum(f["chars"] for f in self.files) + max(len(self.files) - 1, 0)


def scan(sources: list[SourceFile], exact: bool, progress: bool) -> Scan:
    """Pass 1: every file's characters (counted if `exact`, else only found: 4x faster) and SHA-256."""
    counts = np.zeros(N_CODEPOINTS, dtype=np.int64)
    files = []
    with progress_bar(sum(s.size for s in sources), "reading characters", progress) as bar:
        for src in sources:
            digest, n_chars = hashlib.sha256(), 0
            for offset, raw in prefetched(file_chunks(src, digest)):
                n_chars += _scan_chunk(raw, src.path, offset, counts, exact)
                bar.update(len(raw))
            entry = {"path": src.path, "size": src.size, "mtime_ns": src.mtime_ns}
            files.append({**entry, "sha256": digest.hexdigest(), "chars": n_chars})
    if len(sources) > 1:
        counts[ord(JOINER)] += len(sources) - 1 if exact else 1
    return Scan(counts, files, exact)


def _scan_chunk(raw: bytes, path: str, offset: int, counts: np.ndarray, exact: bool) -> int:
    """Add one chunk's characters to `counts`; returns how many it holds. Raises if it is not UTF-8."""
    a = np.frombuffer(raw, dtype=np.uint8)
    n_chars = len(a)
    if not raw.isascii():
        high = np.flatnonzero(a >= 0x80)
        try:
            if len(high) * 8 > len(a):  # mostly non-ASCII: decode it all
                cps = _codepoints(raw.decode("utf-8"))
                _add(counts, cps, exact)
                return len(cps)
            cps = _codepoints(_runs_decoded(a, high))
        except UnicodeDecodeError:
            raise decode_error(path, raw, offset) from None
        _add(counts, cps[cps != 0], exact)
        n_chars -= int(np.count_nonzero(a[high] < 0xC0))  # continuation bytes are no characters
    if exact:
        counts[:128] += _byte_counts(a)[:128]
    else:  # drop the ASCII bytes already seen, and all others: what is left is new
        seen = np.flatnonzero(counts[:128]).astype(np.uint8).tobytes()
        new = raw.translate(None, seen + _HIGH)
        if new:
            counts[np.frombuffer(new, dtype=np.uint8)] = 1
    return n_chars


def _add(counts: np.ndarray, cps: np.ndarray, exact: bool) -> None:
    if exact:
        found = np.bincount(cps)
        counts[: len(found)] += found
    else:
        counts[cps] = 1


def _byte_counts(a: np.ndarray) -> np.ndarray:
    """(256,) occurrences of each byte value. Counts byte pairs (65,536 bins on half as many elements:
    twice the speed of a plain bincount), then folds them."""
    even = len(a) & ~1
    pairs = np.bincount(a[:even].view("<u2"), minlength=1 << 16).reshape(256, 256)  # [high byte, low byte]
    counts = pairs.sum(axis=0) + pairs.sum(axis=1)
    if len(a) & 1:
        counts[a[-1]] += 1
    return counts


# ---------------------------------------------------------------------------------------------
# pass 2: ids


def encode(
    sources: list[SourceFile],
    found: Scan,
    tokenizer: CharTokenizer,
    dtype: str,
    write: Callable[[Any], Any],
    progress: bool,
    racy_after_ns: int,
) -> None:
    """Pass 2: hand each chunk's ids to `write`. A file that changed since it was listed is an error: its
    size and mtime are checked again at the end; one modified after `racy_after_ns` (so recently that a
    change might not move its mtime) is hashed again instead, as are files held in memory."""
    encoder = Encoder(tokenizer, dtype)
    with progress_bar(sum(s.size for s in sources), "writing token ids", progress) as bar:
        for i, (src, seen) in enumerate(zip(sources, found.files, strict=True)):
            if i:
                write(encoder.joiner)
            rehash = src.data is not None or src.mtime_ns > racy_after_ns
            digest, n_ids = hashlib.sha256() if rehash else _NoDigest(), 0
            for _, raw in prefetched(file_chunks(src, digest)):
                try:
                    ids = encoder(raw)
                except _Changed:
                    raise changed_error(src.path) from None
                n_ids += len(ids)
                write(ids)
                bar.update(len(raw))
            if n_ids != seen["chars"] or (rehash and digest.hexdigest() != seen["sha256"]):
                raise changed_error(src.path)
            if not rehash and _stat(src.path) != (src.size, src.mtime_ns):
                raise changed_error(src.path)


class _NoDigest:
    def update(self, data: bytes) -> None:
        pass


def _stat(path: str) -> tuple[int, int]:
    try:
        st = os.stat(path)
    except OSError:
        return -1, -1
    return st.st_size, st.st_mtime_ns


class Encoder:
    """Chunk -> ids in the token file's dtype. Every byte goes through a 256-entry table (bytes.translate
    when the ids are bytes): right for ASCII. A chunk's few multi-byte characters are then spliced in
    (their ids replace their bytes); chunks with many go through numpy positions, mostly non-ASCII ones
    through their code points."""

    SPLICE_MAX = 4096  # multi-byte characters per chunk up to which splicing beats numpy masks

    def __init__(self, tokenizer: CharTokenizer, dtype: str):
        self.dtype = np.dtype(dtype)
        cps = np.array([ord(c) for c in tokenizer.chars], dtype=np.int64)
        fill = tokenizer.unknown_id if tokenizer.unknown is not None else 0  # others: only if the text changed
        self.table = np.full(int(cps.max()) + 2, fill, dtype=np.int64)  # code point -> id; last slot: beyond
        self.table[cps] = np.arange(len(cps))
        self.bytes_table = np.zeros(256, dtype=self.dtype)
        self.bytes_table[:128] = self._lookup(np.arange(128))
        self.translation = self.bytes_table.tobytes() if self.dtype.itemsize == 1 else None
        self.joiner = self._lookup(np.array([ord(JOINER)]))

    def _lookup(self, cps: np.ndarray) -> np.ndarray:
        return self.table[np.minimum(cps, len(self.table) - 1)].astype(self.dtype)

    def __call__(self, raw: bytes) -> bytes | np.ndarray:
        if raw.isascii():
            return raw.translate(self.translation) if self.translation else self.bytes_table[np.frombuffer(raw, "u1")]
        a = np.frombuffer(raw, dtype=np.uint8)
        high = np.flatnonzero(a >= 0x80)
        try:
            if len(high) * 8 > len(a):  # mostly non-ASCII
                return self._lookup(_codepoints(raw.decode("utf-8")))
            cps = _codepoints(_runs_decoded(a, high))  # pass 1 checked the bytes: an error means they changed
        except UnicodeDecodeError:
            raise _Changed from None
        cps = cps[cps != 0]
        is_lead = a[high] >= 0xC0
        if self.translation is None or len(cps) > self.SPLICE_MAX:
            out = self.bytes_table[a]
            out[high[is_lead]] = self._lookup(cps)
            keep = np.ones(len(a), dtype=bool)
            keep[high[~is_lead]] = False  # continuation bytes are no characters
            return out[keep]
        lead = high[is_lead]
        lengths = 2 + (a[lead] >= 0xE0).astype(np.int64) + (a[lead] >= 0xF0)
        body = memoryview(raw.translate(self.translation))
        parts, prev = [], 0
        for start, length, id_ in zip(lead.tolist(), lengths.tolist(), self._lookup(cps).tolist(), strict=True):
            parts += (body[prev:start], bytes((id_,)))
            prev = start + length
        parts.append(body[prev:])
        return b"".join(parts)


class BackgroundWriter:
    """Writes chunks to `f` from a thread and flushes them to disk every `sync_bytes`, so that the disk works
    while the CPU encodes instead of all at once at the final fsync. A write error is raised in the caller."""

    def __init__(self, f: BinaryIO, sync_bytes: int = 64 << 20, depth: int = 2):
        self.f, self.sync_bytes = f, sync_bytes
        self.q: queue.Queue[Any] = queue.Queue(depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="chargpt-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        pending = 0
        while (chunk := self.q.get()) is not None:
            if self.error is not None:
                continue  # drain: the caller raises the error
            try:
                self.f.write(chunk)
                pending += memoryview(chunk).nbytes
                if pending >= self.sync_bytes:
                    self.f.flush()
                    os.fdatasync(self.f.fileno())
                    pending = 0
            except BaseException as e:
                self.error = e

    def __call__(self, chunk: bytes | np.ndarray) -> None:
        if self.error is not None:
            raise self.error
        self.q.put(chunk)

    def __enter__(self) -> BackgroundWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, *rest: Any) -> None:
        self.q.put(None)
        self.thread.join()
        if kind is None and self.error is not None:
            raise self.error


def progress_bar(total: int, desc: str, progress: bool, unit: str = "B") -> Any:
    """A progress bar (bytes: MB/s) on stderr, only where a person watches: a terminal, progress asked for."""
    show = progress and sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, file=sys.stderr, disable=not show, leave=False)
