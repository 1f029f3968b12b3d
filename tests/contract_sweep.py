"""The CLI's contract, swept with hypothesis under an address-space cap (run by test_contract_sweep.py).

Every generated input is wrong in at least one way, so every run must end the same way: exit code 2, at
most two lines on stderr, no traceback, and no file changed anywhere in the sandbox (chargpt may create and
remove its own output folder, nothing more). Usage: python contract_sweep.py WORKDIR EXAMPLES
"""

from __future__ import annotations

import resource
import sys

CAP = 3 << 30  # bytes of address space: torch takes about 1 GB of it; a runaway read or allocation fails fast
resource.setrlimit(resource.RLIMIT_AS, (CAP, CAP))

import contextlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import struct  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from safetensors.torch import load as st_load  # noqa: E402
from safetensors.torch import save as st_save  # noqa: E402

from chargpt.cli import main  # noqa: E402
from chargpt.config import GPTConfig  # noqa: E402
from chargpt.data.tokenizer import CharTokenizer  # noqa: E402
from chargpt.model import build_model  # noqa: E402
from chargpt.storage import checkpoint as ckpt  # noqa: E402
from chargpt.storage import layout  # noqa: E402

WORK = Path(sys.argv[1])
EXAMPLES = int(sys.argv[2])
SANDBOX = WORK / "sandbox"
TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n" * 60

# ---------------------------------------------------------------------------------------------
# the sandbox: inputs of every kind, good and bad


def make_sandbox() -> Path:
    SANDBOX.mkdir(parents=True)
    (SANDBOX / "ok.txt").write_text(TEXT)
    (SANDBOX / "empty.txt").write_bytes(b"")
    (SANDBOX / "utf16.txt").write_text(TEXT[:200], encoding="utf-16")
    (SANDBOX / "binary.bin").write_bytes(bytes(range(256)) * 4)
    (SANDBOX / "emptydir").mkdir()
    os.mkfifo(SANDBOX / "fifo")
    (SANDBOX / "zero").symlink_to("/dev/zero")
    (SANDBOX / "dangling").symlink_to(SANDBOX / "nowhere")
    (SANDBOX / "bad.toml").write_text("n_embd = [\n")
    (SANDBOX / "unknown.toml").write_text("num_layers = 2\n")
    (SANDBOX / "huge.toml").write_text("n_updates = [" + ", ".join(["1"] * 50_000) + "]\n")
    (SANDBOX / "bigint.toml").write_text(f"n_embd = {2**63 - 1}\n")
    user = SANDBOX / "users-folder"
    user.mkdir()
    (user / "metrics.jsonl").write_text('{"mine": 1}\n')
    (user / "loss.png").write_bytes(b"\x89PNG mine")
    torch.manual_seed(0)
    vocab = sorted(set(TEXT))
    model = build_model(GPTConfig(len(vocab), block_size=16, n_embd=16, n_heads=2, n_layers=1, dropout=0.0))
    ckpt.save_model(SANDBOX / "model", model, CharTokenizer(vocab))
    state = {
        "step": 3,
        "elapsed": 1.0,
        "best_val_loss": 3.0,
        "model": model.state_dict(),
        "optimizer": {"state": {}, "param_groups": []},
        "rng": {"torch": torch.get_rng_state(), "batches": torch.get_rng_state(), "numpy_keys": torch.zeros(3)},
        "vocab": vocab,
        "config": {"data": "ok.txt", "n_embd": 16, "n_heads": 2, "n_layers": 1, "block_size": 16},
    }
    state["rng"].update(numpy_pos=0, python=[0])
    torch.save(state, SANDBOX / "model" / layout.TRAIN_STATE)
    return SANDBOX


def tree() -> dict[str, tuple]:
    """Every entry of the sandbox: kind, size and content hash of regular files."""
    out = {}
    for root, dirs, files in os.walk(SANDBOX):
        for name in dirs + files:
            p = Path(root) / name
            st_ = p.lstat()
            data = p.read_bytes() if p.is_file() and not p.is_symlink() else b""
            out[str(p.relative_to(SANDBOX))] = (st_.st_mode, st_.st_size, hash(data))
    return out


def run(argv: list[str]) -> tuple[int, str]:
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            rc = main(argv)
        except SystemExit as e:
            rc = e.code
    return rc, err.getvalue()


