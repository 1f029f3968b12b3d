"""The token cache: streamed tokenization equal to the in-memory tokenizer, cache reuse and invalidation,
bad input, memory-mapped batches and training identical to the in-memory path, DDP, eval, full disk."""

from __future__ import annotations

import importlib
import json
import logging
import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from chargpt.cli import main
from chargpt.config import TrainConfig
from chargpt.data import streaming as chunks
from chargpt.data import tokencache
from chargpt.data.corpus import (
    Corpus,
    get_batch,
    load_corpus,
    prepare_data,
    shakespeare_text,
    split,
    tokenize_corpus,
    vocab_policy,
)
from chargpt.data.tokenizer import UNKNOWN, CharTokenizer
from chargpt.errors import ChargptError
from chargpt.inference.evaluate import evaluate, evaluate_file
from chargpt.inference.generate import generate
from chargpt.storage import checkpoint as ckpt
from chargpt.storage import trainstate
from chargpt.training.loop import train
from chargpt.training.settings import resume_config
from conftest import read_metrics, spawn_gloo_ranks, tiny_config

assembly = importlib.import_module("chargpt.training.assembly")  # where a run reads its data
AUTO = vocab_policy("auto", 1)


@pytest.fixture(autouse=True)
def _chargpt_logs_reach_caplog():
    """The CLI (run in-process by some tests) points chargpt's logger at stderr only; undo that here."""
    logger = logging.getLogger("chargpt")
    saved = logger.handlers[:], logger.propagate, logger.level
    logger.handlers[:], logger.propagate, logger.level = [], True, logging.NOTSET
    yield
    logger.handlers[:], logger.propagate, logger.level = saved


def tokens_of(data: Path | str | None, cache: Path | None, policy=AUTO):
    return tokenize_corpus(None if data is None else str(data), policy, cache)


