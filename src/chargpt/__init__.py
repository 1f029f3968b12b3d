"""chargpt: a character-level GPT you can train on a laptop CPU, sample fast, and scale out with torchrun."""

from chargpt.checkpoint import load_model, resume_config, save_model
from chargpt.config import GPTConfig, TrainConfig, make_train_config
from chargpt.data import load_corpus, shakespeare_text
from chargpt.errors import ChargptError
from chargpt.evaluate import evaluate
from chargpt.generate import SampleConfig, generate, stream
from chargpt.model import GPT, BigramLM, build_model
from chargpt.tokenizer import CharTokenizer
from chargpt.train import TrainResult, train

__version__ = "0.1.0"

__all__ = [
    "GPT",
    "BigramLM",
    "GPTConfig",
    "TrainConfig",
    "SampleConfig",
    "CharTokenizer",
    "ChargptError",
    "TrainResult",
    "build_model",
    "load_model",
    "save_model",
    "load_corpus",
    "shakespeare_text",
    "make_train_config",
    "resume_config",
    "train",
    "generate",
    "stream",
    "evaluate",
    "__version__",
]