def assert_contract(argv: list[str], before: dict) -> None:
    rc, err = run(argv)
    lines = err.strip().splitlines()
    assert rc == 2, f"{argv}: exit code {rc}, stderr {err!r}"
    assert 1 <= len(lines) <= 2 and "Traceback" not in err, f"{argv}: stderr {err!r}"
    assert len(err) < 4000, f"{argv}: {len(err)} characters on stderr"
    after = tree()
    assert after == before, f"{argv}: the sandbox changed: {sorted(set(after.items()) ^ set(before.items()))[:4]}"


# ---------------------------------------------------------------------------------------------
# flag values: one certainly wrong, the others anything


INT_FLAGS = {
    "n-updates": 10**12,
    "batch-size": 2**31 - 1,
    "gradient-accumulation-steps": 2**31 - 1,
    "eval-interval": 10**12,
    "eval-iters": 10**6,
    "checkpoint-interval": 10**12,
    "block-size": 2**31 - 1,
    "n-embd": 2**31 - 1,
    "n-heads": 2**31 - 1,
    "n-layers": 2**31 - 1,
}
FLOAT_FLAGS = {  # (lowest valid, highest valid, whether the bounds themselves are valid)
    "learning-rate": (0.0, math.inf, False),
    "val-fraction": (0.0, 1.0, False),
    "min-lr-ratio": (0.0, 1.0, True),
    "beta2": (0.0, 1.0, False),
    "dropout": (0.0, 1.0, None),  # [0, 1)
    "weight-decay": (0.0, math.inf, None),
    "grad-clip": (0.0, math.inf, None),
    "max-time": (0.0, math.inf, None),
}


def _int_ok(text: str, low: int, high: int) -> bool:
    try:
        return low <= int(text) <= high
    except ValueError:
        return False


def bad_int(low: int, high: int) -> st.SearchStrategy[str]:
    numbers = st.one_of(st.integers(max_value=low - 1), st.integers(min_value=high + 1, max_value=high + 2**200))
    junk = st.text(max_size=12).filter(lambda s: not _int_ok(s, low, high))
    fixed = st.sampled_from(["1.5", "1e3", "", "nan", "0x10", str(2**64), "-0"])
    fixed = fixed.filter(lambda s: not _int_ok(s, low, high))
    return st.one_of(numbers.map(str), junk, fixed)


def _float_ok(text: str, low: float, high: float, closed: bool | None) -> bool:
    try:
        v = float(text)
    except ValueError:
        return False
    if closed is None:
        return low <= v < high or (high == math.inf and low <= v < high)
    return (low <= v <= high) if closed else (low < v < high)


def bad_float(low: float, high: float, closed: bool | None) -> st.SearchStrategy[str]:
    fixed = ["nan", "-inf", "inf", "-1e-9", "1e400", "", "abc", "1,5"]
    numbers = st.floats(allow_nan=True, allow_infinity=True).map(repr)
    return st.one_of(st.sampled_from(fixed), numbers, st.text(max_size=8)).filter(
        lambda s: not _float_ok(s, low, high, closed)
    )


BAD_PATHS = ["fifo", "zero", "dangling", "missing.txt", "empty.txt", "utf16.txt", "binary.bin", "emptydir"]
BAD: dict[str, st.SearchStrategy[str]] = {
    **{f: bad_int(1, high) for f, high in INT_FLAGS.items()},
    "warmup-updates": bad_int(0, 10**12),
    "seed": bad_int(0, 2**32 - 1),
    **{f: bad_float(*bounds) for f, bounds in FLOAT_FLAGS.items()},
    "model": st.text(max_size=10).filter(lambda s: s not in ("gpt", "bigram")),
    "device": st.text(max_size=10).filter(lambda s: s not in ("auto", "cpu", "cuda") and not s.startswith("cuda:")),
    "data": st.sampled_from(BAD_PATHS),
    "config": st.sampled_from(["fifo", "zero", "emptydir", "missing.toml", "bad.toml", "unknown.toml", "huge.toml"])
    | st.just("bigint.toml"),
    "out": st.sampled_from(["", " ", "ok.txt", "ok.txt/sub", "users-folder", "model", "zero", "fifo"]),
    "resume": st.sampled_from(["emptydir", "missing", "ok.txt", "users-folder", "fifo"]),
    "nproc": st.sampled_from(["0", "-1", "x", ""]),
}
GOOD: dict[str, st.SearchStrategy[str]] = {
    "n-updates": st.sampled_from(["1", "2"]),
    "batch-size": st.sampled_from(["2", "4"]),
    "block-size": st.sampled_from(["8", "16"]),
    "n-embd": st.sampled_from(["8", "16"]),
    "n-heads": st.sampled_from(["1", "2"]),
    "n-layers": st.sampled_from(["1"]),
    "eval-iters": st.sampled_from(["1"]),
    "learning-rate": st.sampled_from(["0.001", "1e-2"]),
    "dropout": st.sampled_from(["0", "0.1"]),
    "device": st.sampled_from(["cpu"]),
    "seed": st.sampled_from(["0", "7"]),
}