def cache_files(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock")) if cache.exists() else []


def write_random_text(path: Path, rng: random.Random, n: int, alphabet: str) -> str:
    weights = [rng.random() ** 3 for _ in alphabet]
    text = "".join(rng.choices(alphabet, weights, k=n))
    path.write_text(text, encoding="utf-8")
    return text


# ---------------------------------------------------------------------------------------------
# the streamed tokenization is the in-memory tokenizer, chunk boundaries anywhere


@pytest.mark.parametrize("chunk_bytes", [1, 2, 3, 5, 64, 1 << 20])
def test_streamed_ids_and_vocabulary_equal_the_in_memory_tokenizer(chunk_bytes, tmp_path, monkeypatch):
    """Random texts of ASCII, 2-, 3- and 4-byte characters (sparse and dense), cut into chunks of any size:
    the same vocabulary (sorted unique characters) and the same ids as CharTokenizer on the whole text."""
    monkeypatch.setattr(chunks, "CHUNK_BYTES", chunk_bytes)
    rng = random.Random(chunk_bytes)
    alphabets = [
        "ab c\n",
        "ab c\n\u00e9\u2014",
        "\u0436\u4e2d\U0001f600a\x00",
        "xyz" + "".join(map(chr, range(0x4E00, 0x4F40))),
    ]
    for i in range(12):
        path = tmp_path / f"t{i}.txt"
        text = write_random_text(path, rng, rng.randint(1, 600), alphabets[i % len(alphabets)])
        for cache in (tmp_path / "cache", None):
            tokens = tokens_of(path, cache)
            expected = CharTokenizer.from_text(text)
            assert tokens.tokenizer == expected
            assert np.array_equal(tokens.ids.astype(np.int64), expected.encode(text))
            assert tokens.ids.dtype == (np.uint8 if expected.vocab_size <= 256 else np.uint16)


def test_splice_and_mask_paths_agree(tmp_path, monkeypatch):
    """Chunks with few multi-byte characters are spliced, chunks with many use numpy masks: same ids."""
    rng = random.Random(5)
    path = tmp_path / "mixed.txt"
    text = write_random_text(path, rng, 5000, "abcdefgh \n" * 20 + "\u00e9\u00e8\u2014\U0001f600")
    results = []
    for splice_max in (0, 10**9):
        monkeypatch.setattr(chunks.Encoder, "SPLICE_MAX", splice_max)
        results.append(tokens_of(path, None).ids)
    expected = CharTokenizer.from_text(text).encode(text)
    assert np.array_equal(results[0], expected) and np.array_equal(results[1], expected)


def test_folder_glob_and_embedded_corpus_equal_load_corpus(tmp_path):
    books = tmp_path / "books"
    (books / "b").mkdir(parents=True)
    (books / "z.txt").write_text("last one\n", encoding="utf-8")
    (books / "a.txt").write_text("caf\u00e9 first", encoding="utf-8")
    (books / "b" / "c.txt").write_text("in a sub\u2014folder", encoding="utf-8")
    (books / "notes.md").write_text("not a .txt file")
    for data in (books, f"{books}/**/*.txt"):
        text = load_corpus(str(data))
        assert text == "caf\u00e9 first\nin a sub\u2014folder\nlast one\n"  # files joined with newlines, sorted
        tokens = tokens_of(data, tmp_path / "cache")
        assert tokens.tokenizer.decode(tokens.ids) == text and tokens.tokenizer == CharTokenizer.from_text(text)
    only_top = tokens_of(f"{books}/*.txt", None)
    assert only_top.tokenizer.decode(only_top.ids) == "caf\u00e9 first\nlast one\n"
    with pytest.raises(ChargptError, match="no files match"):
        tokens_of(f"{books}/*.csv", None)
    # the default corpus goes through the same path: same text, same vocabulary as before
    shakespeare = shakespeare_text()
    tokens = tokens_of(None, tmp_path / "cache")
    assert tokens.path is not None and tokens.tokenizer == CharTokenizer.from_text(shakespeare)
    assert np.array_equal(tokens.ids, CharTokenizer.from_text(shakespeare).encode(shakespeare))


# ---------------------------------------------------------------------------------------------
# the cache: reuse, invalidation, damage


def test_cache_is_reused_and_its_header_describes_it(tmp_path):
    path = tmp_path / "corpus.txt"
    text = write_random_text(path, random.Random(1), 3000, "abc \n\u00e9")
    cache = tmp_path / "cache"
    first = tokens_of(path, cache)
    assert first.built and first.path is not None and first.path.parent == cache
    assert [n.split("-")[0] for n in cache_files(cache)] == ["corpus", "corpus"]  # NAME-KEY.json, NAME-KEY.tokens
    second = tokens_of(path, cache)
    assert not second.built and second.path == first.path
    assert isinstance(second.ids.base, memoryview)  # a view of the memory map, not a copy
    assert np.array_equal(second.ids, first.ids) and second.tokenizer == first.tokenizer
    header = json.loads(first.path.with_name(first.path.name.replace(".tokens", ".json")).read_text())
    assert header["dtype"] == "uint8" and header["count"] == len(text) and header["vocab"] == sorted(set(text))
    st = path.stat()
    assert header["files"] == [
        {
            "path": str(path.resolve()),
            "size": st.st_size,
            "mtime_ns": st.st_mtime_ns,
            "sha256": __import__("hashlib").sha256(path.read_bytes()).hexdigest(),
            "chars": len(text),
        }
    ]
    assert first.path.stat().st_size == len(text)  # one byte per character


def test_changed_source_is_tokenized_again_touched_one_is_not(tmp_path, caplog):
    path = tmp_path / "corpus.txt"
    path.write_text("hello world\n", encoding="utf-8")
    cache = tmp_path / "cache"
    tokens_of(path, cache)
    path.write_text("hello there\n", encoding="utf-8")  # same size, new content
    again = tokens_of(path, cache)
    assert again.built and again.tokenizer.decode(again.ids) == "hello there\n"
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))  # only the mtime moves
    touched = tokens_of(path, cache)
    assert not touched.built  # the content hash says nothing changed
    assert not tokens_of(path, cache).built  # and the header now records the new mtime: no hash either
    path.write_text("hello there, longer\n", encoding="utf-8")
    assert tokens_of(path, cache).built
    # a folder that gains a file: same cache name, rebuilt
    folder = tmp_path / "books"
    folder.mkdir()
    (folder / "a.txt").write_text("one")
    tokens_of(folder, cache)
    (folder / "b.txt").write_text("two")
    grown = tokens_of(folder, cache)
    assert grown.built and grown.tokenizer.decode(grown.ids) == "one\ntwo"
    assert len([n for n in cache_files(cache) if n.startswith("books")]) == 2  # replaced, not added


