"""The OpenAI completions wire format: the request schema, its checks, and the response and error bodies.

Status codes: 400 for malformed JSON and for values out of range (NaN temperature, top_p outside (0, 1],
n < 1, max_tokens over the cap, prompt characters outside the vocabulary, ...); 422 for a body that does not
fit the schema (a wrong JSON type, a missing prompt, an unknown field); 404 for an unknown model. Every error
body is OpenAI's: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import itertools
import json
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

from chargpt.data.tokenizer import CharTokenizer
from chargpt.errors import ChargptError
from chargpt.runtime import sampling_problem
from chargpt.serve import chat
from chargpt.serve.engine import ChoiceSpec, Scored

M = TypeVar("M", bound=BaseModel)
MAX_STOP = 4  # stop strings per request, as in OpenAI's API
MAX_LOGPROBS = 5  # the likeliest characters listed per place, as in OpenAI's API
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions
DEFAULT_CHAT_MAX_TOKENS = 500  # a chat reply ends at the end of its turn; this caps one that never ends


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


class Sampling(BaseModel):
    """The fields /v1/completions and /v1/chat/completions share: the model and how to sample."""

    model_config = ConfigDict(extra="forbid")
    model: StrictStr | None = None
    max_tokens: StrictInt | None = None
    temperature: StrictFloat | StrictInt | None = None
    top_p: StrictFloat | StrictInt | None = None
    top_k: StrictInt | None = None  # an extension
    n: StrictInt | None = None
    stop: StrictStr | list[StrictStr] | None = None
    seed: StrictInt | None = None
    stream: StrictBool | None = None
    stream_options: StreamOptions | None = None
    user: StrictStr | None = None
    frequency_penalty: StrictFloat | StrictInt | None = None
    presence_penalty: StrictFloat | StrictInt | None = None


class CompletionRequest(Sampling):
    """POST /v1/completions. best_of/suffix/logit_bias are accepted at their neutral values only, so a client that
    sends defaults works unchanged. A prompt is a string, a list of strings, a list of token ids or a list of
    such lists, as in OpenAI's API."""

    prompt: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
    echo: StrictBool | None = None
    logprobs: StrictInt | None = None
    best_of: StrictInt | None = None
    suffix: StrictStr | None = None
    logit_bias: dict[str, StrictInt] | None = None


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: StrictStr
    text: StrictStr


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: StrictStr
    content: StrictStr | list[TextPart]
    name: StrictStr | None = None


class ChatRequest(Sampling):
    """POST /v1/chat/completions: the conversation as a play's dialogue (chargpt.serve.chat)."""

    messages: list[ChatMessage]
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = None


class TokenizeRequest(BaseModel):
    """POST /tokenize, as vLLM's: a text (prompt) or a conversation (messages) -> token ids."""

    model_config = ConfigDict(extra="forbid")
    model: StrictStr | None = None
    prompt: StrictStr | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: StrictBool = True
    add_special_tokens: StrictBool = True  # a character model has no special tokens: either way the same ids


class DetokenizeRequest(BaseModel):
    """POST /detokenize, as vLLM's: token ids -> text."""

    model_config = ConfigDict(extra="forbid")
    model: StrictStr | None = None
    tokens: list[StrictInt]


