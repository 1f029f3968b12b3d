"""The settings of the commands that run a trained model (sample, eval, serve), light enough for the command line's
parser (no torch): SampleConfig (also chargpt.generate's), ServeConfig, and the flags they share, each described
once. chargpt.cli.parser makes their flags from these fields."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from chargpt.config import DEVICE_HELP, PRECISIONS, QUANTIZE, check_name, setting
from chargpt.errors import ChargptError

PRECISION_HELP = "auto (what is faster on this machine, per kind of work), fp32, or bf16 (default: auto)"
QUANTIZE_HELP = "int8 weights (faster decoding, slightly different numbers), none, or auto: int8 where measured faster"


def model_setting() -> Any:
    return setting(help="model directory (required)", required=True, metavar="DIR")


def device_setting() -> Any:
    return setting("auto", f"{DEVICE_HELP} (default: auto)")


def threads_setting(default_text: str = "the cores free at start-up") -> Any:
    return setting(None, f"CPU threads (default: {default_text})", metavar="N")


def precision_setting() -> Any:
    return setting("auto", PRECISION_HELP, choices=PRECISIONS)


def quantize_setting(default: str = "auto", default_text: str = "auto") -> Any:
    return setting(default, f"{QUANTIZE_HELP} (default: {default_text})", choices=QUANTIZE)


@dataclass
class SampleConfig:
    max_new_tokens: int = setting(500, "characters to generate (default: 500)", metavar="N")
    temperature: float = setting(1.0, "<1 = safer, >1 = wilder, 0 = greedy (it loops) (default: 1.0)", metavar="X")
    top_k: int | None = setting(None, "sample from the K likeliest characters (default: off)", metavar="K")
    # nucleus: keep the smallest set of tokens whose probability reaches top_p
    top_p: float | None = setting(None, "nucleus sampling, in (0, 1] (default: off)", metavar="P")
    # sample i of a batch uses seed + i
    seed: int | None = setting(None, "same seed, same text (default: random)", metavar="N")
    num_samples: int = setting(1, "samples generated together as one batch (default: 1)", metavar="N")
    stop: Sequence[str] = setting(
        help="end a sample at this string (not included); repeatable (default: none)", action="append",
        default_factory=tuple,
    )  # fmt: skip
    # OpenAI's penalties: each logit minus count x frequency_penalty, minus presence_penalty once a character
    # was generated; counted over the sample's generated characters (not the prompt)
    frequency_penalty: float = setting(
        0.0, "lower a character's logit by this much per time it was generated, in [-2, 2] (default: 0)", metavar="X"
    )
    presence_penalty: float = setting(
        0.0, "lower the logit of every character generated so far by this much, in [-2, 2] (default: 0)", metavar="X"
    )
    precision: str = precision_setting()  # per kind of work (prefill, one-token decode), the faster here
    quantize: str = quantize_setting()

    def validate(self) -> None:
        check_name("precision", self.precision, PRECISIONS)
        check_name("quantization", self.quantize, QUANTIZE)
        problem = sampling_problem(
            self.temperature, self.top_k, self.top_p, self.stop, self.frequency_penalty, self.presence_penalty
        )
        if problem:
            raise ChargptError(problem[1])
        if self.seed is not None and (not isinstance(self.seed, int) or not 0 <= self.seed < 2**63):
            raise ChargptError(f"seed must be an integer in [0, 2**63), got {self.seed}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 0:
            raise ChargptError(f"max_new_tokens must be an integer >= 0, got {self.max_new_tokens}")
        if not isinstance(self.num_samples, int) or self.num_samples < 1:
            raise ChargptError(f"num_samples must be an integer >= 1, got {self.num_samples}")


def sampling_problem(
    temperature: Any, top_k: Any, top_p: Any, stop: Sequence[str] = (), frequency_penalty: Any = 0.0,
    presence_penalty: Any = 0.0,
) -> tuple[str, str] | None:  # fmt: skip
    """The first bad sampling setting as (its name, a one-line message), or None: the one check of these values,
    for the Python API and the CLI (SampleConfig) and for the server's requests (which name the field)."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature < math.inf:
        return "temperature", f"temperature must be a number >= 0 (0 = greedy), got {temperature}"
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        return "top_k", f"top_k must be an integer >= 1, got {top_k}"
    if top_p is not None and not (isinstance(top_p, (int, float)) and not isinstance(top_p, bool) and 0 < top_p <= 1):
        return "top_p", f"top_p must be in (0, 1] (1 = off), got {top_p}"
    if any(not s for s in stop):
        return "stop", "stop strings must not be empty"
    for name, value in (("frequency_penalty", frequency_penalty), ("presence_penalty", presence_penalty)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not -2 <= value <= 2:
            return name, f"{name} must be a number in [-2, 2] (0 = off), got {value}"
    return None


SPEAKING_ROLES = ("user", "assistant")  # the chat roles that speak a turn (chargpt.serve.chat)
DEFAULT_SPEAKERS = "user=USER,assistant=ASSISTANT"


def parse_speakers(spec: str) -> dict[str, str]:
    """--chat-speakers 'user=ROMEO,assistant=JULIET' -> {'user': 'ROMEO', 'assistant': 'JULIET'}; the roles not
    named keep their default speakers. A ChargptError says what is wrong."""
    speakers = dict(item.split("=", 1) for item in DEFAULT_SPEAKERS.split(","))
    for item in spec.split(","):
        role, sep, name = item.partition("=")
        role, name = role.strip(), name.strip()
        if not sep or role not in SPEAKING_ROLES:
            raise ChargptError(
                f"--chat-speakers takes ROLE=NAME pairs for the roles {' and '.join(SPEAKING_ROLES)}, separated by "
                f"commas (e.g. user=ROMEO,assistant=JULIET); got {item.strip()!r}"
            )
        problem = name_problem(name)
        if problem:
            raise ChargptError(f"--chat-speakers: the speaker of {role} {problem}")
        speakers[role] = name
    return speakers


def name_problem(name: str) -> str | None:
    """Why `name` cannot be a speaker's name in a turn's first line, or None."""
    if not name.strip():
        return "is empty"
    if any(c in name for c in ":\n\r"):
        return f"{name!r} holds a colon or a line break, which would end the speaker's line"
    return None


@dataclass
class ServeConfig:
    """What `chargpt serve` takes besides --device and --threads (flag `--max-batch` sets `max_batch`, ...)."""

    model: str = model_setting()
    host: str = setting(
        "127.0.0.1", "127.0.0.1 = this machine only; 0.0.0.0 = every interface (default: 127.0.0.1)", metavar="HOST"
    )
    port: int = setting(8000, "0 = any free port (default: 8000)", metavar="PORT")
    api_key: str | None = setting(
        None, "require 'Authorization: Bearer KEY' on every /v1/ request (default: none)", metavar="KEY"
    )
    allow_host: Sequence[str] = setting(
        help="another Host name to answer to (one that points at this machine); repeatable (default: the --host "
        "address and, on a loopback address, localhost; every name on 0.0.0.0)", action="append",
        default_factory=tuple, metavar="NAME",
    )  # fmt: skip
    max_batch: int = setting(32, "sequences decoded together (default: 32)", metavar="N")
    max_queue: int = setting(64, "requests that may wait; beyond: 503 (default: 64)", metavar="N")
    max_tokens_limit: int = setting(4096, "cap on max_tokens per request (default: 4096)", metavar="N")
    max_prompt_chars: int = setting(65536, "cap on a prompt's length in characters (default: 65536)", metavar="N")
    chat_speakers: str = setting(
        DEFAULT_SPEAKERS, "the speakers of /v1/chat/completions' roles, as ROLE=NAME pairs (default: "
        "user=USER,assistant=ASSISTANT)", metavar="PAIRS",
    )  # fmt: skip
    metrics_public: bool = setting(False, "serve /metrics without the API key (it tells how the server is used)")
    max_body_bytes: int = 1 << 20  # (not a flag)
    precision: str = precision_setting()  # per kind of work (prefill, one-token decode), as in sampling
    quantize: str = quantize_setting()
    grace: float = 1.0  # seconds running requests get to finish after Ctrl-C / SIGTERM (not a flag)

    def validate(self) -> None:
        checks = [
            (0 <= self.port <= 65535, f"--port must be in 0..65535 (0 = any free port), got {self.port}"),
            (self.max_batch >= 1, f"--max-batch must be >= 1, got {self.max_batch}"),
            (self.max_queue >= 0, f"--max-queue must be >= 0, got {self.max_queue}"),
            (self.max_tokens_limit >= 1, f"--max-tokens-limit must be >= 1, got {self.max_tokens_limit}"),
            (self.max_prompt_chars >= 1, f"--max-prompt-chars must be >= 1, got {self.max_prompt_chars}"),
            (self.api_key is None or self.api_key.strip() != "", "--api-key must not be empty"),
            (
                self.api_key is None
                or (self.api_key.isascii() and self.api_key.isprintable() and " " not in self.api_key),
                "--api-key must be printable ASCII without spaces (a client could never send it in a header); "
                "check for a stray space or newline",
            ),
        ]
        check_name("precision", self.precision, PRECISIONS)
        check_name("quantization", self.quantize, QUANTIZE)
        for ok, message in checks:
            if not ok:
                raise ChargptError(message)
        parse_speakers(self.chat_speakers)
