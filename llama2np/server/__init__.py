"""An OpenAI-compatible HTTP endpoint whose logprobs are the reference engine's own (``pip install llama2np[serve]``).

``python -m llama2np serve --model M`` runs it; ``create_app`` gives the ASGI app
to embed. See docs/serve.md.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Callable

from ..llama import Llama2
from .app import create_app

__all__ = ["create_app", "model_name", "serve", "bind"]


def model_name(model: Llama2) -> str:
    """The id the server gives the model: its checkpoint's file or directory name."""
    return Path(model.source).name if model.source is not None else "llama2np"


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: a free one the system picks)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    return sock


def serve(model: Llama2, sock: socket.socket, api_key: str | None = None, max_queue: int = 64,
          log_level: str = "warning", on_server: Callable | None = None) -> None:
    """Serve ``model`` on a bound socket until interrupted (uvicorn, one process, one engine thread).

    on_server: called with the ``uvicorn.Server`` before it starts (e.g. to stop it from another thread).
    """
    import uvicorn

    app = create_app(model, model_name(model), api_key=api_key, max_queue=max_queue)
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5))
    if on_server is not None:
        on_server(server)
    server.run(sockets=[sock])