@pytest.mark.parametrize("damage", ["truncate", "edit ids", "edit header", "garbage header", "remove ids"])
def test_damaged_cache_is_detected_and_rebuilt(damage, tmp_path, caplog):
    path = tmp_path / "corpus.txt"
    text = write_random_text(path, random.Random(2), 2000, "abcdef \n")
    cache = tmp_path / "cache"
    built = tokens_of(path, cache)
    tokens_file = built.path
    header_file = tokens_file.with_name(tokens_file.name.replace(".tokens", ".json"))
    del built
    time.sleep(0.05)  # an edit, unlike the cache's own write, happens later than one timestamp tick
    if damage == "truncate":
        os.truncate(tokens_file, 1000)
    elif damage == "edit ids":  # same size, other bytes
        data = bytearray(tokens_file.read_bytes())
        data[10] = (data[10] + 1) % 7
        tokens_file.write_bytes(bytes(data))
    elif damage == "edit header":  # a plausible edit: a shorter count
        header = json.loads(header_file.read_text())
        header["count"] -= 1
        header_file.write_text(json.dumps(header))
    elif damage == "garbage header":
        header_file.write_bytes(b"\x00{not json")
    else:
        tokens_file.unlink()
    with caplog.at_level(logging.WARNING, logger="chargpt"):
        rebuilt = tokens_of(path, cache)
    assert rebuilt.built and "is damaged" in caplog.text
    assert rebuilt.tokenizer.decode(rebuilt.ids) == text
    assert not tokens_of(path, cache).built


def test_token_cache_off_and_unusable_cache_folder_tokenize_into_memory(tmp_path, caplog):
    path = tmp_path / "corpus.txt"
    path.write_text("some text\n")
    off = prepare_data(tiny_config(tmp_path / "m", path, block_size=2, val_fraction=0.5, token_cache="off"))
    assert off.cache is None and off.tokenizer.decode(np.concatenate([off.train, off.val])) == "some text\n"
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with caplog.at_level(logging.WARNING, logger="chargpt"):
        tokens = tokens_of(path, blocker / "cache")
    assert tokens.path is None and tokens.tokenizer.decode(tokens.ids) == "some text\n"
    assert "is not usable" in caplog.text and "tokenizing into memory" in caplog.text


# ---------------------------------------------------------------------------------------------
# bad input


def test_invalid_utf8_part_way_names_the_byte_offset_and_leaves_no_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(chunks, "CHUNK_BYTES", 1000)
    path = tmp_path / "bad.txt"
    good = ("caf\u00e9 \u2014 " * 300).encode()
    path.write_bytes(good + b"ok \xe9t\xe9 " + good)  # a latin-1 byte in the third chunk
    cache = tmp_path / "cache"
    with pytest.raises(ChargptError, match=rf"bad.txt is not UTF-8 text \(byte 0xe9 at offset {len(good) + 3}\)"):
        tokens_of(path, cache)
    assert cache_files(cache) == []
    path.write_bytes(good + "\u2014".encode()[:2])  # cut inside the last character
    with pytest.raises(ChargptError, match=rf"\(byte 0xe2 at offset {len(good)}\)"):
        tokens_of(path, cache)
    path.write_bytes("\ufeffhello".encode("utf-16-le"))
    with pytest.raises(ChargptError, match="bad.txt is not UTF-8 text: it looks like UTF-16"):
        tokens_of(path, cache)
    path.write_bytes(("hello world, " * 20).encode("utf-16-le"))  # no byte-order mark
    with pytest.raises(ChargptError, match="looks like UTF-16"):
        tokens_of(path, cache)
    assert cache_files(cache) == []


