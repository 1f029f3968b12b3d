"""`chargpt export --format onnx`: the file runs in onnxruntime and gives PyTorch's numbers and chargpt's text."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from chargpt.inference.export import web_files
from conftest import run_cli
from helpers import PINNED, call_main, headless_chromium, pinned_model


@pytest.fixture(scope="module")
def exported(trained_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("export") / "tiny.onnx"
    r = run_cli("export", "--model", str(trained_model_dir), "--format", "onnx", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert r.stderr == "" and f"wrote {out}" in r.stdout
    return out


def _session(path: Path) -> tuple[ort.InferenceSession, dict[str, str]]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session, session.get_modelmeta().custom_metadata_map


def _run(session, tokens: np.ndarray, start: int, k: np.ndarray, v: np.ndarray):
    feed = {"idx": tokens.astype(np.int64), "past_k": k, "past_v": v, "start": np.array(start, dtype=np.int64)}
    return session.run(None, feed)


def test_metadata_says_what_a_runtime_needs(exported, tiny):
    model, tokenizer = tiny
    _, meta = _session(exported)
    cfg = model.config
    assert json.loads(meta["vocab"]) == tokenizer.to_list()
    assert (int(meta["block_size"]), int(meta["n_layers"]), int(meta["n_heads"]), int(meta["head_size"])) == (
        cfg.block_size, cfg.n_layers, cfg.n_heads, cfg.head_size,
    )  # fmt: skip
    from chargpt import __version__

    assert meta["chargpt_version"] == __version__


def test_full_windows_and_a_cached_decode_equal_pytorch(exported, tiny):
    model, _ = tiny
    session, _ = _session(exported)
    cfg = model.config
    shape = (cfg.n_layers, 3, cfg.n_heads, cfg.block_size, cfg.head_size)
    idx = torch.randint(0, cfg.vocab_size, (3, cfg.block_size), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(idx)[0].numpy()  # (3, block, vocab)
    zeros = np.zeros(shape, np.float32)
    logits, _, _ = _run(session, idx.numpy(), 0, zeros, zeros)
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-5)  # full windows, batch of 3
    short, _, _ = _run(session, idx[:, :5].numpy(), 0, zeros, zeros)  # any length up to block_size
    with torch.no_grad():
        np.testing.assert_allclose(short, model(idx[:, :5])[0].numpy(), rtol=1e-4, atol=1e-5)
    k, v = zeros, zeros
    for t in range(cfg.block_size):  # one token at a time through the cache: block_size steps
        step, k, v = _run(session, idx[:, t : t + 1].numpy(), t, k, v)
        np.testing.assert_allclose(step[:, 0], expected[:, t], rtol=1e-4, atol=1e-5)


def test_greedy_text_from_onnxruntime_equals_chargpt_sample(exported, trained_model_dir):
    """200 characters, past block_size many times (each such step prefills the last block_size tokens again)."""
    session, meta = _session(exported)
    chars, block = json.loads(meta["vocab"]), int(meta["block_size"])
    shape = (int(meta["n_layers"]), 1, int(meta["n_heads"]), block, int(meta["head_size"]))
    zeros = np.zeros(shape, np.float32)
    ids = [chars.index(c) for c in "ROMEO:"]
    logits, k, v = _run(session, np.array([ids]), 0, zeros, zeros)
    for _ in range(200):
        ids.append(int(logits[0, -1].argmax()))
        if len(ids) <= block:
            logits, k, v = _run(session, np.array([ids[-1:]]), len(ids) - 1, k, v)
        else:
            logits, k, v = _run(session, np.array([ids[-block:]]), 0, zeros, zeros)
    text = "".join(chars[i] for i in ids)
    r = run_cli(
        "sample", "--model", str(trained_model_dir), "--prompt", "ROMEO:", "--temperature", "0",
        "--max-new-tokens", "200", "--precision", "fp32", "--quantize", "none", "--device", "cpu",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout == text + "\n"


def test_bad_input_is_one_line_and_exit_2(exported, trained_model_dir, tmp_path, capsys):
    before = exported.read_bytes()
    cases = [
        (["--model", str(tmp_path / "nothing"), "--out", str(tmp_path / "a.onnx")], "does not exist"),
        (["--model", str(trained_model_dir), "--out", str(exported)], "--overwrite"),
        (["--model", str(trained_model_dir), "--out", str(tmp_path / "no" / "a.onnx")], "does not exist"),
        (["--model", str(trained_model_dir), "--out", str(tmp_path)], "exists"),
        (["--model", str(trained_model_dir), "--out", "x.onnx", "--format", "tflite"], "--format"),
    ]
    for args, words in cases:  # in this process: the CLI's own path, without a Python start-up per case
        rc, _, err = call_main(["export", *args], capsys)
        assert rc == 2, (args, err)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err and words in err, err
    assert exported.read_bytes() == before  # refused: untouched
    assert not (tmp_path / "a.onnx").exists()


def test_a_missing_extra_names_the_package(trained_model_dir, tmp_path):
    """Without onnxscript installed (hidden here by a stand-in that fails to import), export says what to install."""
    fake = tmp_path / "site"
    (fake / "onnxscript").mkdir(parents=True)
    (fake / "onnxscript" / "__init__.py").write_text("raise ImportError('hidden for this test')\n")
    code = "import sys; from chargpt.cli import main; sys.exit(main())"
    r = subprocess.run(
        [sys.executable, "-c", code, "export", "--model", str(trained_model_dir), "--out", str(tmp_path / "m.onnx")],
        capture_output=True, text=True, timeout=300, env={"PYTHONPATH": str(fake), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "chargpt: error: export to ONNX needs the onnxscript package: pip install 'chargpt[export]'"
    ], r.stderr
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.end_to_end
def test_web_page_gives_pytorchs_logits_and_streams_text(trained_model_dir, tiny, tmp_path):
    """The exported page in headless Chromium, opened from disk (no server): the next-token logits for a prompt
    equal PyTorch's within 1e-4, and Generate streams text in (seen growing before it is stopped)."""
    from selenium.webdriver.common.by import By

    site = tmp_path / "site"
    r = run_cli("export", "--model", str(trained_model_dir), "--format", "web", "--out", str(site))
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in site.iterdir()) == ["index.html", "model.js"]
    model, tokenizer = tiny
    browser = headless_chromium(tmp_path)
    try:
        browser.get(site.joinpath("index.html").as_uri())
        deadline = time.monotonic() + 60
        while browser.execute_script("return document.body.dataset.ready") != "1":
            assert time.monotonic() < deadline, browser.find_element(By.ID, "error").text
            time.sleep(0.05)
        info = browser.find_element(By.ID, "model-info").text
        assert "tiny" in info and "parameters" in info and "val loss" in info
        for prompt in ("ROMEO:", "First Citizen:\nBefore we proceed any further, hear me speak."):  # past the window
            got = np.array(browser.execute_script("return chargpt.logits(arguments[0])", prompt))
            with torch.no_grad():
                ids = tokenizer.encode(prompt)[-model.config.block_size :]
                expected = model(torch.as_tensor(ids)[None])[0][0, -1].numpy()
            np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)
        # the page's port of the math against the pinned logits (the same file pins chargpt.model, test_model)
        pinned_net, pinned_tokenizer = pinned_model()
        script = web_files(pinned_net, pinned_tokenizer, "pinned", {})["model.js"].decode("ascii")
        spec = json.loads(script[script.index("=") + 1 :].strip().rstrip(";"))
        for prompt, expected in json.loads(PINNED.read_text(encoding="utf-8"))["logits"].items():
            got = browser.execute_script(
                "return Array.from(new Model(arguments[0]).window(arguments[1]))",
                spec,
                pinned_tokenizer.encode(prompt).tolist(),
            )
            np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
        # the page's sampler: a temperature that overflows the scaled logits, or top-p 0, is greedy, not the last
        # candidate; a temperature that is not a number is refused with a message
        logits = [0.5, 3.0, -1.0, 2.0]
        for temperature, top_p in ((1e-300, None), (5e-324, None), (0.8, 1e-300)):
            picked = browser.execute_script("return pick(arguments[0], arguments[1], null, arguments[2], () => 0.99)",
                                            logits, temperature, top_p)  # fmt: skip
            assert picked == 1, (temperature, top_p)
        browser.find_element(By.ID, "temperature").clear()
        browser.find_element(By.ID, "temperature").send_keys("1e-")  # not a number: the field's value reads ""
        browser.find_element(By.ID, "generate").click()
        assert "temperature must be a number" in browser.find_element(By.ID, "error").text
        browser.find_element(By.ID, "temperature").clear()
        browser.find_element(By.ID, "temperature").send_keys("0.8")
        length = browser.find_element(By.ID, "max_tokens")
        length.clear()
        length.send_keys("100000")
        browser.find_element(By.ID, "seed").send_keys("3")
        browser.find_element(By.ID, "generate").click()
        seen = []
        deadline = time.monotonic() + 60
        while len({n for n in seen if n > 0}) < 3:  # the completion grew, three different lengths while running
            assert time.monotonic() < deadline, seen
            seen.append(len(browser.find_element(By.CSS_SELECTOR, "#output .completion").text))
            time.sleep(0.05)
        browser.find_element(By.ID, "generate").click()  # Stop
        deadline = time.monotonic() + 30
        while "stopped" not in browser.find_element(By.ID, "status").text:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        text = browser.find_element(By.CSS_SELECTOR, "#output .completion").get_attribute("textContent")
        assert 0 < len(text) < 100000 and set(text) <= set(tokenizer.to_list())
    finally:
        browser.quit()


