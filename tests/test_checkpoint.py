"""Model directories: atomic writes, hostile or broken files, and fuzzing of the config and vocabulary loaders."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save as st_save

from chargpt.config import GPTConfig
from chargpt.data.tokenizer import CharTokenizer
from chargpt.errors import ChargptError
from chargpt.model import build_model
from chargpt.storage import checkpoint as ckpt
from conftest import run_cli

VOCAB = list("\n !',.:;?abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


def _model(seed: int, **shape: int):
    torch.manual_seed(seed)
    cfg = GPTConfig(**{"vocab_size": len(VOCAB), "block_size": 16, "n_embd": 32, "n_heads": 4, "n_layers": 2, **shape})
    return build_model(cfg), CharTokenizer(VOCAB)


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    d = tmp_path / "model"
    ckpt.save_model(d, *_model(0), info={"step": 1})
    return d


def _evil_pickle(marker: Path) -> bytes:
    """A pickle whose loading creates `marker`: what a hostile 'model file' would carry."""

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    return pickle.dumps(Evil())


# ------------------------------------------------------------------------------------------------
# saving


def test_save_load_round_trip_and_file_layout(model_dir: Path):
    model, tok = ckpt.load_model(model_dir)
    assert _same_weights(model, _model(0)[0]) and tok == CharTokenizer(VOCAB) and not model.training
    assert sorted(p.name for p in model_dir.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((model_dir / "config.json").read_text())
    assert config["format_version"] == ckpt.FORMAT_VERSION and config["info"] == {"step": 1}


def test_unknown_symbol_round_trips_and_older_configs_have_none(model_dir: Path, tmp_path: Path):
    """config.json gains "unknown" only for a vocabulary that has one: other models' files are as before."""
    assert "unknown" not in json.loads((model_dir / "config.json").read_text())
    assert ckpt.load_model(model_dir)[1].unknown is None
    model = build_model(GPTConfig(vocab_size=3, block_size=8, n_embd=16, n_heads=2, n_layers=1))
    tok = CharTokenizer(["a", "b", "\ufffd"], unknown="\ufffd")
    ckpt.save_model(tmp_path / "m", model, tok)
    assert json.loads((tmp_path / "m" / "config.json").read_text(encoding="utf-8"))["unknown"] == "\ufffd"
    loaded = ckpt.load_model(tmp_path / "m")[1]
    assert loaded == tok and loaded.encode("abz").tolist() == [0, 1, 2]


def test_crash_between_the_two_renames_still_loads_the_new_model(model_dir: Path, tmp_path: Path):
    """--overwrite with a different model, killed after the weights' rename but before config.json's."""
    other = tmp_path / "other"
    new_tok = CharTokenizer(VOCAB[:-5])
    torch.manual_seed(1)
    new_model = build_model(GPTConfig(vocab_size=len(new_tok.chars), block_size=8, n_embd=48, n_heads=4, n_layers=3))
    ckpt.save_model(other, new_model, new_tok)
    os.replace(other / "model.safetensors", model_dir / "model.safetensors")  # the old config.json stays
    loaded, tok = ckpt.load_model(model_dir)
    assert tok == new_tok and _same_weights(loaded, new_model)


def _exited_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_stale_temp_files_are_cleaned_on_the_next_save(model_dir: Path):
    """chargpt's own temp files of a writer that is gone are removed; a user's look-alikes stay, byte for byte."""
    dead = _exited_pid()
    ours = [f".model.safetensors.chargpt-{dead}-abc123.tmp", f".config.json.chargpt-{dead}-x_1.tmp"]
    users = [".model.safetensors.abc123.tmp", ".config.json.x.tmp", f".config.json.chargpt-{os.getpid()}-a.tmp"]
    for name in ours + users:
        (model_dir / name).write_bytes(b"half a file")
    ckpt.save_model(model_dir, *_model(2))
    assert sorted(p.name for p in model_dir.iterdir() if p.name.endswith(".tmp")) == sorted(users)
    assert all((model_dir / name).read_bytes() == b"half a file" for name in users)
    assert _same_weights(ckpt.load_model(model_dir)[0], _model(2)[0])


