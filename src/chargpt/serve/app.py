"""The HTTP app: OpenAI's /v1/models, /v1/completions and /v1/chat/completions (streamed as Server-Sent Events),
vLLM's /tokenize, /detokenize and /tokenizer_info, Prometheus' /metrics, /health, and the playground page at /.
Requests become engine Jobs; the engine's pieces come back through an asyncio queue.

A client that goes away mid-request cancels its job, which frees its batch slots at the next step.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import chargpt.serve.protocol as wire
from chargpt.data.tokenizer import CharTokenizer
from chargpt.serve import chat
from chargpt.serve.engine import Delivery, Engine, Job, Piece, QueueFull, Scored, ShuttingDown, StepFailed
from chargpt.serve.metrics import CONTENT_TYPE as METRICS_TYPE
from chargpt.serve.metrics import Metrics
from chargpt.serve.protocol import ApiError, Limits

RETRY_AFTER_S = 1
OPENAPI_URL = "/openapi.json"  # the API's schema, for clients and schema-driven tools (behind the API key if any)
_ERROR = {"description": "an error in OpenAI's shape: {'error': {'message', 'type', 'param', 'code'}}"}
# what a 404 says
ROUTES_HINT = (
    "this server has POST /v1/completions, POST /v1/chat/completions, GET /v1/models, POST /tokenize, POST "
    "/detokenize, GET /tokenizer_info, GET /metrics and GET /health"
)
_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {code: _ERROR for code in (400, 401, 404, 413, 415, 421, 422, 503)}
KEYLESS = frozenset({"/", "/health"})  # every other route needs the API key, if the server has one


def _body_openapi(schema_of: type[BaseModel]) -> dict[str, Any]:
    """The request body of a POST route in the OpenAPI schema: the routes read the body themselves (for
    OpenAI-shaped errors), so FastAPI cannot see it; this is the same pydantic model the route validates with,
    its nested definitions inlined."""
    schema = schema_of.model_json_schema()
    defs = schema.pop("$defs", {})
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": _inline(schema, defs)}}}}


def _inline(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            return _inline(defs[ref.removeprefix("#/$defs/")], defs)
        return {key: _inline(value, defs) for key, value in node.items()}
    if isinstance(node, list):
        return [_inline(value, defs) for value in node]
    return node


@dataclass
class ModelCard:
    """What /v1/models and the playground say about the model."""

    id: str
    created: int
    meta: dict[str, Any] = field(default_factory=dict)  # n_params, val_loss, step, block_size, ...

    def body(self) -> dict[str, Any]:
        return {"id": self.id, "object": "model", "created": self.created, "owned_by": "chargpt", "meta": self.meta}


@dataclass
class AppState:
    engine: Engine
    tokenizer: CharTokenizer
    card: ModelCard
    limits: Limits
    api_key: str | None = None
    hosts: frozenset[str] | None = None  # the Host names it answers to (allowed_hosts); None: any
    speakers: dict[str, str] = field(default_factory=lambda: chat.parse_speakers(chat.DEFAULT_SPEAKERS))
    metrics_public: bool = False  # /metrics without the API key (--metrics-public)

    @property
    def tokenizer_info(self) -> dict[str, Any]:
        """GET /tokenizer_info, as vLLM's: what a client needs to tokenize and render chats as this server does.
        A character model has no end-of-text token; its eos_token is the blank line that ends a turn (its first
        character, a newline, is the token lm-evaluation-harness puts before a text it scores), or without a
        newline in the vocabulary, the vocabulary's first character."""
        chars = self.tokenizer.to_list()
        return {
            "tokenizer_class": "CharTokenizer",
            "vocab_size": len(chars),
            "vocab": {c: i for i, c in enumerate(chars)},
            "eos_token": chat.TURN_END if "\n" in chars else chars[0],
            "bos_token": None,
            "pad_token": None,
            "unk_token": self.tokenizer.unknown,
            "add_bos_token": False,
            "add_eos_token": False,
            "model_max_length": self.card.meta.get("block_size"),
            "chat_template": chat.jinja_template(self.speakers),
        }


