"""chargpt.training.sizing: the model sized to the time budget (a pure rule over measured throughput), and when
it applies."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chargpt.training import samples, sizing
from chargpt.training.settings import make_train_config, sizing_request
from chargpt.training.sizing import LADDER, MAX_PARAMS_PER_CHAR, TOKENS_PER_PARAM, choose
from helpers import call_main


def flat(rate: float):
    """A machine that trains every rung at `rate` tokens/s, and the rungs the rule asked about."""
    asked: list[sizing.Rung] = []

    def tokens_per_s(rung: sizing.Rung) -> float:
        asked.append(rung)
        return rate

    return tokens_per_s, asked


def test_the_budget_buys_the_largest_rung_that_sees_enough_tokens_per_parameter():
    rate, corpus = 10_000.0, 10**9
    for i, rung in enumerate(LADDER):
        just_enough = TOKENS_PER_PARAM * rung.params / rate
        speed, asked = flat(rate)
        assert choose(just_enough, speed, corpus).rung == rung
        # the rungs up to the chosen one: the next is refused untimed, as it is never faster than this one
        assert asked == list(LADDER[: i + 1])
        if i:
            assert choose(just_enough * 0.99, flat(rate)[0], corpus).rung == LADDER[i - 1]
    assert choose(1.0, flat(rate)[0], corpus).rung == LADDER[0]  # any budget trains the smallest
    assert choose(1e9, flat(rate)[0], corpus).rung == LADDER[-1]


def test_a_faster_machine_or_a_longer_budget_never_buys_a_smaller_model():
    sizes = [choose(t, flat(r)[0], 10**9).rung.params for r in (2e3, 2e4) for t in (60, 210, 900, 1800, 3600, 36000)]
    slow, fast = sizes[:6], sizes[6:]
    assert slow == sorted(slow) and fast == sorted(fast)
    assert all(f >= s for s, f in zip(slow, fast, strict=True))
    # throughput differs by rung as on a real CPU: larger rungs are slower, so they need more time
    rates = {rung: 20_000 * LADDER[0].params / rung.params for rung in LADDER}
    picked = [choose(t, rates.__getitem__, 10**9).rung for t in (210, 900, 1800, 7200, 10**6)]
    assert [LADDER.index(r) for r in picked] == sorted(LADDER.index(r) for r in picked)


def test_a_rung_is_timed_only_where_its_speed_could_buy_it():
    rates = {rung: 20_000 * LADDER[0].params / rung.params for rung in LADDER}  # slower in proportion to size
    could = TOKENS_PER_PARAM * LADDER[1].params / rates[LADDER[0]]  # the budget where rung 0's speed would buy rung 1
    asked: list[sizing.Rung] = []
    chosen = choose(could * 1.01, lambda rung: asked.append(rung) or rates[rung], 10**9)
    assert chosen.rung == LADDER[0] and asked == list(LADDER[:2])  # timed, then refused at its own speed
    assert f"at {rates[LADDER[1]]:,.0f} tokens/s" in chosen.reason
    asked.clear()
    chosen = choose(could * 0.99, lambda rung: asked.append(rung) or rates[rung], 10**9)
    assert chosen.rung == LADDER[0] and asked == list(LADDER[:1])  # not even rung 0's speed buys it: not timed
    assert "would see fewer than 4.0" in chosen.reason


def test_a_small_corpus_caps_the_model():
    chosen = choose(1e9, flat(1e5)[0], corpus_chars=int(LADDER[1].params / MAX_PARAMS_PER_CHAR) + 1)
    assert chosen.rung == LADDER[1] and "large for a corpus" in chosen.reason
    # tinyshakespeare (1.1M characters) keeps the smallest shape, however long the budget
    assert choose(1e9, flat(1e5)[0], corpus_chars=1_115_394).rung == LADDER[0]
    assert choose(1e9, flat(1e5)[0], corpus_chars=100).rung == LADDER[0]


def test_the_rungs_are_valid_settings_and_the_reason_names_the_numbers():
    for rung in LADDER:
        cfg = make_train_config(None, None, sized=rung.settings(), device="cpu", max_time=60.0)
        assert (cfg.n_embd, cfg.n_layers, cfg.optimizer, cfg.schedule) == (rung.n_embd, rung.n_layers, "muon", "wsd")
    assert [r.params for r in LADDER] == sorted(r.params for r in LADDER)
    reason = choose(900, flat(8_000)[0], 10**9).reason
    assert "900 s" in reason and "8,000 tokens/s" in reason and "tokens per parameter" in reason


def test_a_run_that_reads_its_corpus_many_times_decays_its_weights_more():
    (_, base), (many, strong) = sizing.WEIGHT_DECAY_BY_PASSES[0], sizing.WEIGHT_DECAY_BY_PASSES[-1]
    assert strong > base and sizing.weight_decay(0.5) == base and sizing.weight_decay(many) == strong
    decays = [sizing.weight_decay(p) for p in (0, 1, many / 2, many * 0.99, many, many * 10)]
    assert decays == sorted(decays)
    corpus = 1_000_000  # at 8,000 tokens/s: 210 s reads it 1.7 times, 1800 s 14 times
    short, long = (choose(t, flat(8_000)[0], corpus) for t in (210, 1800))
    assert (short.rung, long.rung) == (LADDER[0], LADDER[0])  # the corpus caps the shape; the decay differs
    assert short.weight_decay == sizing.weight_decay(1.68) and "weight decay" not in short.reason
    assert long.weight_decay == sizing.weight_decay(14.4) and f"weight decay {long.weight_decay:g}" in long.reason
    cfg = make_train_config(None, None, sized=long.settings(), device="cpu", max_time=1800.0)
    assert (cfg.weight_decay, cfg.n_embd, cfg.optimizer) == (long.weight_decay, LADDER[0].n_embd, "muon")
    cfg = make_train_config(None, None, sized=long.settings(), device="cpu", max_time=1800.0, weight_decay=0.05)
    assert cfg.weight_decay == 0.05  # a flag still wins


def test_explicit_settings_win_over_the_sized_ones():
    cfg = make_train_config(None, None, sized=LADDER[1].settings(), device="cpu", max_time=60.0, learning_rate=1e-3)
    assert cfg.learning_rate == 1e-3 and cfg.n_embd == LADDER[1].n_embd


def test_sizing_applies_to_a_time_budget_alone_on_a_cpu(tmp_path: Path):
    assert sizing_request(None, None, max_time=60.0, device="cpu", data="x.txt", learning_rate=1e-3) is not None
    assert sizing_request(None, None, max_time=60.0, device="auto") is not None  # this machine has no GPU
    for refused in (
        dict(max_time=60.0, device="cpu", n_embd=64),  # a shape given
        dict(max_time=60.0, device="cpu", n_layers=2),
        dict(max_time=60.0, device="cpu", n_updates=100),  # a step count given
        dict(max_time=60.0, device="cpu", init_from="out/base"),  # a fine-tune keeps its model's shape
        dict(max_time=60.0, device="cuda"),  # a GPU has its own preset
        dict(device="cpu"),  # no budget
        dict(max_time=0.0, device="cpu"),
    ):
        assert sizing_request(None, None, **refused) is None, refused
    assert sizing_request("cpu", None, max_time=60.0, device="cpu") is None  # a preset named
    toml = tmp_path / "run.toml"
    toml.write_text("max_time = 30\n")
    assert sizing_request(None, str(toml), device="cpu") is not None
    toml.write_text("max_time = 30\nn_embd = 64\n")
    assert sizing_request(None, str(toml), device="cpu") is None


def test_measure_times_the_real_step():
    assert 100 < sizing.measure(LADDER[0], threads=1) < 10**7
    assert sizing.corpus_chars(None) > 1_000_000  # the plays


def test_train_with_a_budget_alone_is_sized_and_says_so(text_file: Path, tmp_path: Path, capsys):
    out = tmp_path / "run"
    rc, stdout, err = call_main(
        ["train", "--data", str(text_file), "--max-time", "10", "--out", str(out), "--threads", "1"], capsys
    )
    assert rc == 0, err
    saved = json.loads((out / "config.json").read_text())["info"]["train_config"]
    assert "sized for 10 s" in stdout + err
    assert (saved["optimizer"], saved["schedule"], saved["n_embd"]) == ("muon", "wsd", LADDER[0].n_embd)
    assert saved["window_order"] == "shuffled"  # every character once a pass (docs/design.md)
    decays = dict(sizing.WEIGHT_DECAY_BY_PASSES).values()
    assert saved["weight_decay"] in decays  # and the announcement says so when it is not the usual one
    assert (f"weight decay {saved['weight_decay']:g}" in stdout + err) == (saved["weight_decay"] != min(decays))
    # a short run draws a learning curve: evaluations spaced from the budget, each with the sample it wrote
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [m for m in evals if m["kind"] == "eval"]
    # (>= 5 points in 60 s: test_evaluations_are_spaced_for_a_learning_curve_within_their_share; this 10 s run
    # at one thread may make as few as ~20 steps on a slow or busy CPU)
    assert len(evals) >= 2 and saved["eval_interval"] < 500, (len(evals), saved["eval_interval"])
    first_line = text_file.read_text().split("\n")[0] + "\n"  # the data's first line is the prompt
    assert all(len(m["sample"]) == samples.SAMPLE_CHARS and m["prompt"] == first_line for m in evals[:-1])
    assert len(evals[-1]["sample"]) in (0, samples.SAMPLE_CHARS)  # the last only if the budget still had time
    evals = [m for m in evals if m["sample"]]
    shown = (out / "samples.txt").read_text()
    assert shown.count("=== step") == len(evals) and evals[-1]["sample"] in shown
    assert "  | " + evals[-1]["prompt"].rstrip("\n") in err  # shown under the evaluation's line
    rc, stdout, _ = call_main(["info", str(out)], capsys)
    assert rc == 0 and f"its sample at step {evals[-1]['step']:,}" in stdout
    assert "  | " + evals[-1]["sample"].split("\n")[0] in stdout or not evals[-1]["sample"].split("\n")[0]
    rc, stdout, err = call_main(
        ["train", "--data", str(text_file), "--max-time", "2", "--out", str(tmp_path / "p"), "--preset", "cpu",
         "--threads", "1"], capsys,
    )  # fmt: skip
    assert rc == 0 and "sized" not in stdout + err and "preset cpu (as asked)" in stdout + err
    assert json.loads((tmp_path / "p" / "config.json").read_text())["info"]["train_config"]["window_order"] == "random"


def test_inputs_are_checked_before_any_timing(text_file: Path, tmp_path: Path, capsys):
    """A missing --data, a folder without .txt files, an --out that holds a model, a corpus too short for any
    context: refused in one line before "sizing the model ..." (which times shapes for seconds)."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "tiny.txt").write_text("To be, or not to be: that is the question. Whether")
    taken = tmp_path / "taken"
    assert (
        call_main(
            [
                "train",
                "--data",
                str(text_file),
                "--out",
                str(taken),
                "--n-updates=2",
                "--quiet",
                "--n-embd=16",
                "--n-heads=2",
                "--n-layers=1",
                "--block-size=8",
                "--eval-iters=1",
            ],
            capsys,
        )[0]
        == 0
    )
    fresh = str(tmp_path / "o")
    cases = [
        ([str(tmp_path / "nothing.txt"), fresh], "does not exist"),
        ([str(tmp_path / "empty"), fresh], "holds no .txt files"),
        ([str(text_file), str(taken)], "already holds a model"),
        ([str(tmp_path / "tiny.txt"), fresh], "too few for a context"),
    ]
    for (data, out), words in cases:
        rc, stdout, err = call_main(["train", "--max-time", "30", "--data", data, "--out", out], capsys)
        assert rc == 2 and words in err and "sizing" not in stdout + err, (data, out, stdout, err)


