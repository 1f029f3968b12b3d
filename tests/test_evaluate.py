"""evaluate(): mean per-character cross-entropy over non-overlapping block_size windows, checked independently."""

from __future__ import annotations

import math

import pytest
import torch

from chargpt.config import GPTConfig
from chargpt.data.tokenizer import CharTokenizer
from chargpt.errors import ChargptError
from chargpt.inference.evaluate import evaluate
from chargpt.model import build_model
from chargpt.storage.checkpoint import load_model
from helpers import reference_loss


def tiny_model(vocab: CharTokenizer, kind: str = "gpt", block_size: int = 8) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = GPTConfig(vocab.vocab_size, block_size=block_size, n_embd=16, n_heads=2, n_layers=2, dropout=0.0, arch=kind)
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape) * 0.2)  # far from uniform, so context matters
    return model.eval()


def test_trained_model_on_unseen_text(trained_model_dir, corpus_text):
    model, tok = load_model(trained_model_dir)
    text = corpus_text[-3001:]  # 3000 predictions: 93 full windows of 32 and a partial one of 24
    result = evaluate(model, tok, text, precision="fp32")
    expected, count = reference_loss(model, tok, text)
    assert result["chars"] == count == len(text) - 1
    assert result["loss"] == pytest.approx(expected, rel=1e-6)
    assert result["bits_per_char"] == pytest.approx(expected / math.log(2), rel=1e-6)
    assert set(result) == {"loss", "bits_per_char", "chars", "precision", "quantize"} and result["precision"] == "fp32"


@pytest.mark.parametrize("length", [2, 5, 9, 17, 8 * 4 + 1, 8 * 4 + 2, 100])
@pytest.mark.parametrize("kind", ["gpt", "bigram"])
def test_window_arithmetic(length, kind):
    """Exact multiples of block_size, one window, shorter than a window, and a partial last window."""
    alphabet = "abcdefghij \n"
    text = "".join(alphabet[(i * 7 + i // 3) % len(alphabet)] for i in range(length))
    tok = CharTokenizer.from_text(alphabet)
    model = tiny_model(tok, kind)
    result = evaluate(model, tok, text, batch_size=3, precision="fp32")  # batches that do not divide the windows evenly
    expected, count = reference_loss(model, tok, text)
    assert result["chars"] == count == length - 1
    assert result["loss"] == pytest.approx(expected, rel=1e-6)


def test_windows_do_not_overlap():
    """The loss is not a sliding-window loss: context is cut at every block_size boundary."""
    tok = CharTokenizer.from_text("abcdefgh")
    model = tiny_model(tok, block_size=4)
    text = "abcdefghabcdefgh"
    sliding = []
    ids = torch.as_tensor(tok.encode(text))
    with torch.no_grad():
        for i in range(1, len(ids)):
            ctx = ids[max(0, i - 4) : i][None]
            sliding.append(-model(ctx)[0][0, -1].log_softmax(-1)[ids[i]].item())
    result = evaluate(model, tok, text, precision="fp32")
    assert result["loss"] == pytest.approx(reference_loss(model, tok, text)[0], rel=1e-6)
    assert abs(result["loss"] - sum(sliding) / len(sliding)) > 1e-4


def test_training_mode_is_restored_and_errors():
    tok = CharTokenizer.from_text("abc")
    model = tiny_model(tok).train()
    evaluate(model, tok, "abcabc")
    assert model.training
    with pytest.raises(ChargptError, match="at least 2 characters"):
        evaluate(model, tok, "a")
    with pytest.raises(ChargptError, match="not in the model's vocabulary: 'z'"):
        evaluate(model, tok, "abz")