@pytest.mark.parametrize(
    "content",
    [
        "\ufeffhello there\n".encode("utf-16-le"),
        ("hello world, " * 20).encode("utf-16-be"),  # no byte-order mark
        b"ok \xe9t\xe9",  # latin-1
        ("caf\u00e9\n" * 50).encode(),  # fine
        b"\x00" * 100 + b"abc",  # NULs are valid UTF-8, but every other byte is zero: refused as UTF-16 by both
    ],
    ids=["utf16-bom", "utf16-no-bom", "latin1", "utf8", "nul-padding"],
)
def test_the_token_cache_and_the_in_memory_reader_accept_and_refuse_the_same_files(content, tmp_path):
    """--token-cache off (and --vocab FILE) read files whole; they must take exactly what the cache takes, with
    the same message."""
    path = tmp_path / "data.txt"
    path.write_bytes(content)
    outcomes = []
    for read in (lambda: tokens_of(path, tmp_path / "cache"), lambda: load_corpus(str(path))):
        try:
            read()
            outcomes.append("accepted")
        except ChargptError as e:
            outcomes.append(str(e))
    assert outcomes[0] == outcomes[1], outcomes


@pytest.mark.parametrize("age", ["written just before", "an hour old"])
@pytest.mark.parametrize("change", ["append", "same size"])
def test_a_corpus_that_changes_while_being_tokenized_is_an_error_and_leaves_no_cache(
    change, age, tmp_path, monkeypatch
):
    """The file changes between pass 1 (vocabulary) and pass 2 (ids): caught, nothing stale is kept. An old
    file's change moves its mtime (checked after pass 2); a just-written one is hashed again."""
    path = tmp_path / "growing.txt"
    path.write_text("abc " * 1000)
    if age == "an hour old":
        os.utime(path, (time.time() - 3600, time.time() - 3600))
    real_encode = tokencache.encode

    def encode_after_a_change(*args, **kwargs):
        with open(path, "r+b") as f:
            if change == "append":
                f.seek(0, 2)
                f.write(b"more text")
            else:
                f.write(b"xyz ")
        return real_encode(*args, **kwargs)

    monkeypatch.setattr(tokencache, "encode", encode_after_a_change)
    cache = tmp_path / "cache"
    with pytest.raises(ChargptError, match="growing.txt changed while it was being tokenized"):
        tokens_of(path, cache)
    assert cache_files(cache) == []
    monkeypatch.setattr(tokencache, "encode", real_encode)
    assert tokens_of(path, cache).built  # and the next run tokenizes the new text


def test_full_disk_while_writing_the_cache_trains_from_memory(tmp_path):
    """A real write limit (RLIMIT_FSIZE: the kernel refuses to grow a file past 256 kB, as a full disk would):
    the 600 kB token file cannot be written, no partial cache is left, training goes on from memory."""
    data = tmp_path / "big.txt"
    write_random_text(data, random.Random(3), 600_000, "abcdefgh ij\n")
    cache, out, limit = tmp_path / "cache", tmp_path / "m", 256 << 10

    def limited() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    cmd = [sys.executable, "-m", "chargpt", "train", "--data", str(data), "--out", str(out), "--token-cache",
           str(cache), "--device", "cpu", "--n-updates", "3", "--eval-interval", "3", "--eval-iters", "1",
           "--block-size", "8", "--n-embd", "8", "--n-heads", "2", "--n-layers", "1", "--batch-size", "2"]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, preexec_fn=limited)
    assert r.returncode == 0, r.stderr
    assert "file-size limit" in r.stderr and "tokenizing into memory instead" in r.stderr
    assert "Traceback" not in r.stderr and "done: 3 steps" in r.stdout
    assert cache_files(cache) == []  # no token file, no header, no temp file
    assert (out / "model.safetensors").is_file()


# ---------------------------------------------------------------------------------------------
# batches and training: the same seed gives the same run as the in-memory corpus did


