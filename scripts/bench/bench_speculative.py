#!/usr/bin/env python
"""Benchmark what speculative decoding buys: forward cost against positions, and prompt lookup against plain.

    python scripts/bench/bench.py --speculative positions /tmp/synth-7b-meta      # (or this script directly)
    python scripts/bench/bench.py --speculative --threads 1 lookup weights/demo \\
        weights/stories260K/stories260K.bin --costs costs.json

``positions``: the wall time of one forward pass over 1, 2, 4, 8, 16 new positions
through the KV cache (after a prefill), median of ``--runs``: the price of
checking a K-token draft (K + 1 positions) against a plain decode step.
``--save FILE`` writes the table as JSON.

``lookup``: for each model, greedy decoding of a story-continuation prompt, of
a "repeat this text" prompt (a text twice, then its start), and of "retell its
own story" (the model's own greedy story in the prompt, then the story's first
sentence again: text it will copy), plain and with ``prompt_lookup`` (several draft
lengths), in the same run: tokens per forward pass, accepted drafts, wall time,
speed-up, and whether the tokens are identical (they must be). With ``--costs``
(a ``positions`` table) it also estimates the speed-up at that model's size: each
pass costs what a forward over that many positions cost there.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from llama2np import Llama2
from llama2np.model.threads import set_num_threads

STORY = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park."
TEXT = ("Tom had a big red ball. He liked to throw the ball to his dog, Max. Max ran fast and brought the ball "
        "back. One day the ball went into the pond. Tom was sad, but Max jumped in and got it.")
REPEAT = f"{TEXT}\n{TEXT}\n{TEXT[:38]}"  # a text twice, then its start again: the continuation is a copy


def forward_costs(model: Llama2, sizes: list[int], context: int, runs: int) -> dict[int, float]:
    """Seconds of one forward over n new positions after ``context`` cached ones, for each n."""
    tokens = np.random.default_rng(0).integers(3, model.args.vocab_size, size=context + max(sizes))
    cache = model.model.new_cache(1, context + max(sizes))
    model.model.forward(tokens[None, :context], 0, cache)  # prefill (pages the weights in)
    costs = {}
    for n in sizes:
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            model.model.forward(tokens[None, context:context + n], context, cache)
            times.append(time.perf_counter() - t0)
        costs[n] = statistics.median(times)
        print(f"forward over {n:2d} positions: {costs[n] * 1e3:9.1f} ms  ({costs[n] / costs[sizes[0]]:.2f} x one)",
              flush=True)
    return costs


def cost_at(costs: dict[int, float], positions: float) -> float:
    """A forward's cost at ``positions`` (interpolated in the measured table), relative to one position."""
    sizes = sorted(costs)
    return float(np.interp(positions, sizes, [costs[n] for n in sizes])) / costs[1]


def timed(model: Llama2, prompt: str, new_tokens: int, **kw) -> tuple[str, float, float, object]:
    """(text, wall seconds, CPU seconds of this process, Stats) of one greedy generation."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = model.generate(prompt, max_new_tokens=new_tokens, temperature=0, reuse_cache=False, **kw)
    return out, time.perf_counter() - t0, time.process_time() - c0, model.last_stats


def lookup(path: str, new_tokens: int, drafts: list[int], ngram: int, runs: int,
           costs: dict[int, float] | None) -> None:
    model = Llama2.from_pretrained(path)
    print(f"\n{path}: dim {model.args.dim}, {model.args.n_layers} layers, vocab {model.args.vocab_size}")
    # input-grounded text the model can copy: its own story in the prompt, then the story's start again
    own = STORY + model.generate(STORY, max_new_tokens=new_tokens, temperature=0, reuse_cache=False)
    for name, prompt in (("story continuation", STORY), ("repeat this text", REPEAT),
                         ("retell its own story", f"{own}\n{STORY}")):
        timed(model, prompt, 8)  # warm up
        base = [timed(model, prompt, new_tokens) for _ in range(runs)]
        plain_out, plain_s, plain_cpu = base[0][0], *(statistics.median(r[i] for r in base) for i in (1, 2))
        print(f"  {name}: plain {base[0][3].new_tokens} tokens in {plain_s * 1e3:.0f} ms "
              f"({plain_cpu * 1e3:.0f} ms CPU)")
        for k in drafts:
            res = [timed(model, prompt, new_tokens, prompt_lookup=ngram, num_draft=k) for _ in range(runs)]
            out, st = res[0][0], res[0][3]
            s, cpu = (statistics.median(r[i] for r in res) for i in (1, 2))
            line = (f"    --prompt-lookup {ngram} --num-draft {k:2d}: {st.tokens_per_pass:.2f} tokens/pass, "
                    f"{st.accepted}/{st.drafted} drafts accepted, {s * 1e3:.0f} ms ({cpu * 1e3:.0f} ms CPU), "
                    f"speed-up {plain_s / s:.2f}x (CPU {plain_cpu / cpu:.2f}x), "
                    f"{'identical' if out == plain_out else 'DIFFERENT'}")
            if costs:
                per_pass = cost_at(costs, 1 + st.drafted / st.forward_passes)
                line += f"; at the --costs model: {st.tokens_per_pass / per_pass:.2f}x"
            print(line, flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="mode", required=True)
    p = sub.add_parser("positions", help="forward cost over 1..16 positions")
    p.add_argument("checkpoint")
    p.add_argument("--sizes", default="1,2,4,8,16")
    p.add_argument("--context", type=int, default=32, help="cached positions before the timed forwards")
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--save", metavar="FILE", help="write {positions: seconds} as JSON")
    p = sub.add_parser("lookup", help="prompt lookup against plain greedy decoding")
    p.add_argument("models", nargs="+")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--num-draft", default="2,4,8")
    p.add_argument("--ngram", type=int, default=3)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--costs", metavar="FILE", help="a `positions --save` table, for the size estimate")
    ap.add_argument("--threads", type=int, help="threads for tiles and BLAS (default: all cores)")
    opts = ap.parse_args(argv)
    if opts.threads:
        set_num_threads(opts.threads)
    if opts.mode == "positions":
        t0 = time.perf_counter()
        model = Llama2.from_pretrained(opts.checkpoint)
        print(f"{opts.checkpoint}: loaded in {time.perf_counter() - t0:.1f} s", flush=True)
        costs = forward_costs(model, [int(s) for s in opts.sizes.split(",")], opts.context, opts.runs)
        if opts.save:
            with open(opts.save, "w") as f:
                json.dump(costs, f)
    else:
        costs = None
        if opts.costs:
            with open(opts.costs) as f:
                costs = {int(k): v for k, v in json.load(f).items()}
        for path in opts.models:
            lookup(path, opts.new_tokens, [int(k) for k in opts.num_draft.split(",")], opts.ngram, opts.runs, costs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
