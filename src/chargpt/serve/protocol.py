"""The OpenAI completions wire format: the request schema, its checks, and the response and error bodies.

Status codes: 400 for malformed JSON and for values out of range (NaN temperature, top_p outside (0, 1],
n < 1, max_tokens over the cap, prompt characters outside the vocabulary, ...); 422 for a body that does not
fit the schema (a wrong JSON type, a missing prompt, an unknown field); 404 for an unknown model. Every error
body is OpenAI's: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

from chargpt.data.tokenizer import CharTokenizer
from chargpt.errors import ChargptError
from chargpt.runtime import sampling_problem
from chargpt.serve.engine import ChoiceSpec, Piece

MAX_STOP = 4  # stop strings per request, as in OpenAI's API
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions


class ApiError(Exception):
    """An HTTP error with OpenAI's error body."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ):
        message = message.encode("utf-8", "backslashreplace").decode("utf-8")  # a lone surrogate a client sent
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: StrictBool = False


class CompletionRequest(BaseModel):
    """POST /v1/completions. top_k is an extension; echo/logprobs/best_of/suffix/penalties/logit_bias are
    accepted at their neutral values only, so a client that sends defaults works unchanged."""

    model_config = ConfigDict(extra="forbid")
    model: StrictStr | None = None
    prompt: StrictStr | list[StrictStr]
    max_tokens: StrictInt | None = None
    temperature: StrictFloat | StrictInt | None = None
    top_p: StrictFloat | StrictInt | None = None
    top_k: StrictInt | None = None
    n: StrictInt | None = None
    stop: StrictStr | list[StrictStr] | None = None
    seed: StrictInt | None = None
    stream: StrictBool | None = None
    stream_options: StreamOptions | None = None
    user: StrictStr | None = None
    echo: StrictBool | None = None
    logprobs: StrictInt | None = None
    best_of: StrictInt | None = None
    suffix: StrictStr | None = None
    frequency_penalty: StrictFloat | StrictInt | None = None
    presence_penalty: StrictFloat | StrictInt | None = None
    logit_bias: dict[str, StrictInt] | None = None


FIELD_TYPES = {
    "model": "a string",
    "prompt": "a string or a list of strings",
    "stop": "a string or a list of strings",
    "max_tokens": "an integer",
    "top_k": "an integer",
    "n": "an integer",
    "seed": "an integer",
    "logprobs": "an integer",
    "best_of": "an integer",
    "temperature": "a number",
    "top_p": "a number",
    "frequency_penalty": "a number",
    "presence_penalty": "a number",
    "stream": "true or false",
    "echo": "true or false",
    "stream_options": 'an object like {"include_usage": true}',
    "user": "a string",
    "suffix": "a string",
    "logit_bias": "an object of integers",
}


@dataclass(frozen=True)
class Limits:
    max_tokens: int = 4096  # --max-tokens-limit
    max_prompt_chars: int = 65536
    max_rows: int = 32  # --max-batch: n x prompts must fit in one batch
    max_body_bytes: int = 1 << 20


@dataclass
class Completion:
    """A validated request, ready for the engine: one ChoiceSpec per (prompt, sample)."""

    choices: list[ChoiceSpec]
    prompt_chars: int
    stream: bool
    include_usage: bool