FIELD_TYPES = {
    "model": "a string",
    "prompt": "a string, a list of strings, a list of token ids or a list of such lists",
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
    "messages": 'a list of messages like {"role": "user", "content": "..."}',
    "max_completion_tokens": "an integer",
    "top_logprobs": "an integer",
    "tokens": "a list of token ids (integers)",
    "add_generation_prompt": "true or false",
    "add_special_tokens": "true or false",
    "role": "a string",
    "content": 'a string or a list of parts like {"type": "text", "text": "..."}',
    "name": "a string",
    "type": "a string",
    "text": "a string",
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
    echo: list[str] | None = None  # each choice's prompt text, to put before its text (echo: true)
    logprobs: bool = False


def parse_body(body: bytes, schema: type[M]) -> M:
    """Bytes -> the request in `schema`, or ApiError 400 (not JSON) / 422 (not the schema)."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as e:  # ValueError covers bad UTF-8 and JSON syntax
        raise ApiError(400, f"the request body is not valid JSON ({str(e)[:120]})", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(422, "the request body must be a JSON object", code="invalid_type")
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        raise _schema_error(e) from None


def _schema_error(e: ValidationError) -> ApiError:
    err = e.errors()[0]
    loc = [str(part) for part in err["loc"] if not _is_union_branch(part)]
    param = loc[0] if loc else None
    if err["type"] == "missing":
        return ApiError(422, f"'{'.'.join(loc)}' is required", param, "missing_required_parameter")
    if err["type"] == "extra_forbidden":
        return ApiError(422, f"unrecognized request argument: '{'.'.join(loc)}'", param, "unknown_parameter")
    got = type(err.get("input")).__name__
    if len(loc) > 2 and loc[-1] in FIELD_TYPES:  # a field of a list's item: messages.0.content
        where = ".".join(loc)
        return ApiError(422, f"'{where}' must be {FIELD_TYPES[loc[-1]]}, got {_json_type(got)}", where, "invalid_type")
    expected = FIELD_TYPES.get(param or "", "another type")
    return ApiError(422, f"'{param}' must be {expected}, got {_json_type(got)}", param, "invalid_type")


def _is_union_branch(part: object) -> bool:
    """pydantic names the branch of a union it tried ('str', 'list[int]', 'function-...') in an error's place."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool") or "[" in part or "-" in part)


def _json_type(python_type: str) -> str:
    return {"str": "a string", "int": "an integer", "float": "a number", "bool": "a boolean", "list": "a list"}.get(
        python_type, {"dict": "an object", "NoneType": "null"}.get(python_type, python_type)
    )


def _check(ok: bool, param: str, message: str) -> None:
    if not ok:
        raise ApiError(400, message, param, "invalid_value")


def _check_unsupported(req: CompletionRequest) -> None:
    _check(req.best_of in (None, 1), "best_of", "best_of is not supported; use n for several samples")
    _check(req.suffix is None, "suffix", "suffix (insertion) is not supported; leave it out")
    _check(not req.logit_bias, "logit_bias", "logit_bias is not supported; leave it out")
    _check(
        req.logprobs is None or 0 <= req.logprobs <= MAX_LOGPROBS, "logprobs",
        f"logprobs must be an integer in 0..{MAX_LOGPROBS} (the likeliest characters listed per place), got "
        f"{req.logprobs}",
    )  # fmt: skip


@dataclass(frozen=True)
class Checked:
    """The sampling settings of a request, checked: what each of its ChoiceSpecs takes."""

    max_tokens: int
    temperature: float
    top_k: int | None
    top_p: float | None
    stop: tuple[str, ...]
    n: int
    seed: int | None
    frequency_penalty: float
    presence_penalty: float


def check_sampling(req: Sampling, limits: Limits, default_max_tokens: int) -> Checked:
    """The sampling fields the completion and chat requests share, each checked (the ApiError names it)."""
    _check(req.stream_options is None or bool(req.stream), "stream_options", "stream_options needs stream: true")
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    temperature = 1.0 if req.temperature is None else _float(req.temperature, "temperature")
    top_p = None if req.top_p is None else _float(req.top_p, "top_p")
    penalties = [
        0.0 if value is None else _float(value, name)
        for name, value in (("frequency_penalty", req.frequency_penalty), ("presence_penalty", req.presence_penalty))
    ]
    problem = sampling_problem(temperature, req.top_k, top_p, stop, *penalties)  # the checks chargpt.generate makes
    if problem:
        raise ApiError(400, problem[1], problem[0], "invalid_value")
    n = 1 if req.n is None else req.n
    _check(n >= 1, "n", f"n must be an integer >= 1, got {n}")
    max_tokens = default_max_tokens if req.max_tokens is None else req.max_tokens
    _check(max_tokens >= 0, "max_tokens", f"max_tokens must be an integer >= 0, got {max_tokens}")
    _check(
        max_tokens <= limits.max_tokens,
        "max_tokens",
        f"max_tokens is {max_tokens}, more than this server's limit of {limits.max_tokens} (--max-tokens-limit)",
    )
    if req.seed is not None:
        _check(0 <= req.seed < 2**63 - n, "seed", f"seed must be an integer in [0, 2**63 - n), got {req.seed}")
    _check(len(stop) <= MAX_STOP, "stop", f"at most {MAX_STOP} stop strings, got {len(stop)}")
    return Checked(max_tokens, temperature, req.top_k, top_p, stop, n, req.seed, *penalties)


def specs_for(
    prompts: list[list[int]], sampling: Checked, limits: Limits, seed: int, extra_stop: tuple[str, ...] = (),
    logprobs: int | None = None, echo: bool = False,
) -> list[ChoiceSpec]:  # fmt: skip
    """One ChoiceSpec per (prompt, sample); sample i of a prompt uses seed + i, as generate(num_samples=n) does.
    `seed` is used when the request has none."""
    n = sampling.n
    _check(
        len(prompts) * n <= limits.max_rows,
        "n",
        f"{len(prompts)} prompt(s) x n={n} = {len(prompts) * n} samples, more than this server's batch of "
        f"{limits.max_rows} (--max-batch)",
    )
    base = seed if sampling.seed is None else sampling.seed
    s = sampling
    return [
        ChoiceSpec(
            ids,
            s.max_tokens,
            s.temperature,
            s.top_k,
            s.top_p,
            base + i,
            s.stop + extra_stop,
            logprobs,
            echo,
            s.frequency_penalty,
            s.presence_penalty,
        )  # fmt: skip
        for ids in prompts
        for i in range(n)
    ]


def to_completion(req: CompletionRequest, tokenizer: CharTokenizer, limits: Limits, seed: int) -> Completion:
    """Check every value; the ApiError names the field. `seed` is used when the request has none."""
    _check_unsupported(req)
    sampling = check_sampling(req, limits, DEFAULT_MAX_TOKENS)
    prompts = prompt_list(req.prompt)
    _check(len(prompts) >= 1, "prompt", "prompt is an empty list; give at least one prompt")
    ids = [encode_prompt(p, tokenizer, limits) for p in prompts]
    specs = specs_for(ids, sampling, limits, seed, logprobs=req.logprobs, echo=bool(req.echo))
    texts = [tokenizer.decode(p) for p in ids for _ in range(sampling.n)]
    return Completion(
        specs,
        sum(len(p) for p in ids),
        bool(req.stream),
        bool(req.stream_options and req.stream_options.include_usage),
        texts if req.echo else None,
        req.logprobs is not None,
    )


def to_chat(
    req: ChatRequest, tokenizer: CharTokenizer, limits: Limits, seed: int, speakers: dict[str, str]
) -> Completion:
    """A chat request as the completion of its conversation's text (chargpt.serve.chat): each choice ends at the
    blank line that ends the assistant's turn, or at a stop string of the request."""
    _check(
        req.max_tokens is None or req.max_completion_tokens is None or req.max_tokens == req.max_completion_tokens,
        "max_completion_tokens", "max_tokens and max_completion_tokens differ; give one of them",
    )  # fmt: skip
    if req.max_tokens is None and req.max_completion_tokens is not None:
        req = req.model_copy(update={"max_tokens": req.max_completion_tokens})
    top = req.top_logprobs
    _check(
        top is None or (bool(req.logprobs) and 0 <= top <= MAX_LOGPROBS), "top_logprobs",
        f"top_logprobs must be an integer in 0..{MAX_LOGPROBS}, with logprobs: true; got {top}",
    )  # fmt: skip
    sampling = check_sampling(req, limits, min(DEFAULT_CHAT_MAX_TOKENS, limits.max_tokens))
    text = chat_text(req.messages, tokenizer, speakers, add_generation_prompt=True)
    ids = encode_prompt(text, tokenizer, limits, "messages")
    specs = specs_for([ids], sampling, limits, seed, (chat.TURN_END,), (top or 0) if req.logprobs else None)
    return Completion(specs, len(ids), bool(req.stream), bool(req.stream_options and req.stream_options.include_usage),
                      None, bool(req.logprobs))  # fmt: skip


def chat_text(
    messages: list[ChatMessage], tokenizer: CharTokenizer, speakers: dict[str, str], add_generation_prompt: bool
) -> str:
    """The conversation as the play's text; a role, name or content the model cannot write is a 400 naming it."""
    _check(bool(messages), "messages", "messages is an empty list; give at least one message")
    plain = []
    for i, m in enumerate(messages):
        where = f"messages.{i}"
        _check(
            m.role in chat.SCENE_ROLES + chat.SPEAKING_ROLES, f"{where}.role",
            f"role {m.role!r} is not supported; a dialogue has the roles system, developer, user and assistant",
        )  # fmt: skip
        if isinstance(m.content, list):
            bad = next((p.type for p in m.content if p.type != "text"), None)
            _check(
                bad is None, f"{where}.content", f"a content part of type {bad!r}: a character model reads text only"
            )
        content = m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)
        _check_writable(content, tokenizer, f"{where}.content", "its content")
        entry: dict[str, Any] = {"role": m.role, "content": content}
        if m.name is not None and m.role not in chat.SCENE_ROLES:
            problem = chat.name_problem(m.name)
            _check(problem is None, f"{where}.name", f"the name {problem}")
            _check_writable(m.name, tokenizer, f"{where}.name", "the speaker's name")
            entry["name"] = m.name
        elif m.role in chat.SPEAKING_ROLES:
            _check_speaker(speakers[m.role], m.role, tokenizer)
        plain.append(entry)
    if add_generation_prompt:
        _check_speaker(speakers["assistant"], "assistant", tokenizer)
    return chat.render(plain, speakers, add_generation_prompt)  # its callers encode it (the turns' ':' and breaks)


