"""``python -m llama2np serve``: load the model, bind the port, serve until Ctrl-C."""

from __future__ import annotations

import os
import sys

from ..errors import InputError

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def cmd_serve(args, load_model, say) -> int:
    """``load_model(args)`` and ``say(message)``: the command line's own (from ``commands``)."""
    try:
        from .. import server
    except ImportError as e:
        raise InputError(f"serve needs the web server packages ({e.name} is missing): "
                         "pip install 'llama2np[serve]'") from None
    if not 0 <= args.port <= 65535:
        raise InputError(f"--port must be from 0 to 65535, got {args.port}")
    api_key = args.api_key if args.api_key is not None else os.environ.get("LLAMA2NP_API_KEY") or None
    if api_key is not None and not api_key.strip():
        raise InputError("--api-key must not be empty")
    try:
        sock = server.bind(args.host, args.port)
    except OSError as e:
        raise InputError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    model = load_model(args)
    host, port = sock.getsockname()[:2]
    where = f"[{host}]" if ":" in host else host
    say(f"serving {server.model_name(model)} ({model.model.dtype}) on http://{where}:{port}/v1"
         f"{' (API key required)' if api_key else ''}; Ctrl-C stops")
    if args.host not in LOCAL_HOSTS and api_key is None:
        say("warning: listening beyond this machine without --api-key, and without TLS: anyone who can "
             "reach the port can use it (see docs/serve.md)")
    sys.stderr.flush()
    server.serve(model, sock, api_key=api_key, max_queue=args.max_queue)
    return 0
