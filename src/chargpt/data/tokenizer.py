"""CharTokenizer: one token per Unicode character, vocabulary = sorted unique characters of the text.

Encoding and decoding are vectorised with numpy (UTF-32 code points + a lookup table), so a
megabyte of text encodes in milliseconds rather than in a per-character Python loop. A vocabulary
may hold an unknown symbol (U+FFFD by default, see `--min-char-count`): characters outside the
vocabulary then map to it instead of being an error.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from chargpt.errors import ChargptError

# the symbol rare or unseen characters map to, when the vocabulary has one (U+FFFD REPLACEMENT CHARACTER)
UNKNOWN = "\ufffd"


def _codepoints(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")


def unknown_chars_error(unknown: Sequence[str]) -> ChargptError:
    """The one-line error for text holding characters outside a vocabulary that has no unknown symbol."""
    unknown = sorted(set(unknown))
    shown = ", ".join(repr(c) for c in unknown[:10]) + (" ..." if len(unknown) > 10 else "")
    return ChargptError(
        f"{len(unknown)} character(s) not in the model's vocabulary: {shown}; "
        f"remove them or train on text that contains them"
    )


class CharTokenizer:
    def __init__(self, chars: Sequence[str], unknown: str | None = None):
        chars = list(chars)
        if not chars:
            raise ChargptError("the vocabulary is empty; train on a non-empty text")
        bad = [c for c in chars if not isinstance(c, str) or len(c) != 1]
        if bad:
            raise ChargptError(f"vocabulary entries must be single characters, got {bad[:5]!r}")
        if len(set(chars)) != len(chars):
            dupes = sorted({c for c in chars if chars.count(c) > 1})
            raise ChargptError(f"vocabulary has duplicate characters {dupes!r}; the model file is corrupt")
        if unknown is not None and unknown not in chars:
            raise ChargptError(f"the unknown symbol {unknown!r} is not in the vocabulary; the model file is corrupt")
        self.chars = chars
        self.unknown = unknown
        self.unknown_id = chars.index(unknown) if unknown is not None else -1
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
        """Text -> int64 ids. Characters outside the vocabulary map to the unknown symbol if there is one,
        else raise a ChargptError naming them."""
        if text.isascii():  # one byte per character: look the bytes up in a 256-entry table
            codes = np.frombuffer(text.encode("ascii"), dtype=np.uint8)
            ids = self._ascii_table[codes]
        else:
            codes = _codepoints(text)
            ids = self._table[np.minimum(codes, len(self._table) - 1)]  # the last slot is always -1
        if ids.size and ids.min() < 0:
            if self.unknown is not None:
                return np.where(ids < 0, self.unknown_id, ids)
            raise unknown_chars_error([chr(c) for c in np.unique(codes[ids < 0])])
        return ids

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        try:
            ids = np.asarray(ids, dtype=np.int64)
        except (OverflowError, ValueError, TypeError):
            raise ChargptError(f"token ids must be integers below {self.vocab_size}") from None
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ChargptError(f"token id out of range for a vocabulary of {self.vocab_size}")
        return self._cps[ids].astype("<u4").tobytes().decode("utf-32-le", "surrogatepass")

    def to_list(self) -> list[str]:
        return list(self.chars)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CharTokenizer) and (self.chars, self.unknown) == (other.chars, other.unknown)

    def __repr__(self) -> str:
        extra = f", unknown={self.unknown!r}" if self.unknown is not None else ""
        return f"CharTokenizer(vocab_size={self.vocab_size}{extra})"