def test_memory_mapped_batches_equal_in_memory_batches(tmp_path):
    path = tmp_path / "corpus.txt"
    write_random_text(path, random.Random(4), 20_000, "abcdefghij \n\u00e9")
    mapped = tokens_of(path, tmp_path / "cache")
    assert not tokens_of(path, tmp_path / "cache").built
    in_memory = torch.from_numpy(mapped.ids.astype(np.int64))
    for m_part, t_part in zip(split(mapped.ids, 0.1, 16), split(in_memory, 0.1, 16), strict=True):
        assert isinstance(m_part, np.ndarray) and m_part.dtype == np.uint8
        gen_a, gen_b = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
        for _ in range(50):
            xa, ya = get_batch(m_part, 8, 16, gen_a)
            xb, yb = get_batch(t_part, 8, 16, gen_b)
            assert xa.dtype == ya.dtype == torch.int64
            assert torch.equal(xa, xb) and torch.equal(ya, yb)


def _in_memory_prepare(cfg: TrainConfig, tokenizer=None, dist_info=None, progress=False) -> Corpus:
    """The data path before the token cache: the whole text in memory, int64 ids in a torch tensor."""
    text = load_corpus(cfg.data)
    tokenizer = tokenizer or CharTokenizer.from_text(text)
    train_ids, val_ids = split(torch.from_numpy(tokenizer.encode(text)), cfg.val_fraction, cfg.block_size)
    return Corpus(tokenizer, train_ids, val_ids, None, True)


def test_training_on_the_memory_map_equals_training_in_memory(corpus_text, tmp_path, monkeypatch):
    """Same seed, same batches, same loss curve, same weights (bit for bit) as the in-memory data path; and a run
    paused, its token cache deleted, then resumed (the saved vocabulary re-tokenizes) ends the same."""
    rng = random.Random(0)
    lines = corpus_text.splitlines(keepends=True)
    rng.shuffle(lines)
    data = tmp_path / "generated.txt"
    data.write_text("".join(lines) + "caf\u00e9 \u2014 na\u00efve\n", encoding="utf-8")
    cache = tmp_path / "cache"
    cfg = dict(n_updates=20, eval_interval=10, checkpoint_interval=10, token_cache=str(cache))
    mapped = train(tiny_config(tmp_path / "mapped", data, **cfg), progress=False)
    assert cache_files(cache)
    with monkeypatch.context() as m:
        m.setattr(assembly, "prepare_data", _in_memory_prepare)
        in_memory = train(tiny_config(tmp_path / "in-memory", data, **cfg), progress=False)
    paused = train(tiny_config(tmp_path / "resumed", data, **cfg), progress=False, pause_after=10)
    for p in cache.iterdir():
        p.unlink()
    resumed = train(resume_config(str(tmp_path / "resumed")), resume=True, progress=False)
    assert paused.step == 10 and mapped.step == in_memory.step == resumed.step == 20

    def run(name: str) -> tuple[list, dict]:
        evals = read_metrics(tmp_path / name)
        return [(r["step"], r["train_loss"], r["val_loss"]) for r in evals], trainstate.load_train_state(
            tmp_path / name
        )

    curve, state = run("mapped")
    assert [step for step, _, _ in curve] == [0, 10, 20] and curve[-1][2] < curve[0][2]
    for other in ("in-memory", "resumed"):
        other_curve, other_state = run(other)
        assert other_curve == curve, other
        assert state.vocab == other_state.vocab
        for name, tensor in state.model.items():
            assert torch.equal(tensor, other_state.model[name]), (other, name)


# ---------------------------------------------------------------------------------------------
# vocabulary policies: rare characters, a vocabulary file


