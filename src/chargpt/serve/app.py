"""The HTTP app: OpenAI's /v1/models and /v1/completions (streamed as Server-Sent Events), /health, and the
playground page at /. Requests become engine Jobs; the engine's pieces come back through an asyncio queue.

A client that goes away mid-request cancels its job, which frees its batch slots at the next step.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import secrets
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

import chargpt.serve.protocol as wire
from chargpt.data.tokenizer import CharTokenizer
from chargpt.serve.engine import Delivery, Engine, Job, Piece, QueueFull, ShuttingDown, StepFailed
from chargpt.serve.protocol import ApiError, Limits

RETRY_AFTER_S = 1
OPENAPI_URL = "/openapi.json"  # the API's schema, for clients and schema-driven tools (behind the API key if any)
_ERROR = {"description": "an error in OpenAI's shape: {'error': {'message', 'type', 'param', 'code'}}"}
# what a 404 says: a client that tried chat (the OpenAI client's first example) learns where to go
ROUTES_HINT = (
    "this server has POST /v1/completions (client.completions.create with a prompt), GET /v1/models and GET "
    "/health; a character model has no chat template, so /v1/chat/completions is not served: send the "
    "conversation as the prompt text"
)
_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {code: _ERROR for code in (400, 401, 404, 413, 415, 421, 422, 503)}


def _completions_openapi() -> dict[str, Any]:
    """The request body of POST /v1/completions in the OpenAPI schema: the route reads the body itself (for
    OpenAI-shaped errors), so FastAPI cannot see it; this is the same pydantic model the route validates with,
    its nested definitions inlined."""
    schema = wire.CompletionRequest.model_json_schema()
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


def create_app(state: AppState) -> FastAPI:
    """The FastAPI app. Its lifespan starts the engine and, on shutdown, ends and joins it."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.engine.start()
        yield
        state.engine.close(0)
        await asyncio.to_thread(state.engine.join, 5)

    app = FastAPI(title="chargpt", docs_url=None, redoc_url=None, openapi_url=OPENAPI_URL, lifespan=lifespan)
    app.add_middleware(_ApiKeyMiddleware, api_key=state.api_key)
    app.add_middleware(_SameMachineMiddleware, hosts=state.hosts)  # outermost: checked before the key

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

    @app.post("/v1/completions", openapi_extra=_completions_openapi(), responses=_ERROR_RESPONSES)
    async def completions(request: Request) -> Response:
        return await _completions(state, request)

    return app


async def _completions(state: AppState, request: Request) -> Response:
    """POST /v1/completions: check the request, queue its job, answer with SSE or with the whole completion."""
    req = wire.parse_body(await _read_body(request, state.limits.max_body_bytes))
    if req.model is not None:
        _check_model(state, req.model)
    spec = wire.to_completion(req, state.tokenizer, state.limits, secrets.randbelow(2**62))
    run = _Run(state.card.id, len(spec.choices), spec.prompt_chars)
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
            _stream(run, job, state.engine, spec.include_usage),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    return await _complete(run, job, state.engine, request)


def _check_model(state: AppState, model_id: str) -> None:
    if model_id != state.card.id:
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
    """The request side of a job: the queue its pieces arrive on, and the totals for the response."""

    def __init__(self, model: str, n_choices: int, prompt_chars: int):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Delivery] = asyncio.Queue()
        self.id, self.model, self.created = wire.new_id(), model, wire.now()
        self.texts = [""] * n_choices
        self.finish: list[str | None] = [None] * n_choices
        self.tokens = [0] * n_choices
        self.prompt_chars = prompt_chars

    def deliver(self, item: Delivery) -> None:
        """Called from the engine thread."""
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    def record(self, pieces: list[Piece]) -> None:
        for p in pieces:
            self.texts[p.index] += p.text
            self.tokens[p.index] = p.completion_tokens
            self.finish[p.index] = p.finish_reason

    @property
    def done(self) -> bool:
        return all(f is not None for f in self.finish)

    def usage(self) -> dict[str, int]:
        return wire.usage(self.prompt_chars, sum(self.tokens))


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
    choices = [wire.choice(i, t, f) for i, (t, f) in enumerate(zip(run.texts, run.finish, strict=True))]
    return JSONResponse(wire.completion_body(run.id, run.model, run.created, choices, run.usage()))


async def _stream(run: _Run, job: Job, engine: Engine, include_usage: bool) -> AsyncIterator[str]:
    """SSE: the pieces as they come, then the usage chunk if asked for, then [DONE]. Starlette cancels this
    generator when the client disconnects; `finally` then frees the job's slots."""
    try:
        while not run.done:
            item = await run.queue.get()
            if isinstance(item, ShuttingDown | StepFailed):
                yield wire.sse(_ended(item).body())
                return
            run.record(item)
            yield wire.stream_chunk(run.id, run.model, run.created, item, include_usage)
        if include_usage:
            yield wire.sse(wire.completion_body(run.id, run.model, run.created, [], run.usage()))
        yield "data: [DONE]\n\n"
    finally:
        if not run.done:
            engine.cancel(job)


class _ApiKeyMiddleware:
    """With an API key, every /v1/ request needs `Authorization: Bearer KEY` (compared in constant time)."""

    def __init__(self, app: ASGIApp, api_key: str | None):
        self.app = app
        self.expected = None if api_key is None else f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        guarded = scope.get("path", "").startswith("/v1/") or scope.get("path") == OPENAPI_URL
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
JSON_ROUTES = frozenset({"/v1/completions"})  # the routes that take a JSON body (POST)


class _SameMachineMiddleware:
    """Requests a web page could make without the user's intent are refused before anything else: a Host header
    naming another site (DNS rebinding), 421; a POST whose body is not declared JSON, 415 (a cross-site form or
    `text/plain` POST needs no CORS preflight; a JSON one does, and this server answers none)."""

    def __init__(self, app: ASGIApp, hosts: frozenset[str] | None):
        self.app, self.hosts = app, hosts

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
            posted = scope.get("method") == "POST" and scope.get("path") in JSON_ROUTES
            if error is None and posted and media not in JSON_TYPES:
                error = ApiError(
                    415, "send the request body as JSON, with the header 'Content-Type: application/json'",
                    code="unsupported_media_type",
                )  # fmt: skip
            if error is not None:
                await JSONResponse(error.body(), status_code=error.status)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _playground_html() -> str:
    return resources.files("chargpt.serve").joinpath("playground.html").read_text(encoding="utf-8")
