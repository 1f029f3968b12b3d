"""/metrics: the server's counters in Prometheus' text format (prometheus_client), as llama.cpp's server and vLLM
expose them: requests by route and status, prompt and generated characters, the queue, the batch sizes, time
to first token and time per generated character. Every server has its own registry."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """The server's metrics; `load()` gives (requests waiting, rows running) when scraped."""

    def __init__(self, load: Callable[[], tuple[int, int]]):
        self.registry = r = CollectorRegistry()
        self.routes: frozenset[str] = frozenset()  # the app's; any other path is "other" (a scan adds no series)
        self.requests = Counter(
            "chargpt_requests", "HTTP requests answered, by route and status code", ["route", "status"], registry=r
        )
        self.prompt_chars = Counter("chargpt_prompt_characters", "prompt characters of accepted requests", registry=r)
        self.generated_chars = Counter("chargpt_generated_characters", "characters generated", registry=r)
        waiting = Gauge("chargpt_queue_depth", "requests waiting for batch places", registry=r)
        waiting.set_function(lambda: load()[0])
        running = Gauge("chargpt_running_rows", "rows (samples) being decoded or about to start", registry=r)
        running.set_function(lambda: load()[1])
        self.batch = Histogram(
            "chargpt_batch_size", "rows decoded together in one model step", registry=r, buckets=BATCH_BUCKETS
        )
        self.first_token = Histogram(
            "chargpt_time_to_first_token_seconds", "seconds from a request's arrival to its first piece of text",
            registry=r, buckets=LATENCY_BUCKETS,
        )  # fmt: skip
        self.per_token = Histogram(
            "chargpt_time_per_output_token_seconds", "seconds of one model step, which gives each running row a "
            "character", registry=r, buckets=LATENCY_BUCKETS,
        )  # fmt: skip

    def on_step(self, rows: int, seconds: float) -> None:
        """The engine's step hook (engine thread)."""
        self.batch.observe(rows)
        self.per_token.observe(seconds)

    def answered(self, path: str, status: int) -> None:
        self.requests.labels(path if path in self.routes else "other", str(status)).inc()

    def text(self) -> bytes:
        return generate_latest(self.registry)
