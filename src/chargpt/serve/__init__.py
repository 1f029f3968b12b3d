"""`chargpt serve`: an OpenAI-compatible HTTP API with streaming, continuous batching and a browser playground.

Needs the `serve` extra (FastAPI, uvicorn): `pip install 'chargpt[serve]'`.
"""

from chargpt.serve.server import ServeConfig, describe, serve

__all__ = ["ServeConfig", "describe", "serve"]