def test_rare_characters_map_to_the_unknown_symbol_everywhere(tmp_path, corpus_text):
    data = tmp_path / "corpus.txt"
    data.write_text(corpus_text[:20_000] + "\U0001f600 \u00e9", encoding="utf-8")  # two characters seen once
    out = tmp_path / "m"
    cfg = tiny_config(out, data, n_updates=6, eval_interval=3, checkpoint_interval=3, min_char_count=2)
    train(cfg, progress=False, pause_after=3)
    train(resume_config(str(out)), resume=True, progress=False)
    model, tokenizer = ckpt.load_model(out)
    assert tokenizer.unknown == UNKNOWN and UNKNOWN in tokenizer.chars
    assert "\U0001f600" not in tokenizer.chars and "\u00e9" not in tokenizer.chars
    assert set(tokenizer.chars) == (set(corpus_text[:20_000]) - {"\u00e9"}) | {UNKNOWN}
    assert json.loads((out / "config.json").read_text())["unknown"] == UNKNOWN
    assert trainstate.load_train_state(out).unknown == UNKNOWN
    # a prompt with characters the model never saw maps them to the unknown symbol instead of failing
    assert tokenizer.encode("\u00e9\u4e2d")[0] == tokenizer.chars.index(UNKNOWN)
    assert len(generate(model, tokenizer, "caf\u00e9 \u4e2d", max_new_tokens=5, seed=0)[0]) == 5
    # and evaluation of text with unknown characters works too
    other = tmp_path / "other.txt"
    other.write_text("caf\u00e9 \u4e2d and more text\n", encoding="utf-8")
    assert evaluate_file(model, tokenizer, other, token_cache="off")["chars"] == len(other.read_text()) - 1


def test_vocab_file_fixes_the_vocabulary(tmp_path):
    vocab = tmp_path / "alphabet.txt"
    vocab.write_text("abc ", encoding="utf-8")
    data = tmp_path / "corpus.txt"
    data.write_text("abc cab xyz", encoding="utf-8")
    cfg = tiny_config(
        tmp_path / "m", data, block_size=2, val_fraction=0.5, vocab=str(vocab), token_cache=str(tmp_path / "cache")
    )
    corpus = prepare_data(cfg)
    assert corpus.tokenizer == CharTokenizer([" ", "a", "b", "c", UNKNOWN], unknown=UNKNOWN)
    ids = np.concatenate([corpus.train, corpus.val])
    assert corpus.tokenizer.decode(ids) == "abc cab " + UNKNOWN * 3
    with pytest.raises(ChargptError, match="min_char_count applies to vocab auto"):
        tiny_config(tmp_path / "m", data, vocab=str(vocab), min_char_count=3)
    with pytest.raises(ChargptError, match="vocab file .*missing.txt does not exist"):
        prepare_data(
            tiny_config(tmp_path / "m", data, block_size=2, val_fraction=0.5, vocab=str(tmp_path / "missing.txt"))
        )


# ---------------------------------------------------------------------------------------------
# DDP: the first rank builds, the others wait and map the same file


