"""The Python API's public functions check their arguments: a wrong type or value is a TypeError, ValueError or
ChargptError that says what to pass, never an exception from deep inside torch."""

from __future__ import annotations

import copy

import pytest
import torch

import chargpt
from chargpt.errors import ChargptError
from chargpt.inference.evaluate import evaluate
from chargpt.inference.generate import generate, stream
from chargpt.storage.checkpoint import load_model


def test_wrong_arguments_say_what_to_pass(tiny, trained_model_dir):
    model, tok = tiny
    half = copy.deepcopy(model).half()
    with torch.device("meta"):
        from chargpt.model import build_model

        meta = build_model(model.config)
    cases = [
        (lambda: generate(model, tok, 5), TypeError, "prompt as a str"),
        (lambda: generate(None, tok, "a"), TypeError, "takes a chargpt model"),
        (lambda: generate(model, "abc", "a"), TypeError, "CharTokenizer"),
        (lambda: list(stream(model, tok, "a", config={"seed": 1})), TypeError, "SampleConfig"),
        (lambda: evaluate(model, tok, None), TypeError, "text as a str"),
        (lambda: generate(half, tok, "a"), ChargptError, "model.float()"),
        (lambda: generate(meta, tok, "a"), ChargptError, "meta device"),
        (lambda: chargpt.make_train_config(device=5), ChargptError, "unknown device 5"),
        (lambda: chargpt.train("cfg"), TypeError, "make_train_config"),
        (lambda: load_model(trained_model_dir, device="nonsense"), ChargptError, "unknown device 'nonsense'"),
        (lambda: load_model(None), TypeError, "model folder's path"),
        (lambda: tok.decode([2**70]), ChargptError, "token ids must be integers"),
    ]
    for call, kind, words in cases:
        with pytest.raises(kind, match=words):
            call()


def test_chargpt_train_and_evaluate_stay_callable_after_their_modules_are_imported(tiny, corpus_text):
    """`chargpt.train` and `chargpt.evaluate` are the functions, whatever was imported before: their modules live
    in chargpt.training and chargpt.inference, so importing them cannot replace the package's attribute."""
    import chargpt.inference.evaluate
    import chargpt.training.loop  # noqa: F401

    model, tok = tiny
    assert chargpt.evaluate(model, tok, corpus_text[:500], precision="fp32")["chars"] == 499
    with pytest.raises(TypeError, match="make_train_config"):
        chargpt.train("cfg")
