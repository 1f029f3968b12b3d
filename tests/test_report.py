"""What a run keeps: metrics.jsonl's training-loss and evaluation rows, and loss.png."""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest

from chargpt.training import report
from chargpt.training.loop import train
from conftest import tiny_config


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_training_rows_every_log_interval_and_a_step_0_evaluation(tmp_path, text_file, caplog):
    out = tmp_path / "m"
    cfg = tiny_config(out, text_file, n_updates=30, eval_interval=15, log_interval=4)
    with caplog.at_level(logging.INFO, logger="chargpt"):
        result = train(cfg, progress=False, preset_note="preset test")
    metrics = rows(out)
    evals = [m for m in metrics if m["kind"] == "eval"]
    steps = [m for m in metrics if m["kind"] == "train"]
    assert [m["step"] for m in evals] == [0, 15, 30]
    assert [m["step"] for m in steps] == list(range(4, 31, 4))
    # step 0 is the untrained model: about ln(vocab) nats, never the saved best
    vocab = len(json.loads((out / "config.json").read_text())["vocab"])
    assert abs(evals[0]["val_loss"] - math.log(vocab)) < 0.3
    assert result.best_step == 30 and result.best_val_loss == evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.5
    # a training row is the mean loss of the steps since the previous one: it falls as training goes
    assert steps[-1]["loss"] < steps[0]["loss"] - 0.5 and all(m["lr"] > 0 for m in steps)
    assert abs(steps[-1]["loss"] - evals[-1]["train_loss"]) < 0.3
    # the announcement: two lines before training, and the step-0 evaluation line
    text = caplog.text
    assert "training a GPT of 63," in text and "preset test, on cpu in fp32" in text
    assert "budget 30 steps; writing" in text and "step 0: train loss" in text and "(before training)" in text


