"""Paths and files from users and strangers: special files, huge safetensors headers, huge integers, NaN
weights and unreadable paths all end in one line and exit code 2, quickly and in bounded memory."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as st_save

from chargpt.cli import main
from chargpt.config import GPTConfig
from chargpt.data.tokenizer import CharTokenizer
from chargpt.model import build_model
from chargpt.storage import checkpoint as ckpt
from chargpt.storage import layout

VOCAB = list("\n !',.:;?abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def one_line_error(argv: list[str], capsys: pytest.CaptureFixture, expected: str) -> str:
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    assert rc == 2 and out == "" and err.count("\n") == 1 and err.startswith("chargpt"), (rc, out, err)
    assert "Traceback" not in err and expected in err, err
    return err


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = build_model(GPTConfig(vocab_size=len(VOCAB), block_size=16, n_embd=32, n_heads=4, n_layers=2))
    d = tmp_path / "model"
    ckpt.save_model(d, model, CharTokenizer(VOCAB))
    return d


@pytest.fixture
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "ok.txt").write_text("to be or not to be, that is the question\n" * 40, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _special(kind: str, path: Path) -> None:
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "devzero":
        path.symlink_to("/dev/zero")
    else:
        path.mkdir()


# ---------------------------------------------------------------------------------------------
# 6, 11: special files and unreadable paths wherever chargpt reads one


@pytest.mark.parametrize("kind", ["fifo", "devzero", "directory"])
def test_special_files_are_refused_before_opening(kind: str, work: Path, model_dir: Path, capsys):
    small = ["--n-embd=16", "--n-heads=2", "--n-layers=1", "--block-size=8", "--device=cpu", "--out=out"]
    what = {"fifo": "a FIFO", "devzero": "a character device", "directory": "a directory"}[kind]
    _special(kind, work / "special")
    cases = [
        (["train", "--data", "ok.txt", "--config", "special", *small], what),
        (["eval", "--model", str(model_dir), "--data", "special"], "special"),
    ]
    if kind != "directory":  # a folder is a valid --data (a folder of .txt files)
        cases.append((["train", "--data", "special", *small], what))
    for argv, expected in cases:
        one_line_error(argv, capsys, expected)
    for name in (layout.CONFIG, layout.WEIGHTS):
        broken = work / f"broken-{name}"
        shutil.copytree(model_dir, broken)
        (broken / name).unlink()
        _special(kind, broken / name)
        inside = "a symbolic link" if kind == "devzero" else what  # a model folder's files are never links
        for command in (["sample", "--max-new-tokens", "3"], ["eval", "--data", "ok.txt"]):
            one_line_error([command[0], "--model", str(broken), *command[1:]], capsys, inside)
    assert not (work / "out").exists()


@pytest.mark.parametrize("kind", ["fifo", "devzero"])
def test_a_special_train_state_is_refused(kind: str, work: Path, model_dir: Path, capsys):
    _special(kind, model_dir / layout.TRAIN_STATE)
    expected = "a symbolic link" if kind == "devzero" else "not a regular file"
    one_line_error(["train", "--resume", str(model_dir)], capsys, expected)


# Root reads anything: under root the child becomes `nobody` once Python and chargpt are loaded (the
# interpreter itself may live where `nobody` cannot read).
AS_USER = textwrap.dedent(
    """
    import json, os, sys
    # everything the commands import lazily, while still root: the checkout may be unreadable to user 65534
    # (a clone in a `mktemp -d` folder is mode 700)
    import chargpt.cli, chargpt.data.corpus, chargpt.inference.evaluate, chargpt.inference.generate
    import chargpt.storage.checkpoint, chargpt.storage.runs, chargpt.storage.trainstate, chargpt.training.outdir
    import chargpt.training.loop, chargpt.training.settings, chargpt.training.sizing
    if os.geteuid() == 0:
        os.setgid(65534)
        os.setuid(65534)
    for argv in json.loads(sys.argv[1]):
        print(chargpt.cli.main(argv), flush=True)
        print("--", file=sys.stderr, flush=True)
    """
)


def test_unreadable_paths_are_one_line_errors(tmp_path: Path, model_dir: Path):
    shared = Path(os.environ.get("TMPDIR", "/tmp")) / f"chargpt-perm-{os.getpid()}"
    shared.mkdir(mode=0o755)
    try:
        os.chmod(shared, 0o777)
        (shared / "config.toml").write_text("n_embd = 16\n")
        os.chmod(shared / "config.toml", 0o000)
        (shared / "data").mkdir()
        (shared / "data" / "a.txt").write_text("hello there\n" * 50)
        os.chmod(shared / "data", 0o000)
        model = shared / "model"
        shutil.copytree(model_dir, model)
        os.chmod(model, 0o000)
        (shared / "ro").mkdir()
        os.chmod(shared / "ro", 0o555)
        (shared / "ok.txt").write_text("hello there, how are you\n" * 50)
        os.chmod(shared / "ok.txt", 0o644)
        cases = [
            (["train", "--data", "ok.txt", "--config", "config.toml"], "cannot read config file"),
            (["train", "--data", "data", "--out", "out"], "cannot read folder data (permission denied)"),
            (["sample", "--model", "model"], "cannot read model directory model (permission denied)"),
            (["eval", "--model", "model", "--data", "ok.txt"], "cannot read model directory"),
            (["train", "--data", "ok.txt", "--out", "ro/sub/model", "--device", "cpu"], "cannot write to ro/sub/model"),
        ]
        r = subprocess.run(
            [sys.executable, "-c", AS_USER, json.dumps([argv for argv, _ in cases])],
            cwd=shared,
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "HOME": str(shared), "XDG_CACHE_HOME": str(shared / "cache")},
        )
        assert r.stdout.split() == ["2"] * len(cases), (r.stdout, r.stderr)
        errors = r.stderr.split("--\n")[:-1]
        for (argv, expected), err in zip(cases, errors, strict=True):
            assert err.count("\n") == 1 and expected in err, (argv, err)
        assert not (shared / "ro" / "sub").exists()
    finally:
        for p in (shared, *shared.rglob("*")):
            if not p.is_symlink():
                os.chmod(p, 0o700)
        shutil.rmtree(shared)


# ---------------------------------------------------------------------------------------------
# 5: the safetensors header is checked (by safetensors against the file, then against the config) before any data
# is read


def _header_file(path: Path, header: dict, data: bytes = b"") -> None:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def _hostile_headers(model_dir: Path) -> dict[str, tuple[dict, bytes]]:
    raw = (model_dir / layout.WEIGHTS).read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header, data = json.loads(raw[8 : 8 + n]), raw[8 + n :]
    name = "tok_emb.weight" if "tok_emb.weight" in header else sorted(k for k in header if k != "__metadata__")[0]
    huge = dict(header)
    huge[name] = {"dtype": "F32", "shape": [2_000_000_000, 4], "data_offsets": [0, 32_000_000_000]}
    lying = dict(header)
    lying[name] = {**header[name], "data_offsets": [0, 2**62]}
    wrong_dtype = dict(header)
    wrong_dtype[name] = {**header[name], "dtype": "I64"}
    extra = dict(header)
    extra["x" * 1000] = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}
    return {
        "multi-GB tensor": (huge, data),
        "offsets past the end": (lying, data),
        "integer dtype": (wrong_dtype, data),
        "unknown tensor": (extra, data),
        "truncated data": (header, data[: len(data) // 2]),
    }


def test_hostile_safetensors_headers_are_refused_in_bounded_memory(model_dir: Path, tmp_path: Path):
    """Under a 2.5 GB address-space cap (torch itself takes ~1 GB of it) a header claiming 32 GB must be
    refused from the header alone; reading the data first would fail the cap with a traceback."""
    dirs = []
    for i, (label, (header, data)) in enumerate(_hostile_headers(model_dir).items()):
        d = tmp_path / f"hostile{i}"
        shutil.copytree(model_dir, d)
        _header_file(d / layout.WEIGHTS, header, data)
        dirs.append((label, d))
    length = tmp_path / "length"  # an 8-byte length field claiming an exabyte of header
    shutil.copytree(model_dir, length)
    (length / layout.WEIGHTS).write_bytes(struct.pack("<Q", 2**60) + b"{}")
    dirs.append(("header length", length))
    script = textwrap.dedent(
        """
        import resource, sys
        resource.setrlimit(resource.RLIMIT_AS, (2_500_000_000, 2_500_000_000))
        from chargpt.cli import main
        for d in sys.argv[1:]:
            code = main(["sample", "--model", d, "--max-new-tokens", "3", "--device", "cpu"])
            print(code, flush=True)
        """
    )
    r = subprocess.run(
        [sys.executable, "-c", script, *(str(d) for _, d in dirs)], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert r.stdout.split() == ["2"] * len(dirs), r.stdout
    lines = r.stderr.splitlines()
    assert len(lines) == len(dirs) and all("model.safetensors" in line for line in lines), lines
    # safetensors' own header checks (safe_open) say what is wrong before chargpt compares names and shapes
    assert "invalid offset" in lines[0] and "invalid offset" in lines[1] and "data type" in lines[2], lines
    assert "not fully covered" in lines[4] and "header too large" in lines[5], lines


# ---------------------------------------------------------------------------------------------
# 9: integers past 2**63 (and other absurd values) in flags, TOML, config.json and train_state.pt


HUGE = str(2**64 + 1)


@pytest.mark.parametrize(
    "flag",
    ["--n-updates", "--batch-size", "--n-embd", "--block-size", "--eval-iters", "--seed", "--warmup-updates"],
)
def test_huge_integer_flags(flag: str, work: Path, capsys):
    one_line_error(["train", "--data", "ok.txt", "--out", "out", flag, HUGE], capsys, "must be")
    assert not (work / "out").exists()


def test_huge_integers_in_toml_and_config_json(work: Path, model_dir: Path, capsys):
    for key in ("n_updates", "eval_iters", "seed", "n_layers"):
        (work / "c.toml").write_text(f"{key} = {2**63 - 1}\n")
        one_line_error(["train", "--data", "ok.txt", "--config", "c.toml"], capsys, key)
    (work / "big.toml").write_text("n_updates = [" + ", ".join(["1"] * 200_000) + "]\n")
    err = one_line_error(["train", "--data", "ok.txt", "--config", "big.toml"], capsys, "n_updates")
    assert len(err) < 400, len(err)  # the 2M-element array is not echoed
    config = json.loads((model_dir / layout.CONFIG).read_text())
    for key, value in (("block_size", 2**63), ("n_embd", 2**64), ("vocab_size", 10**30)):
        bad = {**config, "model": {**config["model"], key: value}}
        (model_dir / layout.CONFIG).write_text(json.dumps(bad))
        one_line_error(["eval", "--model", str(model_dir), "--data", "ok.txt"], capsys, key)


def test_huge_integers_in_the_train_state_config(work: Path, capsys, text_file: Path):
    from chargpt.training.loop import train
    from conftest import tiny_config

    out = work / "run"
    train(tiny_config(out, text_file, n_updates=2, eval_interval=2, eval_iters=1), progress=False)
    capsys.readouterr()
    state = torch.load(out / layout.TRAIN_STATE, weights_only=True)
    for key in ("n_updates", "eval_iters", "batch_size"):
        torch.save({**state, "config": {**state["config"], key: 2**63 + 7}}, out / layout.TRAIN_STATE)
        one_line_error(["train", "--resume", str(out)], capsys, key)


# ---------------------------------------------------------------------------------------------
# 13: NaN weights


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_weights_are_refused_at_load_time(value: float, work: Path, model_dir: Path, capsys):
    model, tokenizer = ckpt.load_model(model_dir)
    with torch.no_grad():
        next(model.parameters())[0, 0] = value
    ckpt.save_model(model_dir, model, tokenizer)
    before = tree(model_dir)
    for argv in (["sample", "--max-new-tokens", "5"], ["eval", "--data", "ok.txt"]):
        one_line_error([argv[0], "--model", str(model_dir), *argv[1:]], capsys, "NaN or infinite weights")
    assert tree(model_dir) == before


def test_eval_output_is_always_json(work: Path, model_dir: Path, capsys):
    """Finite weights whose logits overflow: an error, never `{"loss": NaN}` on stdout."""
    model, tokenizer = ckpt.load_model(model_dir)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight") and p.dim() == 2:
                p.fill_(3e38)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    raw = (model_dir / layout.WEIGHTS).read_bytes()
    n = int.from_bytes(raw[:8], "little")
    meta = json.loads(raw[8 : 8 + n])["__metadata__"]
    (model_dir / layout.WEIGHTS).write_bytes(st_save(state, metadata=meta))
    rc = main(["eval", "--model", str(model_dir), "--data", "ok.txt"])
    out, err = capsys.readouterr()
    if rc == 0:
        json.loads(out, parse_constant=lambda c: pytest.fail(f"not JSON: {c}"))
    else:
        assert rc == 2 and out == "" and err.count("\n") == 1, err


def test_a_lone_surrogate_in_a_vocabulary_is_one_line(model_dir: Path, capsys):
    """JSON can spell a lone surrogate ("\\ud800"); no text can be written with one: info, info --json and sample
    printed a traceback (and serve cut its stream)."""
    config = json.loads((model_dir / layout.CONFIG).read_text())
    config["vocab"][-1] = "\ud800"
    (model_dir / layout.CONFIG).write_text(json.dumps(config))
    (model_dir / layout.WEIGHTS).unlink()  # the config is read first: the weights' own copy plays no part here
    for argv in (["info", str(model_dir)], ["info", str(model_dir), "--json"], ["sample", "--model", str(model_dir)]):
        one_line_error(argv, capsys, "lone surrogate")


def test_a_config_claiming_a_million_layers_is_refused_at_once(model_dir: Path, capsys):
    """The check that costs nothing comes first: no model skeleton of a million layers is built (that took
    minutes in info and sample). Both copies of the config say so: config.json and the one inside the weights."""
    from safetensors.torch import load_file, save_file

    config = json.loads((model_dir / layout.CONFIG).read_text())
    config["model"]["n_layers"] = 1_000_000
    text = json.dumps(config)
    (model_dir / layout.CONFIG).write_text(text)
    weights = load_file(model_dir / layout.WEIGHTS)
    save_file(weights, model_dir / layout.WEIGHTS, metadata={"format": ckpt.FORMAT_NAME, "config": text})
    t0 = time.perf_counter()
    for argv in (["info", str(model_dir)], ["sample", "--model", str(model_dir), "--max-new-tokens", "2"]):
        one_line_error(argv, capsys, "too few for n_layers=1000000")
    assert time.perf_counter() - t0 < 30
