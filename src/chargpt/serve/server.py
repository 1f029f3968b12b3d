"""`chargpt serve`: bind the socket, load the model, run uvicorn, stop cleanly on Ctrl-C / SIGTERM.

The port is bound before the model is loaded, so a port in use or a bad host fails at once with a one-line
error. On the first SIGINT/SIGTERM the server stops accepting connections and new requests; requests
already running get `grace` seconds to finish, then end with a "shutting down" error; the process exits 0.
A second signal ends them at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import signal
import socket
from collections.abc import Callable, Generator
from pathlib import Path
from types import FrameType

import torch
import uvicorn

from chargpt.errors import ChargptError
from chargpt.machine import memory
from chargpt.machine import precision as prec
from chargpt.model import LanguageModel
from chargpt.runtime import ServeConfig
from chargpt.serve.app import AppState, ModelCard, allowed_hosts, create_app
from chargpt.serve.chat import parse_speakers
from chargpt.serve.engine import Engine
from chargpt.serve.protocol import Limits
from chargpt.storage.checkpoint import WEIGHTS, load_model, read_config


def bind(host: str, port: int) -> socket.socket:
    """A bound TCP socket for host:port, or a one-line ChargptError (bad host, port in use, no permission)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as e:
        reason = e.strerror if isinstance(e, socket.gaierror) else str(e)
        raise ChargptError(f"--host {host!r} is not an address of this machine ({reason}); try 127.0.0.1") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a just-closed port is free; a busy one is not
        sock.bind(address)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise ChargptError(f"port {port} on {host} is already in use; pick another with --port") from None
        if e.errno == errno.EACCES:
            raise ChargptError(f"no permission to listen on port {port}; use a port above 1023") from None
        raise ChargptError(f"cannot listen on {host}:{port} ({e.strerror}); check --host and --port") from None
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def model_card(directory: str, model: LanguageModel) -> ModelCard:
    path = Path(directory)
    _, _, info = read_config(path)
    cfg = model.config
    meta = {
        "n_params": model.num_params(),
        "val_loss": info.get("val_loss"),
        "step": info.get("step"),
        "architecture": cfg.arch,
        "block_size": cfg.block_size,
        "vocab_size": cfg.vocab_size,
        "n_layers": cfg.n_layers,
        "n_heads": cfg.n_heads,
        "n_embd": cfg.n_embd,
    }
    return ModelCard(path.resolve().name, int((path / WEIGHTS).stat().st_mtime), meta)


class _Server(uvicorn.Server):
    """uvicorn, with our signal handling (no re-raised signal after a clean stop) and a ready callback."""

    def __init__(self, config: uvicorn.Config, engine: Engine, grace: float, on_ready: Callable[[], None]):
        super().__init__(config)
        self.engine, self.grace, self.on_ready = engine, grace, on_ready
        self.loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().startup(sockets)
        if self.started:
            self.on_ready()

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        old = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        grace = 0.0 if self.should_exit else self.grace  # a second signal: end everything now
        self.force_exit = self.should_exit
        self.should_exit = True
        if self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.engine.close, grace)
        else:
            self.engine.close(grace)


def serve(cfg: ServeConfig, device: torch.device, on_ready: Callable[[str, ModelCard], None]) -> None:
    """Run until Ctrl-C / SIGTERM. on_ready(url, card) is called once the server accepts connections."""
    cfg.validate()
    sock = bind(cfg.host, cfg.port)
    try:
        model, tokenizer = load_model(cfg.model, device)
        card = model_card(cfg.model, model)
        memory.check(
            memory.inference_bytes(model.config, cfg.max_batch), device, f"serving {cfg.max_batch} rows at once",
            "use a smaller --max-batch",
        )  # fmt: skip
        tokens = 8 * cfg.max_batch * (cfg.max_tokens_limit + cfg.max_prompt_chars)  # every row's token buffer, full
        memory.check(tokens, device, f"{cfg.max_batch} rows of up to {cfg.max_tokens_limit:,} tokens",
                     "use a smaller --max-tokens-limit (or --max-batch)")  # fmt: skip
        engine = Engine(model, tokenizer, cfg.max_batch, cfg.max_queue, cfg.precision, cfg.quantize)
        card.meta["precision"] = {"prefill": engine.prefill.name, "decode": engine.decode.name}
        card.meta["precision_reason"] = prec.describe({"prefill": engine.prefill, "decode": engine.decode})
        card.meta["quantize"] = engine.quantize.name
        card.meta["batching"] = engine.batching
        if engine.quantize.name == "int8":
            card.meta["precision_reason"] += f", int8 weights ({engine.quantize.reason})"
        limits = Limits(cfg.max_tokens_limit, cfg.max_prompt_chars, cfg.max_batch, cfg.max_body_bytes)
        hosts = allowed_hosts(cfg.host, cfg.allow_host)
        speakers = parse_speakers(cfg.chat_speakers)
        app = create_app(AppState(engine, tokenizer, card, limits, cfg.api_key, hosts, speakers, cfg.metrics_public))
        config = uvicorn.Config(
            app,
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=int(cfg.grace) + 3,  # a backstop: the engine ends requests at `grace`
            lifespan="on",
        )
        url = url_of(sock)
        server = _Server(config, engine, cfg.grace, lambda: on_ready(url, card))
        asyncio.run(server.serve(sockets=[sock]))
    finally:
        sock.close()


def describe(card: ModelCard) -> str:
    """'tiny (4.2k parameters, val loss 1.930) in fp32 (the default)' for the one-line banner."""
    n = card.meta.get("n_params") or 0
    size = f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}k" if n >= 1e3 else str(n)
    val = card.meta.get("val_loss")
    described = f"{card.id} ({size} parameters" + (f", val loss {val:.3f})" if isinstance(val, float) else ")")
    reason, batching = card.meta.get("precision_reason"), card.meta.get("batching")
    return described + (f" in {reason}" if reason else "") + (f"; {batching}" if batching else "")


def _sendable(key: str) -> bool:
    """Whether a client can send the key in an Authorization header: printable ASCII, no spaces."""
    return key.isascii() and key.isprintable() and " " not in key