def test_loss_png_reads_well(tmp_path, text_file):
    """The plot draws from both kinds of rows (and from old files that hold evaluation rows only)."""
    out = tmp_path / "m"
    train(tiny_config(out, text_file, n_updates=40, eval_interval=10, log_interval=2), progress=False)
    image = matplotlib.image.imread(out / "loss.png")
    assert image.shape[:2] == (450, 800)
    old = [{k: v for k, v in m.items() if k != "kind"} for m in rows(out) if m["kind"] == "eval"]
    (tmp_path / "old").mkdir()
    report.plot(tmp_path / "old", old)
    assert (tmp_path / "old" / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert report.read_metrics(tmp_path / "m", 20)[-1]["step"] == 20


@pytest.mark.parametrize("lr", [0.02, 3e-3, 1.5e-4, 2e-6])
def test_every_text_of_the_plots_lies_inside_the_picture(lr: float):
    """The plots' margins are fixed (not measured at every drawing): at any learning rate's tick labels, losses of
    two digits, a resume line and long run names, no tick label, axis label, title or legend is cut off."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.text import Text

    evals = [{"kind": "eval", "step": s, "train_loss": 12 - s / 400, "val_loss": 12.1 - s / 400,
              "lr": lr * min(1, s / 300), "time": s / 10} for s in range(0, 3001, 200)]  # fmt: skip
    train_rows = [
        {"kind": "train", "step": s, "loss": 12 - s / 400, "lr": lr * min(1, s / 300)} for s in range(0, 3001, 10)
    ]
    metrics = [*evals, *train_rows, {"kind": "resume", "step": 1400, "time": 1.0}]
    name = "a-run-folder-with-a-rather-long-name"
    for fig in (report.loss_figure(name, metrics), report.compare_figure({name: metrics, "b": evals})):
        renderer = FigureCanvasAgg(fig).get_renderer()
        fig.draw(renderer)
        drawn = fig.get_tightbbox(renderer)  # inches: every tick label, axis label, title and legend drawn
        assert len([t for t in fig.findobj(Text) if t.get_visible() and t.get_text()]) > 10
        width, height = fig.get_size_inches()
        assert 0 <= drawn.x0 and drawn.x1 <= width and 0 <= drawn.y0 and drawn.y1 <= height, (drawn, width, height)


def test_loss_png_marks_where_a_run_was_resumed(tmp_path, text_file):
    """A resume row draws a vertical dotted line at its step (and a legend entry)."""
    out = tmp_path / "m"
    train(tiny_config(out, text_file, n_updates=40, eval_interval=10, log_interval=2), progress=False)
    plain = rows(out)
    for name, metrics in (("plain", plain), ("resumed", [*plain, {"kind": "resume", "step": 20, "time": 1.0}])):
        (tmp_path / name).mkdir()
        report.plot(tmp_path / name, metrics)
    a = matplotlib.image.imread(tmp_path / "plain" / "loss.png")[..., :3]
    b = matplotlib.image.imread(tmp_path / "resumed" / "loss.png")[..., :3]
    changed = abs(a - b).sum(-1) > 0.1  # (height, width)
    assert changed.sum(0).max() > 200  # one column changed over most of the plot's height: a vertical line


def test_smoothing_is_bias_corrected():
    assert report.smooth([2.0, 2.0, 2.0]) == [2.0, 2.0, 2.0]  # no pull toward 0 at the start
    smoothed = report.smooth([4.0] + [1.0] * 60)
    assert smoothed[0] == 4.0 and 1.0 < smoothed[10] < 4.0 and abs(smoothed[-1] - 1.0) < 0.01


def test_an_unusable_cache_folder_draws_the_plot_without_matplotlibs_warning(text_file, tmp_path):
    """With nowhere to write its caches (HOME and XDG_CACHE_HOME a file, no MPLCONFIGDIR), matplotlib warned over
    three lines in its own voice; the run says nothing of it, and loss.png is drawn all the same."""
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where a folder should be")
    env = {k: v for k, v in os.environ.items() if k != "MPLCONFIGDIR"}
    env |= {"HOME": str(blocked), "XDG_CACHE_HOME": str(blocked), "XDG_CONFIG_HOME": str(blocked)}
    r = subprocess.run(
        [sys.executable, "-m", "chargpt", "train", "--data", str(text_file), "--out", str(tmp_path / "m"),
         "--n-updates", "3", "--n-embd", "16", "--n-heads", "2", "--n-layers", "1", "--block-size", "16",
         "--eval-iters", "1", "--device", "cpu", "--threads", "1", "--precision", "fp32", "--quiet"],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "matplotlib" not in r.stderr.lower() and "Matplotlib" not in r.stderr, r.stderr
    assert (tmp_path / "m" / "loss.png").stat().st_size > 0


def test_metrics_jsonl_is_strict_json_and_reads_back_a_lost_number(tmp_path):
    """A loss that is not a number (a diverged evaluation) is written as null, never as NaN, which strict JSON
    readers (jq, JSON.parse) refuse; a resume reads it back as NaN."""
    rows_in = [
        {"kind": "eval", "step": 5, "train_loss": 2.5, "val_loss": math.nan, "lr": 0.001, "time": 1.0},
        {"kind": "train", "step": 10, "loss": math.inf, "lr": 0.001, "tokens_per_s": 5.0, "time": 2.0},
    ]
    report.write_metrics(tmp_path, rows_in)
    strict = [json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in metrics.jsonl")) for line in
              (tmp_path / "metrics.jsonl").read_text().splitlines()]  # fmt: skip
    assert strict[0]["val_loss"] is None and strict[1]["loss"] is None
    back = report.read_metrics(tmp_path, 10)
    assert math.isnan(back[0]["val_loss"]) and math.isnan(back[1]["loss"]) and back[0]["train_loss"] == 2.5


def test_a_large_vocabulary_hints_at_min_char_count(tmp_path, caplog):
    """A text with hundreds of distinct characters (source code, many scripts): the announcement names
    --min-char-count, which a Shakespeare-sized vocabulary never hears about."""
    rare = "".join(chr(0x400 + i) for i in range(300))
    data = tmp_path / "mixed.txt"
    data.write_text(("the quick brown fox jumps over the lazy dog. " * 40 + rare + "\n") * 20, encoding="utf-8")
    for text, hinted in ((data, True), (None, False)):
        caplog.clear()
        cfg = tiny_config(tmp_path / f"m{hinted}", text or tmp_path / "plain.txt", n_updates=1, eval_interval=1)
        if text is None:
            (tmp_path / "plain.txt").write_text("the quick brown fox jumps over the lazy dog.\n" * 400)
        with caplog.at_level(logging.INFO, logger="chargpt"):
            train(cfg, progress=False)
        assert ("--min-char-count N maps those seen fewer than N times" in caplog.text) == hinted, caplog.text
