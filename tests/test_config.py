"""Configs: validation of every shape and rate, presets, TOML files and their precedence."""

from __future__ import annotations

import dataclasses
from dataclasses import asdict

import pytest

from chargpt.config import PRESETS, GPTConfig, TrainConfig, load_toml
from chargpt.errors import ChargptError
from chargpt.training.settings import make_train_config, resolve_preset


def test_defaults_are_the_seed_model():
    cfg = GPTConfig()
    assert dataclasses.astuple(cfg) == (65, 256, 384, 6, 6, 0.2, "gpt")
    assert cfg.head_size == 64
    train = TrainConfig()
    train.validate()
    assert train.model_config(vocab_size=65) == cfg


def test_n_embd_must_divide_by_n_heads():
    with pytest.raises(ChargptError, match=r"n_embd \(100\) must be divisible by n_heads \(6\); pick e.g. n_embd=102"):
        GPTConfig(n_embd=100, n_heads=6)
    with pytest.raises(ChargptError, match="divisible"):
        TrainConfig(n_embd=50, n_heads=4).validate()


@pytest.mark.parametrize("field", ["vocab_size", "block_size", "n_embd", "n_heads", "n_layers"])
@pytest.mark.parametrize("value", [0, -1, 2.5, True])
def test_model_sizes_must_be_positive_integers(field, value):
    values = dict(vocab_size=8, block_size=8, n_embd=8, n_heads=1, n_layers=1)
    values[field] = value
    with pytest.raises(ChargptError, match=f"{field} must be a positive integer"):
        GPTConfig(**values)


@pytest.mark.parametrize("dropout", [-0.1, 1.0, 1.5, float("nan")])
def test_dropout_range(dropout):
    with pytest.raises(ChargptError, match=r"dropout must be in \[0, 1\)"):
        GPTConfig(dropout=dropout)


def test_unknown_model_type():
    with pytest.raises(ChargptError, match="unknown model type 'rnn'; use one of gpt, bigram, lecture"):
        GPTConfig(arch="rnn")


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("n_updates", 0, "n_updates must be a positive integer"),
        ("n_updates", -5, "n_updates must be a positive integer"),
        ("batch_size", 0, "batch_size must be a positive integer"),
        ("batch_size", -1, "batch_size must be a positive integer"),
        ("block_size", 0, "block_size must be a positive integer"),
        ("n_layers", -2, "n_layers must be a positive integer"),
        ("eval_interval", 0, "eval_interval must be a positive integer"),
        ("eval_iters", 0, "eval_iters must be a positive integer"),
        ("checkpoint_interval", -1, "checkpoint_interval must be a non-negative integer"),
        ("checkpoint_seconds", -5.0, "checkpoint_seconds must be a number >= 0"),
        ("precision", "fp16", "unknown precision 'fp16'; use one of auto, fp32, bf16"),
        ("gradient_accumulation_steps", 0, "gradient_accumulation_steps must be a positive integer"),
        ("warmup_updates", -1, "warmup_updates must be a non-negative integer"),
        ("learning_rate", 0.0, "learning_rate must be a positive number"),
        ("learning_rate", -3e-4, "learning_rate must be a positive number"),
        ("learning_rate", float("nan"), "learning_rate must be a positive number"),
        ("learning_rate", float("inf"), "learning_rate must be a positive number"),
        ("val_fraction", 0.0, r"val_fraction must be in \(0, 1\)"),
        ("val_fraction", 1.0, r"val_fraction must be in \(0, 1\)"),
        ("val_fraction", -0.1, r"val_fraction must be in \(0, 1\)"),
        ("dropout", -0.5, r"dropout must be in \[0, 1\)"),
        ("min_lr_ratio", 1.5, r"min_lr_ratio must be in \[0, 1\]"),
        ("beta2", 1.0, r"beta2 must be in \(0, 1\)"),
        ("weight_decay", -0.1, "weight_decay must be a number >= 0"),
        ("weight_decay", float("nan"), "weight_decay must be a number >= 0"),
        ("grad_clip", -1.0, "grad_clip must be a number >= 0"),
        ("grad_clip", float("nan"), "grad_clip must be a number >= 0"),
        ("max_time", -10.0, "max_time must be a number >= 0"),
        ("max_time", float("nan"), "max_time must be a number >= 0"),
        ("device", "tpu", "unknown device 'tpu'"),
        ("arch", "lstm", "unknown model type 'lstm'"),
    ],
)
def test_train_config_rejects_bad_values(field, value, message):
    cfg = TrainConfig(**{field: value})
    with pytest.raises(ChargptError, match=message):
        cfg.validate()