@st.composite
def bad_command(draw: st.DrawFn) -> list[str]:
    flag = draw(st.sampled_from(sorted(BAD)))
    value = draw(BAD[flag])
    others = draw(st.dictionaries(st.sampled_from(sorted(set(GOOD) - {flag})), st.none(), max_size=4))
    argv = ["train", "--quiet"]
    if flag not in ("data", "resume"):
        argv += ["--data", "ok.txt"]
    if flag not in ("out", "resume"):
        argv += ["--out", "new-run"]
    for other in others:
        argv += [f"--{other}", draw(GOOD[other])]
    return [*argv, f"--{flag}={value}"]  # "--flag=value": a value may start with "-"


VOCAB = set(TEXT)
SAMPLE_BAD: dict[str, st.SearchStrategy[str]] = {
    "max-new-tokens": st.one_of(st.integers(max_value=-1).map(str), st.sampled_from(["", "x", "1.0", "nan"])),
    "temperature": bad_float(0.0, math.inf, None),
    "top-k": st.one_of(st.integers(max_value=0).map(str), st.sampled_from(["", "x", "1.5"])),
    "top-p": bad_float(0.0, 1.0, False).filter(lambda s: s.strip() not in ("1", "1.0")),
    "seed": bad_int(0, 2**63 - 1),
    "num-samples": st.one_of(st.integers(max_value=0), st.integers(min_value=2**40, max_value=2**62)).map(str),
    "device": BAD["device"],
    "model": st.sampled_from(["fifo", "zero", "emptydir", "missing", "ok.txt", "users-folder", "dangling"]),
    "prompt": st.text(min_size=1, max_size=8).filter(lambda s: not set(s) <= VOCAB),
    "stop": st.just(""),
}
SAMPLE_GOOD: dict[str, st.SearchStrategy[str]] = {
    "max-new-tokens": st.sampled_from(["1", "2"]),
    "temperature": st.sampled_from(["0", "0.8"]),
    "top-k": st.sampled_from(["1", "5"]),
    "seed": st.sampled_from(["0", "3"]),
    "num-samples": st.sampled_from(["1", "2"]),
}


@st.composite
def bad_sample_command(draw: st.DrawFn) -> list[str]:
    flag = draw(st.sampled_from(sorted(SAMPLE_BAD)))
    argv = ["sample", "--max-new-tokens", "2"] + ([] if flag == "model" else ["--model", "model"])
    for other in draw(st.dictionaries(st.sampled_from(sorted(set(SAMPLE_GOOD) - {flag})), st.none(), max_size=3)):
        argv += [f"--{other}", draw(SAMPLE_GOOD[other])]
    return [*argv, f"--{flag}={draw(SAMPLE_BAD[flag])}"]


@settings(
    max_examples=EXAMPLES, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck)
)
@given(st.one_of(bad_command(), bad_sample_command()))
def sweep_flags(argv: list[str]) -> None:
    assert_contract(argv, tree())


# ---------------------------------------------------------------------------------------------
# model directories: a valid one, broken in one generated way


def _header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _write_header(path: Path, header: dict, data: bytes, length: int | None = None) -> None:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text) if length is None else length) + text + data)


ODD_VALUES = st.one_of(
    st.integers(min_value=-(2**70), max_value=0),
    st.integers(min_value=2**31, max_value=2**80),
    st.text(max_size=5),
    st.lists(st.integers(), max_size=3),
    st.none(),
    st.sampled_from([math.nan, math.inf, 1.5, True]),
)