def test_web_export_refuses_and_replaces_like_onnx(trained_model_dir, tmp_path, capsys):
    site = tmp_path / "site"
    site.mkdir()
    (site / "mine.txt").write_text("keep")
    web = ["export", "--model", str(trained_model_dir), "--format", "web", "--out"]
    rc, _, err = call_main([*web, str(site)], capsys)
    assert rc == 2 and "--overwrite" in err and len(err.strip().splitlines()) == 1
    rc, _, err = call_main([*web, str(site), "--overwrite"], capsys)  # the user's folder: never replaced
    assert rc == 2 and "mine.txt" in err and len(err.strip().splitlines()) == 1, err
    assert [p.name for p in site.iterdir()] == ["mine.txt"] and (site / "mine.txt").read_text() == "keep"
    a_file = tmp_path / "page.html"
    a_file.write_text("x")
    rc, _, err = call_main([*web, str(a_file), "--overwrite"], capsys)
    assert rc == 2 and "not a folder" in err and a_file.read_text() == "x"
    page = tmp_path / "page"
    rc, out, err = call_main([*web, str(page)], capsys)
    assert rc == 0 and "open" in out, err
    first = (page / "model.js").read_bytes()
    (page / "model.js").write_bytes(b"window.CHARGPT_MODEL = {};\n")  # an earlier export's script
    rc, out, err = call_main([*web, str(page), "--overwrite"], capsys)  # an earlier export is replaced
    assert rc == 0 and "open" in out, err
    assert (
        sorted(p.name for p in page.iterdir()) == ["index.html", "model.js"]
        and (page / "model.js").read_bytes() == first
    )
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no staging left behind


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_an_export_never_deletes_what_it_did_not_write(trained_model_dir, exported, tmp_path, capsys):
    """--out equal to, inside or above the model, or a file or folder of the user's: refused with --overwrite too,
    and every file stays as it was. An earlier ONNX export is what --overwrite replaces."""
    import shutil

    parent = tmp_path / "parent"
    model = parent / "m"
    shutil.copytree(trained_model_dir, model)
    (parent / "thesis.txt").write_text("my thesis")
    before = _tree(parent)
    cases = [
        (["--format", "web", "--out", str(model)], "is the model folder"),
        (["--format", "web", "--out", str(parent)], "holds the model folder"),
        (["--format", "onnx", "--out", str(model / "model.safetensors")], "is inside the model folder"),
        (["--format", "onnx", "--out", str(parent / "thesis.txt")], "not an ONNX file that chargpt exported"),
        (["--format", "web", "--out", str(model / "page")], "is inside the model folder"),
    ]
    for args, words in cases:
        rc, out, err = call_main(["export", "--model", str(model), *args, "--overwrite"], capsys)
        assert rc == 2 and out == "" and words in err and len(err.strip().splitlines()) == 1, (args, err)
        assert _tree(parent) == before, args
    again = tmp_path / "again.onnx"
    again.write_bytes(exported.read_bytes())
    rc, _, err = call_main(["export", "--model", str(model), "--out", str(again), "--overwrite"], capsys)
    assert rc == 0, err
    assert again.read_bytes() == exported.read_bytes()  # the same model gives the same graph
    assert _tree(parent) == before


