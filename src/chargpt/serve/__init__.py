"""`chargpt serve`: an OpenAI-compatible HTTP API with streaming, continuous batching and a browser playground.

Needs the `serve` extra (FastAPI, uvicorn): `pip install 'chargpt[serve]'`.
"""

from chargpt.runtime import ServeConfig
from chargpt.serve.server import describe, serve

__all__ = ["ServeConfig", "describe", "serve"]