@st.composite
def broken_model(draw: st.DrawFn) -> tuple[str, object]:
    kind = draw(
        st.sampled_from(
            ["config-value", "config-drop", "config-text", "vocab", "truncate", "header", "length", "nan", "special"]
        )
    )
    if kind == "config-value":
        return kind, (
            draw(st.sampled_from(["vocab_size", "block_size", "n_embd", "n_heads", "n_layers"])),
            draw(ODD_VALUES),
        )
    if kind == "config-drop":
        return kind, draw(st.sampled_from(["format", "format_version", "model", "vocab"]))
    if kind == "config-text":
        return kind, draw(st.integers(min_value=0, max_value=200))
    if kind == "vocab":
        return kind, draw(st.sampled_from(["dup", "long", "short", "int"]))
    if kind == "truncate":
        return kind, draw(st.floats(min_value=0.0, max_value=0.999))
    if kind == "header":
        field = draw(st.sampled_from(["shape", "dtype", "data_offsets"]))
        value = draw(
            st.one_of(
                st.lists(st.integers(min_value=-5, max_value=2**40), max_size=3),
                st.sampled_from(["I64", "U8", "F8", "BOOL", "", None]),
            )
        )
        return kind, (field, value, draw(st.integers(min_value=0, max_value=50)))
    if kind == "length":
        return kind, draw(st.integers(min_value=0, max_value=2**64 - 1))
    if kind == "nan":
        return kind, draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    return kind, (
        draw(st.sampled_from([layout.CONFIG, layout.WEIGHTS])),
        draw(st.sampled_from(["fifo", "zero", "dir"])),
    )


def apply(kind: str, arg: object, d: Path) -> None:
    config_path, weights = d / layout.CONFIG, d / layout.WEIGHTS
    config = json.loads(config_path.read_text())
    if kind == "config-value":
        key, value = arg
        if value == config["model"][key]:
            value = -1
        config["model"][key] = value
        config_path.write_text(json.dumps(config))
    elif kind == "config-drop":
        del config[arg]
        config_path.write_text(json.dumps(config))
    elif kind == "config-text":
        text = config_path.read_bytes()
        config_path.write_bytes(text[: min(arg, len(text) - 1)])
    elif kind == "vocab":
        vocab = config["vocab"]
        config["vocab"] = {"dup": [vocab[0], *vocab[:-1]], "long": ["ab", *vocab[1:]], "short": vocab[:-1]}.get(
            arg, [1, *vocab[1:]]
        )
        config_path.write_text(json.dumps(config))
        weights.write_bytes(b"")  # the embedded config would win over config.json: break both
    elif kind == "truncate":
        data = weights.read_bytes()
        weights.write_bytes(data[: int(len(data) * arg)])
    elif kind == "header":
        field, value, pick = arg
        header, data = _header(weights)
        names = sorted(k for k in header if k != "__metadata__")
        name = names[pick % len(names)]
        if header[name].get(field) == value:
            value = "changed"
        header[name][field] = value
        _write_header(weights, header, data)
    elif kind == "length":
        header, data = _header(weights)
        true = len(json.dumps(header).encode())
        _write_header(weights, header, data, length=arg if arg != true else true + 1)
    elif kind == "nan":
        state = st_load(weights.read_bytes())
        name = sorted(state)[0]
        state[name].view(-1)[0] = arg
        meta = _header(weights)[0]["__metadata__"]
        weights.write_bytes(st_save(state, metadata=meta))
    else:
        name, special = arg
        (d / name).unlink()
        if special == "fifo":
            os.mkfifo(d / name)
        elif special == "zero":
            (d / name).symlink_to("/dev/zero")
        else:
            (d / name).mkdir()


@settings(
    max_examples=EXAMPLES, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck)
)
@given(broken_model(), st.sampled_from(["sample", "eval"]))
def sweep_models(broken: tuple[str, object], command: str) -> None:
    d = SANDBOX / "broken"
    if d.exists() or d.is_symlink():
        shutil.rmtree(d)
    shutil.copytree(SANDBOX / "model", d, symlinks=True)
    apply(*broken, d)
    argv = [command, "--model", "broken", "--device", "cpu"]
    argv += ["--max-new-tokens", "2"] if command == "sample" else ["--data", "ok.txt"]
    assert_contract(argv, tree())


if __name__ == "__main__":
    os.chdir(make_sandbox())
    sweep_flags()
    sweep_models()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10
    print(f"contract held for {EXAMPLES} flag sets and {EXAMPLES} broken model directories; peak RSS {peak} MiB")