def test_a_short_corpus_caps_the_sized_context(tmp_path: Path):
    assert sizing.context_for(1_000_000) is None
    assert sizing.context_for(600) == 59  # the last 10% (60 characters) holds a window of 59 and its next one
    choice = choose(60.0, lambda rung: 50_000.0, 600)
    assert choice.settings()["block_size"] == 59 and "context 59" in choice.reason


def test_evaluations_are_spaced_for_a_learning_curve_within_their_share():
    assert sizing.evaluation(1_000) == {"eval_interval": 83, "eval_iters": 12}  # ~12 points, ~10% of the steps
    assert sizing.evaluation(60) == {"eval_interval": 27, "eval_iters": 4}  # the fewest batches, still in share
    assert sizing.evaluation(3_000, splits=3) == {"eval_interval": 250, "eval_iters": 25}  # with --ema's split
    assert sizing.evaluation(100_000) == {"eval_interval": 500, "eval_iters": 40}  # long runs: as before
    for steps in (30, 300, 3_000, 30_000):
        for splits in (2, 3):
            got = sizing.evaluation(steps, splits)
            assert steps / got["eval_interval"] >= min(10, steps / sizing.min_eval_interval(splits))
            assert splits * got["eval_iters"] / 3 <= 0.1 * got["eval_interval"]  # <= ~10% of the steps between two
    # a 60 s run of the smallest rung, at the one-thread speed this machine's slowest CI core gives (~6,000
    # tokens/s), records at least 5 val points besides step 0
    steps = 60 * 6_000 / (LADDER[0].batch_size * LADDER[0].block_size)
    assert steps // sizing.evaluation(steps)["eval_interval"] >= 5