def test_writing_a_file_keeps_the_users_look_alike_temp_files(trained_model_dir, tmp_path, capsys):
    mine = tmp_path / ".x.onnx.abc.tmp"
    mine.write_text("mine")
    rc, _, err = call_main(["export", "--model", str(trained_model_dir), "--out", str(tmp_path / "x.onnx")], capsys)
    assert rc == 0, err
    assert mine.read_text() == "mine"


def test_web_overwrite_replaces_only_what_an_export_wrote(trained_model_dir, tmp_path, capsys):
    """--overwrite on a folder whose index.html and model.js are not provably an export's (a folder named
    model.js holding the user's files; the user's own site under those names) is refused, and nothing in it
    changes; an earlier export, checked by its files' content, is replaced."""
    web = ["export", "--model", str(trained_model_dir), "--format", "web", "--overwrite", "--out"]
    look_alike = tmp_path / "look-alike"
    (look_alike / "model.js").mkdir(parents=True)
    (look_alike / "model.js" / "notes.txt").write_text("mine")
    (look_alike / "index.html").write_text("<html>mine</html>")
    site = tmp_path / "site"
    site.mkdir()
    (site / "index.html").write_text("<!doctype html><title>my site</title>")
    (site / "model.js").write_text("export const model = 1;\n")
    for folder in (look_alike, site):
        before = _tree(folder)
        rc, out, err = call_main([*web, str(folder)], capsys)
        assert rc == 2 and out == "" and "not a chargpt web export" in err and err.count("\n") == 1, err
        assert _tree(folder) == before and (look_alike / "model.js").is_dir()
    page = tmp_path / "page"
    rc, _, err = call_main([*web, str(page)], capsys)
    assert rc == 0, err
    rc, _, err = call_main([*web, str(page)], capsys)
    assert rc == 0, err
    assert sorted(p.name for p in page.iterdir()) == ["index.html", "model.js"]


def test_the_web_page_shows_a_hostile_model_name_as_text(trained_model_dir, tmp_path, capsys):
    """The page's name line comes from the model folder (untrusted): markup there is shown, never run."""
    import shutil

    from selenium.webdriver.common.by import By

    folder = tmp_path / "<img src=x onerror=\"document.title='pwned'\">"
    shutil.copytree(trained_model_dir, folder)
    site = tmp_path / "site"
    rc, _, err = call_main(["export", "--model", str(folder), "--format", "web", "--out", str(site)], capsys)
    assert rc == 0, err
    browser = headless_chromium(tmp_path)
    try:
        browser.get(site.joinpath("index.html").as_uri())
        deadline = time.monotonic() + 60
        while browser.execute_script("return document.body.dataset.ready") != "1":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.3)  # an image that fails to load would have fired its onerror by now
        info = browser.find_element(By.ID, "model-info")
        assert browser.title != "pwned" and info.find_elements(By.TAG_NAME, "img") == []
        assert "<img src=x" in info.text
        # the default length is the model's context (32 here): past it the page recomputes the window per character
        assert browser.find_element(By.ID, "max_tokens").get_attribute("value") == "32"
    finally:
        browser.quit()
