"""`chargpt info DIR [--json]`: what a model directory holds."""

from __future__ import annotations

import json

from chargpt.storage.checkpoint import load_model
from conftest import read_metrics
from helpers import assert_one_line_error, call_main


def test_info_json(trained_model_dir, capsys):
    rc, out, err = call_main(["info", str(trained_model_dir), "--json"], capsys)
    assert rc == 0, err
    info = json.loads(out)
    model, tokenizer = load_model(trained_model_dir)
    assert info["parameters"] == sum(p.numel() for p in model.parameters())
    assert info["model"] == {"arch": "gpt", "vocab_size": tokenizer.vocab_size, "block_size": 32, "n_embd": 48,
                             "n_heads": 4, "n_layers": 2, "dropout": 0.0}  # fmt: skip
    assert info["vocab"] == tokenizer.chars
    training = info["training"]
    assert training["steps"] == 300 and training["config"]["n_updates"] == 300 and training["elapsed"] > 0
    evals = read_metrics(trained_model_dir)
    best = min((m for m in evals if m["step"] > 0), key=lambda m: m["val_loss"])
    assert (training["best_step"], training["best_val_loss"]) == (best["step"], best["val_loss"])
    sizes = {p.name: p.stat().st_size for p in trained_model_dir.iterdir()}
    assert info["files"] == sizes and "model.safetensors" in sizes


def test_info_text(trained_model_dir, capsys):
    rc, out, err = call_main(["info", str(trained_model_dir)], capsys)
    assert rc == 0, err
    model, _ = load_model(trained_model_dir)
    n = sum(p.numel() for p in model.parameters())
    assert f"a gpt model, {n:,} parameters (2 layers x 4 heads, n_embd 48, context 32" in out
    assert "vocabulary: " in out and "training: 300 steps in " in out and "saved (best val) model: step " in out
    assert "model.safetensors " in out and "KB" in out


def test_info_on_something_that_is_not_a_model(tmp_path, capsys):
    rc, out, err = call_main(["info", str(tmp_path)], capsys)
    assert_one_line_error(rc, out, err, "holds no model")


def test_info_shows_settings_as_given_not_internal_values(tmp_path, text_file, capsys):
    from chargpt.training.loop import train
    from conftest import tiny_config

    out = tmp_path / "timed"
    cfg = tiny_config(out, text_file, max_time=2.0, n_updates=10**9, eval_interval=10)
    train(cfg, progress=False)
    rc, text, err = call_main(["info", str(out)], capsys)
    assert rc == 0, err
    settings = [line for line in text.splitlines() if line.startswith("trained on")][0]
    assert "max_time=2.0" in settings and "n_updates=" not in settings  # the clock governed the run
    assert "None" not in settings and "n_embd=" not in settings  # no 'none' values, the shape is said above


