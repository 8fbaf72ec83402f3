#!/usr/bin/env python
"""Throughput of ``llama2np serve`` with N concurrent clients (needs the serve extra and the openai client).

    python scripts/bench/bench_serve.py                        # the demo model, 1, 2, 4, 8 clients
    python scripts/bench/bench_serve.py --model weights/llama-2-7b --clients 1,4,8 --max-tokens 16 --requests 1

Starts the server in this process on a free port, then for each N runs N client
threads, each sending ``--requests`` completions (temperature 0.8, a different seed
each, EOS banned so every request makes ``--max-tokens`` tokens) at the same time.
Prints, per N: generated tokens per second over the whole run, the median
request latency, and the engine's forward passes per generated token (from the
server's ``/health`` counts: about 1/N when the N requests decode in one batch, 1
when each runs alone). First, for comparison, the engine without the server:
``Llama2.generate`` on one client's requests, one after another.
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(REPO / "weights" / "demo"))
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--clients", default="1,2,4,8", help="comma-separated client counts")
    p.add_argument("--requests", type=int, default=4, help="completions per client")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompt", default="Once upon a time")
    args = p.parse_args()

    import httpx
    import openai

    from llama2np import Llama2
    from llama2np.server import bind, serve
    from llama2np.server.app import create_app  # noqa: F401  (fail early without the serve extra)

    model = Llama2.from_pretrained(args.model, dtype=args.dtype)
    sock = bind("127.0.0.1", 0)
    servers = []
    threading.Thread(target=serve, args=(model, sock), kwargs={"on_server": servers.append}, daemon=True).start()
    while not (servers and servers[0].started):
        time.sleep(0.05)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{sock.getsockname()[1]}/v1", api_key="-", max_retries=0,
                           timeout=3600)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    name = Path(args.model).name
    no_eos = {str(model.tokenizer.eos_id): -100}

    def ask(seed: int) -> float:
        t0 = time.perf_counter()
        r = client.completions.create(model=name, prompt=args.prompt, max_tokens=args.max_tokens,
                                      temperature=0.8, seed=seed, logit_bias=no_eos)
        assert r.usage.completion_tokens == args.max_tokens, r.usage
        return time.perf_counter() - t0

    ask(0)  # warm up
    print(f"{name} ({args.dtype}), {args.max_tokens} new tokens per request, {args.requests} requests per client; "
          f"load average {os.getloadavg()[0]:.1f} (other jobs on this machine skew the figures)")
    bias = {model.tokenizer.eos_id: -100.0}
    t0 = time.perf_counter()
    for seed in range(1, args.requests + 1):
        model.generate(args.prompt, max_new_tokens=args.max_tokens, temperature=0.8, top_p=1.0, seed=seed,
                       logit_bias=bias, reuse_cache=False)
    alone = args.requests * args.max_tokens / (time.perf_counter() - t0)
    print(f"engine alone (Llama2.generate, one request after another): {alone:.2f} tokens/s")
    print(f"{'clients':>7} {'tokens/s':>9} {'median latency s':>17} {'forwards/token':>15}")
    for n in [int(c) for c in args.clients.split(",")]:
        before = httpx.get(f"{url}/health").json()
        t0 = time.perf_counter()
        with ThreadPoolExecutor(n) as pool:
            latencies = list(pool.map(ask, range(1, n * args.requests + 1)))
        wall = time.perf_counter() - t0
        after = httpx.get(f"{url}/health").json()
        tokens = n * args.requests * args.max_tokens
        passes = after["forward_passes"] - before["forward_passes"]
        print(f"{n:>7} {tokens / wall:>9.2f} {statistics.median(latencies):>17.2f} {passes / tokens:>15.2f}"
              f"   (load average {os.getloadavg()[0]:.1f})")
    servers[0].should_exit = True


if __name__ == "__main__":
    main()