def test_disk_full_mid_save_keeps_the_old_files(model_dir: Path):
    """A real failed write: RLIMIT_FSIZE makes write() fail with EFBIG, as a full disk fails with ENOSPC."""
    before = _snapshot(model_dir)
    script = textwrap.dedent(
        f"""
        import resource, signal, sys
        import torch
        from chargpt.storage import checkpoint as ckpt
        from chargpt.config import GPTConfig
        from chargpt.model import build_model
        from chargpt.data.tokenizer import CharTokenizer
        from chargpt.errors import ChargptError
        vocab = {VOCAB!r}
        torch.manual_seed(5)
        model = build_model(GPTConfig(vocab_size=len(vocab), block_size=16, n_embd=32, n_heads=4, n_layers=2))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills us instead of failing the write
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))
        try:
            ckpt.save_model({str(model_dir)!r}, model, CharTokenizer(vocab))
        except ChargptError as e:
            print(e)
            sys.exit(2)
        """
    )
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "file-size limit" in r.stdout and "model.safetensors" in r.stdout  # (ulimit -f stands in for a full disk)
    assert _snapshot(model_dir) == before  # old files byte for byte, and no temp file left


# ------------------------------------------------------------------------------------------------
# hostile and broken directories


def _mutate_config(d: Path, change) -> None:
    config = json.loads((d / "config.json").read_text())
    change(config)
    (d / "config.json").write_text(json.dumps(config))


def _drop_embedded_config(d: Path) -> None:
    """Rewrite the weights without their config copy, so config.json alone decides (an older writer's file)."""
    model, _ = _model(0)
    (d / "model.safetensors").write_bytes(st_save(dict(model.state_dict()), metadata={"format": "chargpt-model"}))


BROKEN = {
    "truncated weights": lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:5000]),
    "random weights": lambda d: (d / "model.safetensors").write_bytes(os.urandom(4096)),
    "empty weights": lambda d: (d / "model.safetensors").write_bytes(b""),
    "missing weights": lambda d: (d / "model.safetensors").unlink(),
    "missing config": lambda d: (d / "config.json").unlink(),
    "config not JSON": lambda d: (d / "config.json").write_text("{'format': chargpt"),
    "config not UTF-8": lambda d: (d / "config.json").write_bytes(b"\xff\xfe{}"),
    "config a list": lambda d: (d / "config.json").write_text("[1, 2]"),
    "deeply nested config": lambda d: (d / "config.json").write_text("[" * 100_000 + "]" * 100_000),
    "missing key": lambda d: _mutate_config(d, lambda c: c.pop("vocab")),
    "extra key": lambda d: _mutate_config(d, lambda c: c.update({"evil\nkey": 1})),
    "missing model key": lambda d: _mutate_config(d, lambda c: c["model"].pop("n_embd")),
    "extra model key": lambda d: _mutate_config(d, lambda c: c["model"].update({"bias": True})),
    "wrong format version": lambda d: _mutate_config(d, lambda c: c.update({"format_version": 99})),
    "wrong format": lambda d: _mutate_config(d, lambda c: c.update({"format": "pytorch"})),
    "vocab with duplicates": lambda d: _mutate_config(d, lambda c: c["vocab"].__setitem__(1, "a")),
    "vocab of strings": lambda d: _mutate_config(d, lambda c: c["vocab"].__setitem__(1, "ab")),
    "vocab size disagrees": lambda d: _mutate_config(d, lambda c: c["vocab"].append("\u00e9")),
    "unknown symbol not in vocab": lambda d: _mutate_config(d, lambda c: c.update({"unknown": "\ufffd"})),
    "unknown symbol not a character": lambda d: _mutate_config(d, lambda c: c.update({"unknown": ["a"]})),
    "shapes disagree with config": lambda d: (
        _drop_embedded_config(d),
        _mutate_config(d, lambda c: c["model"].update({"n_embd": 64})),
    ),
    "huge model in config": lambda d: (
        _drop_embedded_config(d),
        _mutate_config(d, lambda c: c["model"].update({"n_embd": 2**40, "n_heads": 2**20, "block_size": 2**40})),
    ),
    "many layers in config": lambda d: (
        _drop_embedded_config(d),
        _mutate_config(d, lambda c: c["model"].update({"n_layers": 10**12})),
    ),
    "embedded config disagrees with tensors": lambda d: (d / "model.safetensors").write_bytes(
        st_save(
            dict(_model(0)[0].state_dict()),
            metadata={"config": (d / "config.json").read_text().replace('"n_layers": 2', '"n_layers": 3')},
        )
    ),
    "embedded config not JSON": lambda d: (d / "model.safetensors").write_bytes(
        st_save(dict(_model(0)[0].state_dict()), metadata={"config": "{not json"})
    ),
    "integer weights": lambda d: (d / "model.safetensors").write_bytes(
        st_save({k: v.to(torch.int32) for k, v in _model(0)[0].state_dict().items()})
    ),
}