@pytest.mark.parametrize("flag", ["--optimizer=sgd", "--schedule=linear", "--decay-fraction=1.5"])
def test_bad_optimizer_settings_are_one_line_errors(flag: str, text_file: Path, tmp_path: Path, capsys):
    rc, _, err = call_main(["train", "--data", str(text_file), "--out", str(tmp_path / "r"), flag], capsys)
    assert rc == 2 and err.strip().count("\n") == 0 and "Traceback" not in err


def test_long_sized_runs_average_their_weights_and_short_ones_do_not():
    """A moving average pays in runs of thousands of steps and only costs evaluation time in short ones
    (docs/design.md, "Averaged weights"): the sized settings turn it on from EMA_MIN_STEPS, with the
    evaluations spaced for its third split."""
    long, short = choose(900.0, lambda rung: 10_000.0, 1_000_000), choose(210.0, lambda rung: 10_000.0, 1_000_000)
    assert long.steps >= sizing.EMA_MIN_STEPS > short.steps
    assert long.settings()["ema"] == sizing.EMA == 0.995 and short.settings()["ema"] == 0.0
    assert long.settings()["eval_iters"] == sizing.evaluation(long.steps, splits=3)["eval_iters"]
    assert short.settings()["eval_iters"] == sizing.evaluation(short.steps)["eval_iters"]