def test_good_edge_values_are_accepted():
    TrainConfig(dropout=0.0, warmup_updates=0, grad_clip=0.0, max_time=0.0, min_lr_ratio=1.0).validate()
    TrainConfig(device="cuda:1").validate()
    TrainConfig(n_embd=8, n_heads=8, block_size=1, n_layers=1).validate()


def test_error_messages_are_one_line():
    for cfg in (TrainConfig(n_embd=10, n_heads=3), TrainConfig(batch_size=0), TrainConfig(learning_rate=-1)):
        with pytest.raises(ChargptError) as e:
            cfg.validate()
        assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------
# presets and TOML


def test_presets():
    assert resolve_preset(None, "cpu") == "cpu" and resolve_preset(None, "mps") == "seed"
    assert resolve_preset(None, "cuda") == resolve_preset(None, "cuda:1") == "gpu"  # the GPU default
    assert resolve_preset("seed", "cpu") == "seed"
    with pytest.raises(ChargptError, match="unknown preset 'huge'"):
        resolve_preset("huge", "cpu")
    assert make_train_config("seed") == TrainConfig()
    cpu = make_train_config("cpu")
    for key, value in PRESETS["cpu"].items():
        assert getattr(cpu, key) == value
    gpu, seed = make_train_config("gpu"), TrainConfig()
    assert (gpu.n_embd, gpu.n_layers, gpu.block_size, gpu.batch_size) == (seed.n_embd, seed.n_layers, 256, 64)
    assert gpu.learning_rate == 1e-3 and gpu.min_lr_ratio == 0.1  # nanoGPT shakespeare_char's schedule
    assert gpu.checkpoint_interval == 0 and gpu.checkpoint_seconds == 60  # the 130 MB state: by time, and on exit


def test_toml_keys_are_applied(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(
        'data = "plays.txt"\nn_embd = 96\nn_heads = 4\nlearning_rate = 1\ndropout = 0.1\ncompile = true\n',
        encoding="utf-8",
    )
    raw = load_toml(path)
    expected = {"data": "plays.txt", "n_embd": 96, "n_heads": 4, "learning_rate": 1.0, "dropout": 0.1, "compile": True}
    assert raw == expected
    assert isinstance(raw["learning_rate"], float)  # an int is accepted where a float is expected
    cfg = make_train_config("seed", str(path))
    assert {key: getattr(cfg, key) for key in expected} == expected


def test_precedence_defaults_preset_toml_flags(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("block_size = 64\nn_embd = 96\nn_heads = 4\n", encoding="utf-8")
    cfg = make_train_config("cpu", str(path), block_size=32, n_heads=None, batch_size=None, device="cpu")
    assert cfg.block_size == 32  # flag > TOML > preset
    assert cfg.n_embd == 96 and cfg.n_heads == 4  # TOML > preset; a flag left at None does not override
    assert cfg.batch_size == PRESETS["cpu"]["batch_size"]  # preset > default
    assert cfg.weight_decay == TrainConfig().weight_decay  # default
    # no preset named: the CPU gets the cpu preset
    assert make_train_config(None, None, device="cpu").n_layers == PRESETS["cpu"]["n_layers"]
    # the merged result is validated
    with pytest.raises(ChargptError, match="divisible"):
        make_train_config("cpu", str(path), n_heads=5, device="cpu")


def test_unknown_toml_key(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("n_embd = 96\nnum_layers = 4\nlr = 0.1\n", encoding="utf-8")
    with pytest.raises(ChargptError, match=r"unknown key\(s\) in .*run.toml: lr, num_layers") as e:
        load_toml(path)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('n_embd = "big"\n', "n_embd in .* must be of type int"),
        ("n_embd = 9.5\n", "n_embd in .* must be of type int"),
        ("compile = 1\n", "compile in .* must be of type bool"),
        ("learning_rate = true\n", "learning_rate in .* must be of type float"),
        ("[model]\nn_embd = 4\n", "arch in .* must be of type str"),  # `model`: the old name of arch
        ("n_embd = = 3\n", "is not valid TOML"),
    ],
)
def test_bad_toml_values(tmp_path, content, message):
    path = tmp_path / "run.toml"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ChargptError, match=message):
        load_toml(path)


def test_missing_or_binary_toml(tmp_path):
    with pytest.raises(ChargptError, match="does not exist"):
        load_toml(tmp_path / "nope.toml")
    (tmp_path / "bin.toml").write_bytes(b"n_embd = \xff\n")
    with pytest.raises(ChargptError, match="is not valid TOML"):
        load_toml(tmp_path / "bin.toml")


