"""`tether serve`: the HTTP API (and the web interface) over one journal, with workers in-process.

Needs the `serve` extra: `pip install 'tether[serve]'` (Starlette, uvicorn, sse-starlette).
"""

from tether.serve.app import build_app

__all__ = ["build_app"]
