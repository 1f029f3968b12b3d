"""CharTokenizer: one token per Unicode character, vocabulary = sorted unique characters of the text.

Encoding and decoding are vectorised with numpy (UTF-32 code points + a lookup table), so a
megabyte of text encodes in milliseconds rather than in a per-character Python loop.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from chargpt.errors import ChargptError


def _codepoints(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")


class CharTokenizer:
    def __init__(self, chars: Sequence[str]):
        chars = list(chars)
        if not chars:
            raise ChargptError("the vocabulary is empty; train on a non-empty text")
        bad = [c for c in chars if not isinstance(c, str) or len(c) != 1]
        if bad:
            raise ChargptError(f"vocabulary entries must be single characters, got {bad[:5]!r}")
        if len(set(chars)) != len(chars):
            dupes = sorted({c for c in chars if chars.count(c) > 1})
            raise ChargptError(f"vocabulary has duplicate characters {dupes!r}; the model file is corrupt")
        self.chars = chars
        self._cps = np.array([ord(c) for c in chars], dtype=np.uint32)
        # code point -> id, -1 for characters outside the vocabulary (one spare slot past the largest)
        self._table = np.full(int(self._cps.max()) + 2, -1, dtype=np.int64)
        self._table[self._cps] = np.arange(len(chars))
        self._ascii_table = np.full(256, -1, dtype=np.int64)
        ascii_chars = self._cps < 128
        self._ascii_table[self._cps[ascii_chars]] = np.arange(len(chars))[ascii_chars]

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        if not text:
            raise ChargptError("the text is empty; give a file with some characters in it")
        return cls(sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> np.ndarray:
        """Text -> int64 ids. Raises ChargptError naming any characters outside the vocabulary."""
        if text.isascii():  # one byte per character: look the bytes up in a 256-entry table
            codes = np.frombuffer(text.encode("ascii"), dtype=np.uint8)
            ids = self._ascii_table[codes]
        else:
            codes = _codepoints(text)
            ids = self._table[np.minimum(codes, len(self._table) - 1)]  # the last slot is always -1
        if ids.size and ids.min() < 0:
            unknown = sorted({chr(c) for c in np.unique(codes[ids < 0])})
            shown = ", ".join(repr(c) for c in unknown[:10]) + (" ..." if len(unknown) > 10 else "")
            raise ChargptError(
                f"{len(unknown)} character(s) not in the model's vocabulary: {shown}; "
                f"remove them or train on text that contains them"
            )
        return ids

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ChargptError(f"token id out of range for a vocabulary of {self.vocab_size}")
        return self._cps[ids].astype("<u4").tobytes().decode("utf-32-le", "surrogatepass")

    def to_list(self) -> list[str]:
        return list(self.chars)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CharTokenizer) and self.chars == other.chars

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"
