"""CharTokenizer: vocabulary, round-trip on arbitrary Unicode, unknown characters, large inputs."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chargpt.data.tokenizer import UNKNOWN, CharTokenizer
from chargpt.errors import ChargptError

# Any Unicode text except lone surrogates (which are not valid in a str read from a UTF-8 file).
unicode_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=200)


def test_vocabulary_is_sorted_unique_characters():
    tok = CharTokenizer.from_text("hello, world\n")
    assert tok.chars == ["\n", " ", ",", "d", "e", "h", "l", "o", "r", "w"]
    assert tok.vocab_size == 10
    assert tok.encode("hello").tolist() == [5, 4, 6, 6, 7]


@settings(max_examples=300, deadline=None)
@given(unicode_text)
def test_round_trip_arbitrary_unicode(text):
    tok = CharTokenizer.from_text(text)
    ids = tok.encode(text)
    assert ids.dtype == np.int64
    assert len(ids) == len(text)  # one token per code point, also for characters outside the BMP
    assert ids.min() >= 0 and ids.max() < tok.vocab_size
    assert tok.decode(ids) == text
    assert tok.decode(ids.tolist()) == text
    # ids follow the sorted vocabulary
    assert [tok.chars[i] for i in ids] == list(text)


@settings(max_examples=100, deadline=None)
@given(unicode_text, unicode_text)
def test_round_trip_of_any_text_over_a_larger_vocabulary(vocab_text, text):
    tok = CharTokenizer.from_text(vocab_text + text)
    assert tok.decode(tok.encode(text)) == text


def test_non_bmp_characters():
    text = "a𝄞b😀c\U0010fffd\u00e9"
    tok = CharTokenizer.from_text(text)
    assert tok.vocab_size == 7
    assert len(tok.encode(text)) == 7
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode("😀😀a").tolist() == [tok.chars.index("😀"), tok.chars.index("😀"), tok.chars.index("a")]


def test_empty_string_encodes_and_decodes():
    tok = CharTokenizer.from_text("abc")
    assert tok.encode("").tolist() == []
    assert tok.decode([]) == ""


def test_unknown_characters_are_named():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(ChargptError) as e:
        tok.encode("abXcY😀")
    msg = str(e.value)
    assert "'X'" in msg and "'Y'" in msg and "'😀'" in msg
    assert "3 character(s)" in msg
    assert "\n" not in msg
    # a character below the table's range but not in the vocabulary is unknown too
    with pytest.raises(ChargptError, match="'A'"):
        CharTokenizer.from_text("xyz").encode("xAz")
    # control characters are shown escaped, so the message stays one line
    with pytest.raises(ChargptError) as e:
        CharTokenizer.from_text("ab").encode("a\nb\r")
    assert "'\\n'" in str(e.value) and "'\\r'" in str(e.value) and "\n" not in str(e.value)


def test_many_unknown_characters_are_summarised_on_one_line():
    tok = CharTokenizer.from_text("a")
    with pytest.raises(ChargptError) as e:
        tok.encode("bcdefghijklmnopqrstuvwxyz")
    msg = str(e.value)
    assert "25 character(s)" in msg and "..." in msg and "\n" not in msg


def test_decode_rejects_ids_outside_the_vocabulary():
    tok = CharTokenizer.from_text("abc")
    for bad in ([3], [-1], [0, 1, 99]):
        with pytest.raises(ChargptError, match="out of range"):
            tok.decode(bad)


def test_bad_vocabularies():
    with pytest.raises(ChargptError, match="empty"):
        CharTokenizer.from_text("")
    with pytest.raises(ChargptError, match="empty"):
        CharTokenizer([])
    with pytest.raises(ChargptError, match="duplicate"):
        CharTokenizer(["a", "b", "a"])
    with pytest.raises(ChargptError, match="single characters"):
        CharTokenizer(["ab", "c"])


def test_one_megabyte_encode_matches_a_plain_lookup(corpus_text):
    text = (corpus_text * (1_000_000 // len(corpus_text) + 1))[:1_000_000]
    tok = CharTokenizer.from_text(text)
    ids = tok.encode(text)
    assert ids.shape == (1_000_000,)
    stoi = {c: i for i, c in enumerate(tok.chars)}
    assert ids.tolist() == [stoi[c] for c in text]
    assert tok.decode(ids) == text


def test_equality_and_list():
    a, b = CharTokenizer.from_text("abc"), CharTokenizer(["a", "b", "c"])
    assert a == b and a != CharTokenizer.from_text("abd")
    assert a.to_list() == ["a", "b", "c"]
    a.to_list().append("z")  # a copy: the tokenizer is unchanged
    assert a.vocab_size == 3


def test_unknown_symbol_takes_characters_outside_the_vocabulary():
    tok = CharTokenizer(["a", "b", UNKNOWN], unknown=UNKNOWN)
    assert tok.encode("ab\u00e9z\U0001f600a").tolist() == [0, 1, 2, 2, 2, 0]  # non-ASCII and ASCII alike
    assert tok.unknown_id == 2 and tok != CharTokenizer(["a", "b", UNKNOWN])
    with pytest.raises(ChargptError, match="unknown symbol .* is not in the vocabulary"):
        CharTokenizer(["a", "b"], unknown=UNKNOWN)
    with pytest.raises(ChargptError, match=r"1 character\(s\) not in the model's vocabulary: 'z'"):
        CharTokenizer(["a", "b", UNKNOWN]).encode("abz")