def test_the_command_line_and_python_plan_the_same_run(text_file: Path, tmp_path: Path):
    """`chargpt train --max-time 30` and `chargpt.train(max_time=30)` go through one planner: the same model
    and settings, each from the same source, on the same machine (each rung timed once, here, for both)."""
    from chargpt.cli.commands import train_settings, typed_settings
    from chargpt.cli.parser import build_parser
    from chargpt.machine import cores
    from chargpt.training.planner import plan

    timed: dict[sizing.Rung, float] = {}

    def throughput(rung: sizing.Rung) -> float:
        if rung not in timed:
            timed[rung] = sizing.measure(rung, cores.choose_threads(None))
        return timed[rung]

    out = str(tmp_path / "run")
    argv = ["train", "--data", str(text_file), "--out", out, "--max-time", "30"]
    command, given, _ = typed_settings(build_parser().parse_args(argv), argv)  # what cmd_train is handed
    cli = plan(**train_settings(command, given), throughput=throughput)
    python = plan(data=str(text_file), out=out, max_time=30, throughput=throughput)
    assert cli == python
    assert cli.sources["n_embd"] == cli.sources["optimizer"] == "sized for the budget"
    assert (cli.config.optimizer, cli.config.schedule, cli.config.window_order) == ("muon", "wsd", "shuffled")
    assert cli.note.startswith("sized for 30 s")


def test_python_trains_what_the_command_line_trains_in_one_call(text_file: Path, tmp_path: Path):
    """chargpt.train(data=..., max_time=...): the sized run the CLI would train (Muon, WSD, shuffled passes),
    with the settings' sources saved for `info`; then resume=True trains it on."""
    import chargpt

    out = tmp_path / "run"
    result = chargpt.train(data=str(text_file), out=str(out), max_time=3, threads=1, progress=False)
    assert result.step > 0 and result.best_step > 0
    info = json.loads((out / "config.json").read_text())["info"]
    assert (info["train_config"]["optimizer"], info["train_config"]["window_order"]) == ("muon", "shuffled")
    assert info["settings_from"]["n_embd"] == "sized for the budget"
    more = chargpt.train(out=str(out), resume=True, max_time=6, progress=False)
    assert more.step > result.step
    with pytest.raises(TypeError, match="not both"):
        chargpt.train(make_train_config(None, None, out=str(out)), max_time=3)
    assert {"train", "generate", "load_model", "make_train_config", "TrainConfig"} <= set(dir(chargpt))
    assert not {"os", "importlib", "MKL_CBWR_FROM_USER", "annotations"} & set(dir(chargpt))