def _rank_prepares(rank: int, world: int, port: int, configs: list[dict], results: dict) -> None:
    """One rank of a gloo group: prepare_data for each config in turn, as train() does."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    info = SimpleNamespace(rank=rank, local_rank=rank, world=world)
    try:
        for i, cfg_kwargs in enumerate(configs):
            try:
                corpus = prepare_data(TrainConfig(**cfg_kwargs), None, info)
                ids = np.concatenate([corpus.train, corpus.val])
                results[rank, i] = ("ok", corpus.built, str(corpus.cache), ids.tobytes(), corpus.tokenizer.chars)
            except ChargptError as e:
                results[rank, i] = ("error", str(e))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_rank_0_builds_the_cache_and_both_map_it(tmp_path):
    data = tmp_path / "corpus.txt"
    text = write_random_text(data, random.Random(6), 50_000, "abcdefg \n\u00e9")
    (tmp_path / "bad.txt").write_bytes(b"fine text \xff then not")
    cache = tmp_path / "cache"
    configs = [
        dict(data=str(data), out=str(tmp_path / "m"), token_cache=str(cache), block_size=8),
        dict(data=str(tmp_path / "bad.txt"), out=str(tmp_path / "m"), token_cache=str(cache)),
    ]
    results = spawn_gloo_ranks(_rank_prepares, configs)
    good = results[0, 0], results[1, 0]
    assert good[0][0] == good[1][0] == "ok"
    assert (good[0][1], good[1][1]) == (True, False)  # rank 0 tokenized, rank 1 opened its cache
    assert good[0][2] == good[1][2] and Path(good[0][2]).parent == cache  # the same file
    assert good[0][3] == good[1][3] and good[0][4] == good[1][4] == sorted(set(text))
    assert len(cache_files(cache)) == 2
    # bad data: the error reaches both ranks, neither waits forever, no cache is written
    assert results[0, 1] == results[1, 1] and results[0, 1][0] == "error"
    assert "byte 0xff at offset 10" in results[0, 1][1]
    assert len(cache_files(cache)) == 2


# ---------------------------------------------------------------------------------------------
# evaluation streams the file through the cache: the same numbers as before


def test_evaluate_file_equals_evaluate_on_the_text(trained_model_dir, corpus_text, tmp_path, monkeypatch):
    model, tokenizer = ckpt.load_model(trained_model_dir)
    text = corpus_text[-5001:]  # 156 full windows of 32 and a partial one
    path = tmp_path / "held-out.txt"
    path.write_text(text, encoding="utf-8")
    expected = evaluate(model, tokenizer, text)
    monkeypatch.setattr(chunks, "CHUNK_BYTES", 777)
    assert evaluate_file(model, tokenizer, path, token_cache=str(tmp_path / "cache")) == expected
    assert evaluate_file(model, tokenizer, path, token_cache=str(tmp_path / "cache")) == expected  # from the cache
    assert evaluate_file(model, tokenizer, path, token_cache="off") == expected
    path.write_text(text + "\u4e2d", encoding="utf-8")
    with pytest.raises(ChargptError, match=r"1 character\(s\) not in the model's vocabulary: '\u4e2d'"):
        evaluate_file(model, tokenizer, path, token_cache=str(tmp_path / "cache"))


def test_eval_cli_progress_bars_only_on_a_terminal(trained_model_dir, corpus_text, tmp_path, monkeypatch):
    """`chargpt eval` draws its bars (tokenizing, with MB/s; scoring) on a terminal, not with --quiet, not
    into a pipe or file. The CLI runs in this process with stderr on a real pseudo-terminal (120 columns)."""
    import fcntl
    import pty
    import struct
    import termios

    path = tmp_path / "held-out.txt"
    path.write_text(corpus_text[-3000:], encoding="utf-8")
    main_fd, child_fd = pty.openpty()
    fcntl.ioctl(child_fd, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    os.set_blocking(main_fd, False)

    def eval_with_stderr_on(stream, *extra: str) -> str:
        cache = tmp_path / f"cache{len(extra)}-{stream.isatty()}"  # a fresh cache: tokenizing is shown too
        monkeypatch.setattr(sys, "stderr", stream)
        args = ["eval", "--model", str(trained_model_dir), "--data", str(path), "--token-cache", str(cache), *extra]
        assert main(args) == 0
        monkeypatch.setattr(sys, "stderr", sys.__stderr__)
        return drain().decode(errors="replace") if stream.isatty() else ""

    def drain() -> bytes:
        """Everything the terminal holds: one read returns at most a pty buffer's worth (4 KB)."""
        got = b""
        while True:
            try:
                chunk = os.read(main_fd, 1 << 20)
            except BlockingIOError:
                return got
            if not chunk:
                return got
            got += chunk

    with open(child_fd, "w", closefd=True) as terminal, open(tmp_path / "stderr.txt", "w") as piped:
        shown = eval_with_stderr_on(terminal)
        assert "writing token ids" in shown and "B/s" in shown and "evaluating" in shown
        assert eval_with_stderr_on(terminal, "--quiet") == ""
        eval_with_stderr_on(piped)
    os.close(main_fd)
    logged = (tmp_path / "stderr.txt").read_text()
    assert "evaluating" not in logged and "B/s" not in logged  # no bars when piped (a quick tokenization logs nothing)
