"""Helpers several test files share: small training settings and state comparisons, the CLI called in this
process, a reference loss, a headless Chromium. (Fixtures live in conftest.py.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from selenium import webdriver
from selenium.webdriver.chrome.service import Service

from chargpt.cli import main
from chargpt.data.tokenizer import CharTokenizer
from chargpt.storage import layout
from conftest import tiny_config

# small enough for a few seconds per run on 2 busy cores; dropout > 0 so the RNG state matters
SMALL = dict(block_size=16, n_embd=32, n_heads=4, n_layers=2, batch_size=8, eval_iters=2, dropout=0.1)
SMALL.update(eval_interval=5, checkpoint_interval=5)
FLAGS = [f"--{k.replace('_', '-')}={v}" for k, v in SMALL.items()]
FLAGS += ["--device=cpu", "--seed=7", "--quiet", "--threads=1", "--precision=fp32"]  # as tiny_config pins them


def small(out: Path, data: Path, **kw):
    return tiny_config(out, data, **{**SMALL, **kw})


def final_state(out: Path) -> dict:
    return torch.load(out / layout.TRAIN_STATE, weights_only=True)


def assert_same_tensors(a, b, where: str = "") -> None:
    """torch.equal on every tensor of two nested state structures."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same_tensors(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def metrics(out: Path) -> list[dict]:
    """The run's metrics rows without the wall clock and without the marks of where it was resumed: what a run
    resumed at any step must equal."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in m.items() if k not in ("tokens_per_s", "time")} for m in rows if m["kind"] != "resume"]


def call_main(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse usage errors
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc: int, out: str, err: str, pattern: str) -> None:
    assert rc == 2, (rc, out, err)
    assert out == ""
    assert err.startswith("chargpt") and err.endswith("\n") and err.count("\n") == 1, err
    assert "Traceback" not in err
    assert pattern in err, err


def reference_loss(model: torch.nn.Module, tokenizer: CharTokenizer, text: str) -> tuple[float, int]:
    """Window by window, one at a time, in float64: window i feeds text[iT : iT+T] and is scored
    on text[iT+1 : iT+T+1]; the last window may be shorter. Every character but the first is predicted once."""
    ids = [tokenizer.chars.index(c) for c in text]
    T = model.config.block_size
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, T):
            x = ids[start : start + T]
            y = ids[start + 1 : start + T + 1]
            x = x[: len(y)]
            log_probs = model(torch.tensor([x]))[0][0].double().log_softmax(-1)  # (len(x), vocab)
            total -= log_probs[torch.arange(len(y)), torch.tensor(y)].sum().item()
            count += len(y)
    return total / count, count


CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def headless_chromium(tmp_path: Path) -> webdriver.Chrome:
    if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        pytest.skip("needs the Debian packages chromium and chromium-driver: apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--window-size=1280,860",
    ):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


PINNED = Path(__file__).parent / "data" / "pinned_logits.json"  # the model's logits, pinned (see pinned_model)


def pinned_model():
    """A small GPT whose weights are a formula (no random generator, so the same on every machine and torch), and
    its tokenizer: tests/data/pinned_logits.json holds its next-token logits after a few prompts, which the model
    (chargpt.model) and every port of its math (the web page's JavaScript) must give. A change to the model's
    math fails those tests; write the file anew (pin_logits) only for a change meant to move the numbers."""
    from chargpt.config import GPTConfig
    from chargpt.model import GPT

    text = "abcdefgh \n"
    cfg = GPTConfig(vocab_size=len(text), block_size=8, n_embd=16, n_heads=2, n_layers=2, dropout=0.0)
    model = GPT(cfg).eval()
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.copy_(
                (torch.sin(torch.arange(p.numel(), dtype=torch.float64) * (0.37 + 0.13 * i) + i) * 0.5).view(p.shape)
            )
    return model, CharTokenizer.from_text(text)


PINNED_PROMPTS = ("a", "bad cab\nhe", "a bag had a ceded bad egg")  # one token, inside the window, past it


def pin_logits() -> None:
    """Write tests/data/pinned_logits.json from the model as it is (python -c 'import helpers; helpers.pin_logits()'
    in tests/)."""
    model, tokenizer = pinned_model()
    with torch.no_grad():
        logits = {
            prompt: model(torch.as_tensor(tokenizer.encode(prompt)[-model.config.block_size :])[None])[0][
                0, -1
            ].tolist()
            for prompt in PINNED_PROMPTS
        }
    PINNED.parent.mkdir(exist_ok=True)
    PINNED.write_text(json.dumps({"logits": logits}, indent=1) + "\n", encoding="utf-8")