def create_app(state: AppState) -> FastAPI:
    """The FastAPI app. Its lifespan starts the engine and, on shutdown, ends and joins it."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.engine.start()
        yield
        state.engine.close(0)
        await asyncio.to_thread(state.engine.join, 5)

    app = FastAPI(title="chargpt", docs_url=None, redoc_url=None, openapi_url=OPENAPI_URL, lifespan=lifespan)
    metrics = Metrics(state.engine.load)
    state.engine.on_step = metrics.on_step

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = f"{request.method} {request.url.path}: {exc.detail}"
        if exc.status_code == 404:
            message += f"; {ROUTES_HINT}"
        error = ApiError(exc.status_code, message, code=code)
        return JSONResponse(error.body(), status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/", response_class=HTMLResponse)
    async def playground() -> HTMLResponse:
        return HTMLResponse(_playground_html(), headers={"Cache-Control": "no-cache"})

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [state.card.body()]}

    @app.get("/v1/models/{model_id}", responses={404: _ERROR})
    async def model(model_id: str) -> dict[str, Any]:
        _check_model(state, model_id)
        return state.card.body()

    @app.post("/v1/completions", openapi_extra=_body_openapi(wire.CompletionRequest), responses=_ERROR_RESPONSES)
    async def completions(request: Request) -> Response:
        req = wire.parse_body(await _read_body(request, state.limits.max_body_bytes), wire.CompletionRequest)
        _check_model(state, req.model)
        spec = wire.to_completion(req, state.tokenizer, state.limits, secrets.randbelow(2**62))
        return await _answer(state, spec, request, _Run(state.card.id, spec, metrics))

    @app.post("/v1/chat/completions", openapi_extra=_body_openapi(wire.ChatRequest), responses=_ERROR_RESPONSES)
    async def chat_completions(request: Request) -> Response:
        req = wire.parse_body(await _read_body(request, state.limits.max_body_bytes), wire.ChatRequest)
        _check_model(state, req.model)
        spec = wire.to_chat(req, state.tokenizer, state.limits, secrets.randbelow(2**62), state.speakers)
        return await _answer(state, spec, request, _ChatRun(state.card.id, spec, metrics))

    @app.post("/tokenize", openapi_extra=_body_openapi(wire.TokenizeRequest), responses=_ERROR_RESPONSES)
    async def tokenize(request: Request) -> dict[str, Any]:
        req = wire.parse_body(await _read_body(request, state.limits.max_body_bytes), wire.TokenizeRequest)
        _check_model(state, req.model)
        if (req.prompt is None) == (req.messages is None):
            raise ApiError(400, "give either prompt (a text) or messages (a conversation)", "prompt", "invalid_value")
        if req.messages is not None:
            text = wire.chat_text(req.messages, state.tokenizer, state.speakers, req.add_generation_prompt)
            ids = wire.encode_prompt(text, state.tokenizer, state.limits, "messages")
        else:
            ids = wire.encode_prompt(req.prompt or "", state.tokenizer, state.limits, "prompt", allow_empty=True)
        return {"count": len(ids), "max_model_len": state.tokenizer_info["model_max_length"], "tokens": ids}

    @app.post("/detokenize", openapi_extra=_body_openapi(wire.DetokenizeRequest), responses=_ERROR_RESPONSES)
    async def detokenize(request: Request) -> dict[str, Any]:
        req = wire.parse_body(await _read_body(request, state.limits.max_body_bytes), wire.DetokenizeRequest)
        _check_model(state, req.model)
        wire.check_ids(req.tokens, state.tokenizer, "tokens")
        return {"prompt": state.tokenizer.decode(req.tokens)}

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict[str, Any]:
        return state.tokenizer_info

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics_text() -> Response:
        return Response(metrics.text(), media_type=METRICS_TYPE)

    # what the routes above are: a new route needs nothing more than its function
    routes = [r for r in app.routes if isinstance(r, Route | APIRoute)]
    posted = frozenset(r.path for r in routes if "POST" in (r.methods or ()))  # they all take JSON bodies
    metrics.routes = frozenset(r.path for r in routes)
    keyless = KEYLESS | ({"/metrics"} if state.metrics_public else set())
    app.add_middleware(_ApiKeyMiddleware, api_key=state.api_key, keyless=keyless)
    app.add_middleware(_SameMachineMiddleware, hosts=state.hosts, posted=posted)  # checked before the key
    app.add_middleware(_CountMiddleware, metrics=metrics)  # outermost: every answer is counted
    return app


async def _answer(state: AppState, spec: wire.Completion, request: Request, run: _Run) -> Response:
    """Queue a checked request's job; answer with SSE or with the whole completion."""
    run.metrics.prompt_chars.inc(spec.prompt_chars)
    job = Job(spec.choices, run.deliver)
    try:
        state.engine.submit(job)
    except QueueFull:
        raise ApiError(
            503,
            "every batch slot is busy and the queue is full; retry shortly",
            code="queue_full",
            kind="server_error",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        ) from None
    except ShuttingDown:
        raise _shutting_down() from None
    if spec.stream:
        return StreamingResponse(
            run.stream(job, state.engine, spec.include_usage),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    return await _complete(run, job, state.engine, request)


def _check_model(state: AppState, model_id: str | None) -> None:
    if model_id is not None and model_id != state.card.id:
        raise ApiError(
            404,
            f"the model '{model_id}' does not exist; this server serves '{state.card.id}'",
            "model",
            "model_not_found",
        )


def _shutting_down() -> ApiError:
    return ApiError(503, "the server is shutting down", code="server_shutting_down", kind="server_error")


def _ended(error: ShuttingDown | StepFailed) -> ApiError:
    """The error a request gets when the engine ends it."""
    if isinstance(error, ShuttingDown):
        return _shutting_down()
    return ApiError(500, f"generation failed on the server ({error})", code="generation_failed", kind="server_error")


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, or 413 as soon as it is known to be larger than `limit` bytes."""
    too_big = ApiError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_big
            chunks.append(chunk)
    except ClientDisconnect:  # the client's own doing: nothing to answer, nothing to log
        raise ApiError(
            400, "the client disconnected before sending the whole body", code="client_disconnected"
        ) from None
    return b"".join(chunks)


class _Run:
    """The request side of a job: the queue its pieces arrive on, and each choice's text, logprobs and totals."""

    def __init__(self, model: str, spec: wire.Completion, metrics: Metrics):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Delivery] = asyncio.Queue()
        self.id, self.model, self.created = self.new_id(), model, wire.now()
        self.metrics, self.began, self.first = metrics, time.perf_counter(), True
        n = len(spec.choices)
        self.texts = [""] * n
        self.finish: list[str | None] = [None] * n
        self.tokens = [0] * n
        self.prompt_chars = spec.prompt_chars
        self.echo = spec.echo  # each choice's prompt text, put before its first piece
        self.scored: list[list[Scored]] | None = [[] for _ in range(n)] if spec.logprobs else None
        # where each choice's first scored character is in its text: the prompt at 0 when echoed, else before it
        self.starts = [0 if self.echo is not None else len(c.prompt_ids) for c in spec.choices]
        self.top = spec.choices[0].logprobs or 0  # the likeliest characters listed at each place

    @staticmethod
    def new_id() -> str:
        return wire.new_id()

    def deliver(self, item: Delivery) -> None:
        """Called from the engine thread."""
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    def record(self, pieces: list[Piece]) -> list[tuple[int, str, str | None, dict | None]]:
        """Add the pieces to their choices; return each as (index, text, finish_reason, logprobs) to send."""
        if self.first:
            self.metrics.first_token.observe(time.perf_counter() - self.began)
            self.first = False
        out = []
        for p in pieces:
            i, text = p.index, p.text
            if self.echo is not None:
                text = self.echo[i] + text
                self.echo[i] = ""  # put before the first piece only
            self.texts[i] += text
            self.metrics.generated_chars.inc(p.completion_tokens - self.tokens[i])
            self.tokens[i] = p.completion_tokens
            self.finish[i] = p.finish_reason
            logprobs = None
            if self.scored is not None:
                scored = [*(p.prompt or ()), *(p.logprobs or ())]
                logprobs = self.logprobs(scored, self.starts[i] + len(self.scored[i]))  # a token is a character
                self.scored[i] += scored
            out.append((i, text, p.finish_reason, logprobs))
        return out

    def logprobs(self, scored: list[Scored], offset: int) -> dict[str, Any]:
        return wire.logprobs_body(scored, offset)

    @property
    def done(self) -> bool:
        return all(f is not None for f in self.finish)

    def usage(self) -> dict[str, int]:
        return wire.usage(self.prompt_chars, sum(self.tokens))

    def body(self) -> dict[str, Any]:
        """The whole completion."""
        choices = []
        for i, (text, finish) in enumerate(zip(self.texts, self.finish, strict=True)):
            logprobs = None
            if self.scored is not None:
                logprobs = self.logprobs(self.scored[i], self.starts[i])
            choices.append(wire.choice(i, text, finish, logprobs))
        return wire.completion_body(self.id, self.model, self.created, choices, self.usage())

    def chunk(self, pieces: list[tuple[int, str, str | None, dict | None]], with_usage: bool) -> str:
        return wire.stream_chunk(self.id, self.model, self.created, pieces, with_usage)

    def usage_chunk(self) -> str:
        return wire.sse(wire.completion_body(self.id, self.model, self.created, [], self.usage()))

    async def stream(self, job: Job, engine: Engine, include_usage: bool) -> AsyncIterator[str]:
        """SSE: the pieces as they come, then the usage chunk if asked for, then [DONE]. Starlette cancels this
        generator when the client disconnects; `finally` then frees the job's slots."""
        try:
            yield self.opening(include_usage)
            while not self.done:
                item = await self.queue.get()
                if isinstance(item, ShuttingDown | StepFailed):
                    yield wire.sse(_ended(item).body())
                    return
                yield self.chunk(self.record(item), include_usage)
            if include_usage:
                yield self.usage_chunk()
            yield "data: [DONE]\n\n"
        finally:
            if not self.done:
                engine.cancel(job)

    def opening(self, with_usage: bool) -> str:
        """What a stream starts with before any text (a chat stream's role)."""
        return ""


