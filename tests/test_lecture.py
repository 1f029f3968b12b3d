"""chargpt.lecture, the lecture's GPT as written: the fast model's logits on the same weights, trained and resumed
by `--arch lecture`, and docs/from-scratch.md's excerpts are its code."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import torch

import chargpt.lecture as lecture
import chargpt.model as fast
from chargpt.config import GPTConfig
from chargpt.storage import checkpoint as ckpt
from chargpt.training.loop import train
from chargpt.training.settings import resume_config
from helpers import assert_same_tensors, call_main, final_state, metrics, small

PAGE = Path(__file__).resolve().parents[1] / "docs" / "from-scratch.md"


def test_the_lecture_model_gives_the_fast_models_logits(trained_model_dir: Path, corpus_text: str):
    """A trained model.safetensors loaded into both: the same logits within float32 rounding, on prompts
    shorter than and as long as the context; and the weights go back to the fast layout unchanged."""
    model, tokenizer = ckpt.load_model(trained_model_dir)
    cfg = model.config
    readable = lecture.GPTLanguageModel(cfg).eval()
    readable.load_state_dict(lecture.from_fast_weights(model.state_dict(), cfg))
    for text in ("R", "ROMEO:\n", corpus_text[1000 : 1000 + cfg.block_size]):
        idx = torch.as_tensor([tokenizer.encode(text).tolist()])
        with torch.no_grad():
            expected, got = model(idx)[0], readable(idx)[0]
        assert got.shape == expected.shape and (got - expected).abs().max().item() < 1e-5, text
    assert_same_tensors(lecture.to_fast_weights(readable.state_dict(), cfg), dict(model.state_dict()))
    # not vacuous: a head's query and key swapped give other logits
    state = lecture.from_fast_weights(model.state_dict(), cfg)
    q, k = "blocks.0.sa.heads.0.query.weight", "blocks.0.sa.heads.0.key.weight"
    readable.load_state_dict({**state, q: state[k], k: state[q]})
    with torch.no_grad():
        assert (readable(idx)[0] - model(idx)[0]).abs().max().item() > 1e-3


def test_the_lecture_model_has_the_seed_models_parameter_count():
    import chargpt

    assert chargpt.lecture is lecture and "lecture" in dir(chargpt)  # chargpt.lecture.GPTLanguageModel, no import
    assert lecture.GPTLanguageModel(GPTConfig()).num_params() == fast.GPT(GPTConfig()).num_params() == 10_788_929


def test_arch_lecture_trains_resumes_exactly_and_samples(text_file: Path, tmp_path: Path, capsys):
    """--arch lecture: a real run that learns, paused and resumed bit for bit like the fast model's, whose folder
    samples and evaluates as any model does (export says what to do instead)."""
    ref, out = tmp_path / "ref", tmp_path / "run"
    train(small(ref, text_file, n_updates=24, arch="lecture"), progress=False)
    train(small(out, text_file, n_updates=24, arch="lecture"), progress=False, pause_after=12)
    train(resume_config(out), resume=True, progress=False)
    assert_same_tensors(final_state(ref)["model"], final_state(out)["model"])
    assert metrics(out) == metrics(ref)
    evals = [m["val_loss"] for m in metrics(out) if m["kind"] == "eval"]
    assert evals[-1] < evals[0] - 0.3  # it learned
    model, _ = ckpt.load_model(out)
    assert isinstance(model, lecture.GPTLanguageModel)
    capsys.readouterr()
    rc, text, err = call_main(["sample", "--model", str(out), "--max-new-tokens", "20", "--seed", "1"], capsys)
    assert rc == 0 and len(text) >= 20, err
    rc, text, err = call_main(["info", str(out)], capsys)
    assert rc == 0 and "a lecture model" in text and "2 layers x 4 heads" in text, err
    rc, text, err = call_main(["export", "--model", str(out), "--out", str(tmp_path / "m.onnx")], capsys)
    assert rc == 2 and "to_fast_weights" in err and err.count("\n") == 1, err


def test_the_pages_excerpts_are_the_packages_code():
    """Every ```python block of docs/from-scratch.md begins with `# chargpt/FILE.py: NAME` and is that object's
    source, exactly; the page shows each part of the lecture model."""
    blocks = re.findall(r"^```python\n# chargpt/(\w+)\.py: (\w+)\n(.*?)^```", PAGE.read_text(), re.M | re.S)
    modules = {"lecture": lecture, "model": fast}
    for module, name, body in blocks:
        assert body == inspect.getsource(getattr(modules[module], name)), f"{module}.{name} drifted"
    shown = {name for module, name, _ in blocks if module == "lecture"}
    assert shown == {"Head", "MultiHeadAttention", "FeedForward", "Block", "GPTLanguageModel"}
    assert PAGE.read_text().count("```python") == len(blocks)