def test_a_time_budget_alone_governs_the_run(tmp_path):
    """--max-time without --n-updates: the preset's step count must not end the run (or its schedule) early; the
    config says so itself (no step count), and a run saved with the old stand-in count reads the same."""
    from chargpt.config import OLD_TIME_GOVERNED_UPDATES
    from chargpt.training.settings import on_saved

    timed = make_train_config("cpu", device="cpu", max_time=60.0)
    assert timed.n_updates is None and timed.step_limit == float("inf")
    both = make_train_config("cpu", device="cpu", max_time=60.0, n_updates=123)
    assert both.n_updates == 123 and both.step_limit == 123
    toml = tmp_path / "c.toml"
    toml.write_text("max_time = 30\n")
    assert make_train_config("cpu", str(toml), device="cpu").n_updates is None
    assert make_train_config("cpu", device="cpu").n_updates == PRESETS["cpu"]["n_updates"]
    old = {**vars(timed), "n_updates": OLD_TIME_GOVERNED_UPDATES}
    assert on_saved(old, tmp_path).config.n_updates is None
    with pytest.raises(ChargptError, match="a run needs n_updates or max_time"):
        TrainConfig(n_updates=None, max_time=0).validate()


def test_every_setting_is_described_once_beside_its_field_and_shown_by_help():
    from dataclasses import fields

    from chargpt.cli import build_parser
    from chargpt.config import TrainConfig

    text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()  # type: ignore[union-attr]
    for f in fields(TrainConfig):
        described = f.metadata.get("help", "")
        assert described and "\n" not in described, f.name
        assert "--" + f.name.replace("_", "-") in text
        assert " ".join(described.split()[:3]) in " ".join(text.split()), f.name


def test_every_setting_says_where_it_came_from(tmp_path):
    """One resolver for every run: defaults < preset < sized < TOML < flags < the time rule, each setting's source
    kept; a resume layers what it is given over the saved run the same way."""
    from chargpt.training.settings import Layer, new_run, on_saved

    path = tmp_path / "run.toml"
    path.write_text("learning_rate = 0.002\nn_embd = 96\n")
    sized = Layer("sized for the budget", {"n_embd": 64, "n_layers": 3, "weight_decay": 0.05})
    s = new_run(None, str(path), sized, device="cpu", n_embd=48, max_time=30.0)
    assert (s.config.n_embd, s.sources["n_embd"]) == (48, "--n-embd")  # the flag over TOML over sized
    assert (s.config.learning_rate, s.sources["learning_rate"]) == (0.002, f"--config {path}")
    assert (s.config.n_layers, s.sources["n_layers"]) == (3, "sized for the budget")
    assert (s.config.batch_size, s.sources["batch_size"]) == (PRESETS["cpu"]["batch_size"], "preset cpu")
    assert s.config.n_updates is None and s.sources["n_updates"] == "--max-time without a step count"
    assert "seed" not in s.sources and s.config.seed == TrainConfig.seed  # a default has no source
    described = s.described()
    assert "n_layers 3, weight_decay 0.05 (sized for the budget)" in described, described
    assert "learning_rate 0.002 (--config" in described and "n_embd 48" in described.split("(flags)")[0], described
    named = new_run("seed", None, device="cpu")
    assert named.sources == {"device": "--device"} and named.config == TrainConfig(device="cpu")  # seed: defaults
    saved = {**asdict(s.config), "out": "old"}
    again = on_saved(saved, "old", [Layer("--{flag}", {"n_updates": 99, "learning_rate": None})])
    assert again.config.n_updates == 99 and again.sources["n_updates"] == "--n-updates"
    assert again.sources["n_layers"] == "the saved run" and again.config.learning_rate == 0.002
    with pytest.raises(ChargptError, match=r"--config x.toml sets n_embd = 32 but the run in old has 48"):
        on_saved(saved, "old", [Layer("--config x.toml", {"n_embd": 32})])


def test_a_home_path_in_toml_or_a_flag_is_expanded_as_a_shell_does(tmp_path, monkeypatch):
    """`out = "~/runs/x"` in a TOML file (or `--out=~/x`, where no shell expands it) means the home folder, never
    a folder literally named ~ in the current one."""
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    toml = tmp_path / "run.toml"
    toml.write_text('out = "~/runs/x"\ninit_from = "~/models/m"\n')
    assert load_toml(toml) == {"out": f"{home}/runs/x", "init_from": f"{home}/models/m"}
    toml.write_text('out = "~/runs/x"\n')
    assert make_train_config(None, str(toml), data="~/books.txt").out == f"{home}/runs/x"
    assert make_train_config(None, None, out="~/y", data="~/books.txt").data == f"{home}/books.txt"
    assert not (tmp_path / "~").exists()