def _check_writable(text: str, tokenizer: CharTokenizer, param: str, what: str) -> None:
    try:
        tokenizer.encode(text)
    except ChargptError as e:
        raise ApiError(400, f"{what}: {e}", param, "invalid_value") from None


def _check_speaker(name: str, role: str, tokenizer: CharTokenizer) -> None:
    try:
        tokenizer.encode(name + ":\n")
    except ChargptError as e:
        raise ApiError(
            400, f"the {role}'s speaker {name!r} cannot be written by this model ({e}); give the message a name the "
            f"model can write, or start the server with --chat-speakers {role}=NAME", "messages", "invalid_value",
        ) from None  # fmt: skip


def prompt_list(prompt: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    """The prompts of a request: a string, or a list of token ids, is one prompt; other lists are several."""
    if isinstance(prompt, str):
        return [prompt]
    ids = [t for t in prompt if isinstance(t, int)]
    if prompt and len(ids) == len(prompt):
        return [ids]
    return [p for p in prompt if isinstance(p, str | list)]


def _float(value: float | int, param: str) -> float:
    """A JSON number as a float; an integer too large for one (10**400) is a 400 that names the field."""
    try:
        return float(value)
    except OverflowError:
        raise ApiError(400, f"{param} is too large a number", param, "invalid_value") from None


def encode_prompt(
    prompt: str | list[int], tokenizer: CharTokenizer, limits: Limits, param: str = "prompt", allow_empty: bool = False
) -> list[int]:
    """A prompt's token ids: its text encoded, or its ids checked against the vocabulary."""
    _check(bool(prompt) or allow_empty, param, f"the {param} is empty; give at least one character (e.g. a newline)")
    _check(
        len(prompt) <= limits.max_prompt_chars,
        param,
        f"the {param} has {len(prompt)} characters, more than this server's limit of {limits.max_prompt_chars}",
    )
    if not isinstance(prompt, str):
        check_ids(prompt, tokenizer, param)
        return list(prompt)
    try:
        return tokenizer.encode(prompt).tolist()
    except ChargptError as e:
        raise ApiError(400, f"{param}: {e}", param, "invalid_value") from None


def check_ids(ids: Sequence[int], tokenizer: CharTokenizer, param: str) -> None:
    bad = next((t for t in ids if not 0 <= t < tokenizer.vocab_size), None)
    _check(
        bad is None, param,
        f"token id {bad} is out of range: this model's ids are 0..{tokenizer.vocab_size - 1} (POST /tokenize "
        f"gives a text's ids)",
    )  # fmt: skip


def new_id(prefix: str = "cmpl-") -> str:
    return prefix + uuid.uuid4().hex


def choice(index: int, text: str, finish_reason: str | None, logprobs: dict | None = None) -> dict[str, Any]:
    return {"text": text, "index": index, "finish_reason": finish_reason, "logprobs": logprobs}


def logprobs_body(scored: Sequence[Scored], offset: int) -> dict[str, list]:
    """OpenAI's completion logprobs for these characters; the first starts at `offset` in the choice's text
    (with echo the prompt starts at 0; without, the generated text starts at the prompt's length)."""
    offsets = list(itertools.accumulate((len(s.token) for s in scored), initial=offset))[:-1]
    return {
        "tokens": [s.token for s in scored],
        "token_logprobs": [s.logprob for s in scored],
        "top_logprobs": [s.top for s in scored],
        "text_offset": offsets,
    }


def chat_logprobs(scored: Sequence[Scored], top: int) -> dict[str, list]:
    """OpenAI's chat logprobs for these characters: each with its bytes and its `top` likeliest alternatives."""

    def entry(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8", "surrogatepass"))}

    def alternatives(s: Scored) -> list[dict[str, Any]]:
        return [entry(t, v) for t, v in list((s.top or {}).items())[:top]]

    return {"content": [{**entry(s.token, s.logprob or 0.0), "top_logprobs": alternatives(s)} for s in scored]}


def chat_choice(
    index: int, message: dict[str, Any], finish_reason: str | None, logprobs: dict | None = None, delta: bool = False
) -> dict:
    """A chat choice: the whole `message`, or in a stream's chunk the `delta` since the last one."""
    return {"index": index, "delta" if delta else "message": message, "finish_reason": finish_reason,
            "logprobs": logprobs}  # fmt: skip


def chat_body(
    cid: str, model: str, created: int, choices: list[dict[str, Any]], use: dict | None, chunk: bool = False
) -> dict[str, Any]:
    return {
        "id": cid,
        "object": "chat.completion.chunk" if chunk else "chat.completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": use,
    }


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


def stream_chunk(
    cid: str, model: str, created: int, pieces: list[tuple[int, str, str | None, dict | None]], with_usage: bool
) -> str:
    """One SSE event per (index, text, finish_reason, logprobs), in one write. With usage asked for, every chunk
    but the last carries `"usage": null`."""
    out = []
    for p in pieces:
        body = completion_body(cid, model, created, [choice(*p)], None)
        if not with_usage:
            del body["usage"]
        out.append(sse(body))
    return "".join(out)


def sse(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def now() -> int:
    return int(time.time())
