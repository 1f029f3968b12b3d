"""Thread counts from the cores that are free: the choice, the measurement with a core really kept busy, the
re-check of a run whose steps slow down, and what train and sample do with them."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

from chargpt.cli import main
from chargpt.machine import cores
from chargpt.storage import trainstate
from chargpt.training.loop import train
from chargpt.training.settings import resume_config
from conftest import tiny_config


def test_the_choice_follows_the_free_cores_and_an_explicit_count_is_bounded():
    assert cores.free_cores(total=2, busy=1.0) == 1  # another process keeps one of two cores busy
    assert cores.free_cores(total=2, busy=0.1) == 2
    assert cores.free_cores(total=2, busy=5.0) == 1  # a machine busier than its cores still gets one thread
    assert cores.choose_threads(None, total=8, free=6) == 6
    assert cores.choose_threads(None, total=8, free=6, share=4) == 1  # four ranks on this machine
    assert cores.choose_threads(3, total=8, free=1) == 3  # asked for: as given
    assert cores.choose_threads(1_000_000, total=8, free=8) == 8  # never more than the cores
    assert "asked for" in cores.why(3, 3, 8) and "free cores: 1 of 2" in cores.why(None, 1, 2)


@pytest.mark.skipif(cores.cores() < 2, reason="needs two cores: one to keep busy, one to measure from")
def test_a_core_kept_busy_by_another_process_is_not_counted_free():
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)  # the spinner is up
        busy = cores.others_busy(0.5)
        assert busy is not None and busy >= 0.8  # at least the spinner's core
        assert cores.free_cores() <= cores.cores() - 1
    finally:
        spinner.kill()
        spinner.wait()


def test_the_tuner_tries_fewer_threads_when_steps_slow_down_and_keeps_the_faster():
    tuner = cores.ThreadTuner(2, window=4, retry=12)
    for _ in range(8):
        assert tuner.step(0.1) == 2  # the baseline
    for _ in range(4):
        tuner.step(0.5)  # another process took a core: 5x slower
    assert tuner.threads == 1 and "steps slowed 100 -> 500 ms" in tuner.changes[-1]
    for _ in range(4):
        tuner.step(0.12)  # one thread is much faster now: kept
    assert tuner.threads == 1
    for _ in range(8):
        tuner.step(0.12)
    assert tuner.threads == 2 and "again" in tuner.changes[-1]  # after `retry` steps: all threads tried again
    for _ in range(4):
        tuner.step(0.4)  # still busy: the trial was slower, back to one
    assert tuner.threads == 1 and "kept 1 threads" in tuner.changes[-1]
    one = cores.ThreadTuner(1, window=4)
    for seconds in [0.1] * 4 + [1.0] * 4:
        assert one.step(seconds) == 1  # nothing fewer to try


def test_train_uses_the_threads_asked_keeps_them_on_resume_and_puts_the_process_count_back(tmp_path, text_file, caplog):
    before = torch.get_num_threads()
    out = tmp_path / "m"
    with caplog.at_level("INFO", logger="chargpt"):
        train(tiny_config(out, text_file, threads=0, n_updates=6, eval_interval=3), progress=False)
    assert "thread" in caplog.text and "free cores" in caplog.text  # auto says what it chose and why
    assert torch.get_num_threads() == before
    saved = trainstate.load_train_state(out).threads
    assert 1 <= saved <= cores.cores()
    caplog.clear()
    with caplog.at_level("INFO", logger="chargpt"):
        train(resume_config(out, n_updates=8, threads=0), resume=True, progress=False)
    assert "(as the run saved)" in caplog.text
    caplog.clear()
    with caplog.at_level("INFO", logger="chargpt"):
        train(tiny_config(tmp_path / "one", text_file, threads=1, n_updates=2, eval_interval=2), progress=False)
    assert "1 thread (asked for)" in caplog.text and torch.get_num_threads() == before


def test_absurd_thread_counts_are_bounded_or_refused(trained_model_dir, capsys):
    rc = main(["sample", "--model", str(trained_model_dir), "--threads", "1000000", "--max-new-tokens", "5"])
    assert rc == 0  # bounded by the cores, not a million threads
    rc = main(["train", "--threads", "-1", "--out", "never"])
    assert rc == 2 and "threads must be a non-negative integer" in capsys.readouterr().err