class _ChatRun(_Run):
    """A chat request's side: the same choices, in chat.completion's shape."""

    @staticmethod
    def new_id() -> str:
        return wire.new_id("chatcmpl-")

    def logprobs(self, scored: list[Scored], offset: int) -> dict[str, Any]:
        return wire.chat_logprobs(scored, self.top)

    def body(self) -> dict[str, Any]:
        choices = [
            wire.chat_choice(i, {"role": "assistant", "content": text}, finish,
                             None if self.scored is None else self.logprobs(self.scored[i], 0))
            for i, (text, finish) in enumerate(zip(self.texts, self.finish, strict=True))
        ]  # fmt: skip
        return wire.chat_body(self.id, self.model, self.created, choices, self.usage())

    def opening(self, with_usage: bool) -> str:
        role = {"role": "assistant", "content": ""}
        choices = [wire.chat_choice(i, role, None, delta=True) for i in range(len(self.texts))]
        body = wire.chat_body(self.id, self.model, self.created, choices, None, chunk=True)
        if not with_usage:
            del body["usage"]
        return wire.sse(body)

    def chunk(self, pieces: list[tuple[int, str, str | None, dict | None]], with_usage: bool) -> str:
        out = []
        for i, text, finish, logprobs in pieces:
            delta = {"content": text} if text else {}
            choice = wire.chat_choice(i, delta, finish, logprobs, delta=True)
            body = wire.chat_body(self.id, self.model, self.created, [choice], None, chunk=True)
            if not with_usage:
                del body["usage"]
            out.append(wire.sse(body))
        return "".join(out)

    def usage_chunk(self) -> str:
        return wire.sse(wire.chat_body(self.id, self.model, self.created, [], self.usage(), chunk=True))