@pytest.mark.parametrize("breakage", sorted(BROKEN))
def test_broken_model_dir_is_a_one_line_error(model_dir: Path, breakage: str):
    BROKEN[breakage](model_dir)
    before = _snapshot(model_dir)
    with pytest.raises(ChargptError) as e:
        ckpt.load_model(model_dir)
    assert "\n" not in str(e.value) and len(str(e.value)) < 400
    assert _snapshot(model_dir) == before


def test_pickle_renamed_to_safetensors_never_runs(model_dir: Path, tmp_path: Path):
    control = tmp_path / "control-marker"
    pickle.loads(_evil_pickle(control))  # the payload is real: plain unpickling runs it
    assert control.exists()
    marker = tmp_path / "marker"
    (model_dir / "model.safetensors").write_bytes(_evil_pickle(marker))
    before = _snapshot(model_dir)
    with pytest.raises(ChargptError, match="not a valid safetensors file"):
        ckpt.load_model(model_dir)
    r = run_cli("sample", "--model", str(model_dir), "--max-new-tokens", "5")
    assert r.returncode == 2 and r.stderr.startswith("chargpt: error:") and r.stderr.count("\n") == 1
    assert "Traceback" not in r.stderr
    assert not marker.exists() and _snapshot(model_dir) == before


@pytest.mark.parametrize("breakage", ["config not JSON", "shapes disagree with config"])
def test_broken_model_dir_through_the_cli(model_dir: Path, breakage: str, text_file: Path):
    BROKEN[breakage](model_dir)
    before = _snapshot(model_dir)
    r = run_cli("eval", "--model", str(model_dir), "--data", str(text_file))
    assert r.returncode == 2 and r.stderr.startswith("chargpt: error:") and r.stderr.count("\n") == 1, r.stderr
    assert _snapshot(model_dir) == before


# ------------------------------------------------------------------------------------------------
# fuzzing: only ChargptError may escape the loaders

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=30,
)
VALID = {
    "format": "chargpt-model",
    "format_version": 1,
    "model": {
        "vocab_size": 3,
        "block_size": 16,
        "n_embd": 32,
        "n_heads": 4,
        "n_layers": 2,
        "dropout": 0.0,
        "model": "gpt",
    },
    "vocab": ["a", "b", "c"],
    "info": {},
}


@settings(max_examples=300, deadline=None)
@given(st.one_of(json_values, st.binary(max_size=200)))
def test_fuzz_config_loader_arbitrary_values(value):
    data = value if isinstance(value, bytes) else json.dumps(value)
    try:
        cfg, tok, info = ckpt.parse_config(data, "config.json")
    except ChargptError as e:
        assert "\n" not in str(e)
    else:
        assert cfg.vocab_size == tok.vocab_size and isinstance(info, dict)


@st.composite
def mutated_configs(draw):
    config = json.loads(json.dumps(VALID))
    for _ in range(draw(st.integers(1, 3))):
        dicts = [config] + ([config["model"]] if isinstance(config.get("model"), dict) else [])
        where = draw(st.sampled_from(dicts))
        key = draw(st.sampled_from(sorted(where) or [""]) | st.text(max_size=8))
        action = draw(st.sampled_from(["set", "delete"]))
        if action == "delete":
            where.pop(key, None)
        else:
            where[key] = draw(json_values | st.integers(-(2**70), 2**70) | st.sampled_from([0, 1, -1, 2**31, 1e308]))
    return config


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutated_configs())
def test_fuzz_load_model_on_mutated_configs(tmp_path: Path, config):
    """Weights without an embedded config, so the mutated config.json is what the loader must survive."""
    d = tmp_path / "fuzz"
    d.mkdir(exist_ok=True)
    model = build_model(GPTConfig(**{"arch" if k == "model" else k: v for k, v in VALID["model"].items()}))
    (d / "model.safetensors").write_bytes(st_save(dict(model.state_dict())))
    (d / "config.json").write_text(json.dumps(config))
    try:
        loaded, tok = ckpt.load_model(d)
    except ChargptError as e:
        assert "\n" not in str(e)
    else:
        assert _same_weights(loaded, model) and tok.vocab_size == loaded.config.vocab_size


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.text(max_size=3), st.integers(), st.none(), st.floats(), st.characters()), max_size=30))
def test_fuzz_tokenizer_loader(chars):
    try:
        tok = CharTokenizer(chars)
    except ChargptError as e:
        assert "\n" not in str(e)
        assert (
            not chars
            or len(set(map(repr, chars))) != len(chars)
            or any(not isinstance(c, str) or len(c) != 1 for c in chars)
        )
    else:
        text = "".join(chars)
        assert tok.decode(tok.encode(text)) == text and tok.vocab_size == len(chars)