def parse_body(body: bytes) -> CompletionRequest:
    """Bytes -> CompletionRequest, or ApiError 400 (not JSON) / 422 (not the schema)."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as e:  # ValueError covers bad UTF-8 and JSON syntax
        raise ApiError(400, f"the request body is not valid JSON ({str(e)[:120]})", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(422, "the request body must be a JSON object", code="invalid_type")
    try:
        return CompletionRequest.model_validate(data)
    except ValidationError as e:
        raise _schema_error(e) from None


def _schema_error(e: ValidationError) -> ApiError:
    err = e.errors()[0]
    loc = [str(part) for part in err["loc"]]
    param = loc[0] if loc else None
    if err["type"] == "missing":
        return ApiError(422, f"'{'.'.join(loc)}' is required", param, "missing_required_parameter")
    if err["type"] == "extra_forbidden":
        return ApiError(422, f"unrecognized request argument: '{'.'.join(loc)}'", param, "unknown_parameter")
    expected = FIELD_TYPES.get(param or "", "another type")
    got = type(err.get("input")).__name__
    return ApiError(422, f"'{param}' must be {expected}, got {_json_type(got)}", param, "invalid_type")


def _json_type(python_type: str) -> str:
    return {"str": "a string", "int": "an integer", "float": "a number", "bool": "a boolean", "list": "a list"}.get(
        python_type, {"dict": "an object", "NoneType": "null"}.get(python_type, python_type)
    )


def _check(ok: bool, param: str, message: str) -> None:
    if not ok:
        raise ApiError(400, message, param, "invalid_value")


def _check_unsupported(req: CompletionRequest) -> None:
    _check(not req.echo, "echo", "echo is not supported; append the prompt yourself")
    _check(req.logprobs is None, "logprobs", "logprobs are not supported; leave logprobs out")
    _check(req.best_of in (None, 1), "best_of", "best_of is not supported; use n for several samples")
    _check(req.suffix is None, "suffix", "suffix (insertion) is not supported; leave it out")
    _check(not req.logit_bias, "logit_bias", "logit_bias is not supported; leave it out")
    for name in ("frequency_penalty", "presence_penalty"):
        value = getattr(req, name)
        _check(value is None or value == 0, name, f"{name} is not supported; leave it out or set it to 0")
    _check(req.stream_options is None or bool(req.stream), "stream_options", "stream_options needs stream: true")


def to_completion(req: CompletionRequest, tokenizer: CharTokenizer, limits: Limits, seed: int) -> Completion:
    """Check every value; the ApiError names the field. `seed` is used when the request has none."""
    _check_unsupported(req)
    temperature = 1.0 if req.temperature is None else _float(req.temperature, "temperature")
    top_p = None if req.top_p is None else _float(req.top_p, "top_p")
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    problem = sampling_problem(temperature, req.top_k, top_p, stop)  # the checks chargpt.generate makes
    if problem:
        raise ApiError(400, problem[1], problem[0], "invalid_value")
    n = 1 if req.n is None else req.n
    _check(n >= 1, "n", f"n must be an integer >= 1, got {n}")
    max_tokens = DEFAULT_MAX_TOKENS if req.max_tokens is None else req.max_tokens
    _check(max_tokens >= 0, "max_tokens", f"max_tokens must be an integer >= 0, got {max_tokens}")
    _check(
        max_tokens <= limits.max_tokens,
        "max_tokens",
        f"max_tokens is {max_tokens}, more than this server's limit of {limits.max_tokens} (--max-tokens-limit)",
    )
    if req.seed is not None:
        _check(0 <= req.seed < 2**63 - n, "seed", f"seed must be an integer in [0, 2**63 - n), got {req.seed}")
    _check(len(stop) <= MAX_STOP, "stop", f"at most {MAX_STOP} stop strings, got {len(stop)}")
    prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
    _check(len(prompts) >= 1, "prompt", "prompt is an empty list; give at least one prompt")
    _check(
        len(prompts) * n <= limits.max_rows,
        "n",
        f"{len(prompts)} prompt(s) x n={n} = {len(prompts) * n} samples, more than this server's batch of "
        f"{limits.max_rows} (--max-batch)",
    )
    specs = []
    for prompt in prompts:
        ids = _encode(prompt, tokenizer, limits)
        base = seed if req.seed is None else req.seed
        for i in range(n):  # sample i uses seed + i, as generate(num_samples=n) does
            specs.append(ChoiceSpec(ids, max_tokens, temperature, req.top_k, top_p, base + i, stop))
    return Completion(
        specs,
        sum(len(p) for p in prompts),
        bool(req.stream),
        bool(req.stream_options and req.stream_options.include_usage),
    )


def _float(value: float | int, param: str) -> float:
    """A JSON number as a float; an integer too large for one (10**400) is a 400 that names the field."""
    try:
        return float(value)
    except OverflowError:
        raise ApiError(400, f"{param} is too large a number", param, "invalid_value") from None


def _encode(prompt: str, tokenizer: CharTokenizer, limits: Limits) -> list[int]:
    _check(bool(prompt), "prompt", "the prompt is empty; give at least one character (e.g. a newline)")
    _check(
        len(prompt) <= limits.max_prompt_chars,
        "prompt",
        f"the prompt has {len(prompt)} characters, more than this server's limit of {limits.max_prompt_chars}",
    )
    try:
        return tokenizer.encode(prompt).tolist()
    except ChargptError as e:
        raise ApiError(400, f"prompt: {e}", "prompt", "invalid_value") from None


def new_id() -> str:
    return "cmpl-" + uuid.uuid4().hex


def choice(index: int, text: str, finish_reason: str | None) -> dict[str, Any]:
    return {"text": text, "index": index, "finish_reason": finish_reason, "logprobs": None}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_body(
    cid: str, model: str, created: int, choices: list[dict[str, Any]], use: dict | None
) -> dict[str, Any]:
    return {
        "id": cid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": use,
    }


def stream_chunk(cid: str, model: str, created: int, pieces: list[Piece], with_usage: bool) -> str:
    """One SSE event per piece, in one write. With usage asked for, every chunk but the last carries `"usage": null`."""
    out = []
    for p in pieces:
        body = completion_body(cid, model, created, [choice(p.index, p.text, p.finish_reason)], None)
        if not with_usage:
            del body["usage"]
        out.append(sse(body))
    return "".join(out)


def sse(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def now() -> int:
    return int(time.time())