async def _until_disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _complete(run: _Run, job: Job, engine: Engine, request: Request) -> Response:
    """Wait for every choice, or for the client to leave (then cancel the job)."""

    async def collect() -> ShuttingDown | StepFailed | None:
        while not run.done:
            item = await run.queue.get()
            if isinstance(item, ShuttingDown | StepFailed):
                return item
            run.record(item)
        return None

    result, gone = asyncio.ensure_future(collect()), asyncio.ensure_future(_until_disconnected(request))
    try:
        await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not result.done():
            engine.cancel(job)
        result.cancel()
        gone.cancel()
    if not result.done() or result.cancelled():
        return Response(status_code=499)  # nobody is listening
    ended = result.result()
    if ended is not None:
        raise _ended(ended)
    return JSONResponse(run.body())


class _ApiKeyMiddleware:
    """With an API key, every request but those of `keyless` paths needs `Authorization: Bearer KEY` (compared in
    constant time)."""

    def __init__(self, app: ASGIApp, api_key: str | None, keyless: frozenset[str] | set[str]):
        self.app, self.keyless = app, frozenset(keyless)
        self.expected = None if api_key is None else f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        guarded = scope.get("path", "") not in self.keyless
        if self.expected is not None and scope["type"] == "http" and guarded:
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                message = "missing or wrong API key; send the header 'Authorization: Bearer KEY'"
                error = ApiError(401, message, code="invalid_api_key")
                response = JSONResponse(error.body(), status_code=401, headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


def allowed_hosts(bind_host: str, extra: Sequence[str] = ()) -> frozenset[str] | None:
    """The Host header names a server listening on `bind_host` answers to: the address it listens on (on a
    loopback address, this machine's loopback names too) and the names the user adds. A web page the user visits
    can send requests to a local server, and with DNS rebinding read the answers, but its requests carry its own
    Host name: refusing other names shuts it out. On every interface (0.0.0.0, ::) any name, unless some are
    given. None means any."""
    added = frozenset(h.lower().rstrip(".") for h in extra)
    try:
        address = ipaddress.ip_address(bind_host.strip("[]"))
    except ValueError:  # a name, such as localhost
        address = None
    if address is not None and address.is_unspecified:
        return (added | LOOPBACK_NAMES) if added else None
    names = {bind_host.strip("[]").lower()}
    if address is None or address.is_loopback:
        names |= LOOPBACK_NAMES
    return frozenset(names) | added


def host_name(header: str) -> str:
    """The name in a Host header, without its port: 'example.com:8000' -> 'example.com', '[::1]:80' -> '::1'."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return (header.rsplit(":", 1)[0] if header.count(":") == 1 else header).rstrip(".")


JSON_TYPES = ("application/json",)


class _SameMachineMiddleware:
    """Requests a web page could make without the user's intent are refused before anything else: a Host header
    naming another site (DNS rebinding), 421; a POST whose body is not declared JSON, 415 (a cross-site form or
    `text/plain` POST needs no CORS preflight; a JSON one does, and this server answers none)."""

    def __init__(self, app: ASGIApp, hosts: frozenset[str] | None, posted: frozenset[str]):
        self.app, self.hosts, self.posted = app, hosts, posted

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = dict(scope["headers"])
            error = None
            host = headers.get(b"host")
            if self.hosts is not None and host is not None:
                name = host_name(host.decode("latin-1"))
                if name not in self.hosts:
                    error = ApiError(
                        421, f"this server does not answer to the Host name {name!r}; if it is yours, start the "
                        f"server with --allow-host {name}", code="host_not_allowed",
                    )  # fmt: skip
            media = headers.get(b"content-type", b"").decode("latin-1").split(";")[0].strip().lower()
            posted = scope.get("method") == "POST" and scope.get("path") in self.posted
            if error is None and posted and media not in JSON_TYPES:
                error = ApiError(
                    415, "send the request body as JSON, with the header 'Content-Type: application/json'",
                    code="unsupported_media_type",
                )  # fmt: skip
            if error is not None:
                await JSONResponse(error.body(), status_code=error.status)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _CountMiddleware:
    """Counts every answer by route and status code, for /metrics."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.metrics.answered(scope.get("path", ""), message["status"])
            await send(message)

        await self.app(scope, receive, counted)


def _playground_html() -> str:
    return resources.files("chargpt.serve").joinpath("playground.html").read_text(encoding="utf-8")