def test_info_on_a_folder_of_runs_lists_them(trained_model_dir, tmp_path, capsys):
    import shutil

    runs = tmp_path / "runs"
    for name in ("first", "second-run"):
        shutil.copytree(trained_model_dir, runs / name)
    (runs / "notes").mkdir()  # not a run: not listed
    rc, out, err = call_main(["info", str(runs)], capsys)
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0].split()[:2] == ["run", "shape"] and len(lines) == 3
    assert lines[1].startswith("first ") and "2x4x48 T32" in lines[1] and " 300 " in lines[1]
    rc, out, err = call_main(["info", str(runs), "--json"], capsys)
    listed = json.loads(out)["runs"]
    assert [r["name"] for r in listed] == ["first", "second-run"] and listed[0]["steps"] == 300
    rc, out, err = call_main(["info", str(runs), "--plot", str(tmp_path / "curves.png")], capsys)
    assert rc == 0 and (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", err
    rc, out, err = call_main(["info", str(runs / "first"), "--plot", str(tmp_path / "no.png")], capsys)
    assert rc == 2 and "not one" in err and not (tmp_path / "no.png").exists()
    saved = json.loads((trained_model_dir / "config.json").read_text())["info"]
    assert (listed[0]["best_step"], listed[0]["best_val_loss"]) == (saved["step"], saved["val_loss"])


def test_info_describes_a_run_stopped_before_its_first_evaluation(tmp_path, text_file, capsys):
    """No model saved yet (stopped before its first evaluation after step 0): info says what the saved state
    holds and how to go on, instead of refusing the folder."""
    from chargpt.training.loop import train
    from conftest import tiny_config

    out = tmp_path / "early"
    train(tiny_config(out, text_file, eval_interval=1000, n_updates=2000), progress=False, pause_after=3)
    assert not (out / "model.safetensors").exists()
    rc, text, err = call_main(["info", str(out)], capsys)
    assert rc == 0, err
    assert "training: 3 steps" in text and f"chargpt train --resume {out}" in text and "2 layers x 4 heads" in text
    assert "its sample at step 0" in text  # the untrained model's noise, from the step-0 evaluation
    rc, text, err = call_main(["info", str(out), "--json"], capsys)
    assert rc == 0 and json.loads(text)["training"]["saved"] is False


def test_info_shows_the_last_sample(trained_model_dir, capsys):
    rows = read_metrics(trained_model_dir)
    rc, text, err = call_main(["info", str(trained_model_dir)], capsys)
    assert rc == 0, err
    assert f"its sample at step {rows[-1]['step']:,}" in text
    assert all("  | " + line in text for line in (rows[-1]["prompt"] + rows[-1]["sample"]).rstrip("\n").split("\n"))
    assert (trained_model_dir / "samples.txt").read_text().count("=== step") == len(rows)


def test_info_machine_says_what_chargpt_decides_here(capsys):
    """`info --machine` (text and JSON): the CPU's flags as /proc/cpuinfo has them, the cores, the threads each
    command takes, auto's formats and int8 with their measured reasons, and that the server batches exactly here."""
    from chargpt.machine import cores
    from chargpt.machine import precision as prec

    rc, text, err = call_main(["info", "--machine", "--json"], capsys)
    assert rc == 0, err
    report = json.loads(text)
    info = prec.cpu_info()
    assert report["cpu"]["speed_flags"] == [f for f in prec.SPEED_FLAGS if f in info.flags]
    assert report["cpu"]["native_bf16"] == bool(info.native_bf16)
    assert report["cores"]["total"] == cores.cores() and 1 <= report["cores"]["free_now"] <= cores.cores()
    assert all(1 <= n <= cores.cores() for n in report["threads"].values())
    assert report["serve_batching"].startswith("batched decoding")  # on every CPU: the per-row form at worst
    assert report["precision"]["decode"].split()[0] in ("fp32", "bf16") and "(" in report["precision"]["decode"]
    assert report["int8"].split()[0] in ("int8", "none") and "measured" in report["int8"]
    rc, text, err = call_main(["info", "--machine"], capsys)
    assert rc == 0 and text.startswith("cpu: ") and "serve: batched decoding" in text and "int8 decoding" in text
    rc, out, err = call_main(["info"], capsys)
    assert_one_line_error(rc, out, err, "--machine")


def test_info_shows_a_folders_control_characters_instead_of_sending_them(trained_model_dir, tmp_path, capsys):
    """A model folder is untrusted: its saved sample with a title change, a screen clear and a colour, printed
    by `info` (text and --json), reaches the terminal as visible escapes, never as the sequences themselves."""
    import shutil

    folder = tmp_path / "hostile"
    shutil.copytree(trained_model_dir, folder)
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    evil = "\x1b]0;pwned\x07\x1b[2J\x1b[31mred\u202eevil\x9b1m"
    rows[-1]["sample"] = evil
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for extra in ([], ["--json"]):
        rc, text, err = call_main(["info", str(folder), *extra], capsys)
        assert rc == 0, err
        assert not any(c in text for c in "\x1b\x07\x9b\u202e"), repr(text[-300:])
        assert ("\\x1b]0;pwned" if not extra else "\\u001b]0;pwned") in text
    assert json.loads(text)["last_sample"]["text"].endswith(evil)  # the JSON is the same data
