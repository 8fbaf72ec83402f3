#!/usr/bin/env python
"""Benchmark tensor parallelism: a 70B-shape checkpoint cut in N, actors' memory and time, and an
extrapolation to the whole 80-layer model on N machines.

    python scripts/checkpoints/make_synthetic_checkpoint.py --shape 70b --layers 2 --layout meta --shards 8 \\
        --out /tmp/synth-70b-2layer-meta
    python scripts/bench/bench_distributed.py /tmp/synth-70b-2layer-meta --tensor-parallel 8
    python scripts/bench/bench_distributed.py --round-trips 2     (empty reductions: plain calls vs compiled graph)
    python scripts/bench/bench_distributed.py CHECKPOINT --decode --tensor-parallel 2   (decode steps: the same)

Three measurements, all in this run:

1. one slice alone: actor 0's part of every layer (its ``consolidated.00.pth``),
   bf16 and int8, decoded in this process with all of this machine's cores, as
   one machine of an N-machine cluster would run it;
2. N local Ray actors (all on this machine, so they share its cores): per-actor
   peak RSS, per-layer time, and each reduction's round trip against the
   slowest actor's compute in it (the difference is Ray's overhead: ray.put,
   N calls, N answers);
3. the distributed logits against one process's, on the same checkpoint.

The extrapolation for 80 layers on N machines adds, per layer, the slice's
compute (1) and two reductions at the measured Ray overhead (2) plus a network
round trip (``--network-ms``, an assumption), and the driver's own time.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

from llama2np import Llama2
from llama2np.distributed.actors import ActorGroup
from llama2np.loaders.common import make_args
from llama2np.loaders.meta import read_params, shard_paths
from llama2np.loaders.torch_pickle import load_pth
from llama2np.model.kv_cache import KVCache
from llama2np.model.transformer import build_layer, causal_mask, linear_maker, rope_tables
from llama2np.model.threads import blas_threads, num_threads
from llama2np.distributed.memory_plan import GiB, memory_plan

FULL_LAYERS = 80  # Llama 2 70B


def one_slice(path: Path, world: int, quantize: str | None, steps: int) -> tuple[float, int]:
    """(seconds per layer to decode one token through actor 0's slice, bytes of the slice's weights)."""
    if len(shard_paths(path)) != world:
        raise SystemExit(f"the one-slice measurement reads consolidated.00.pth: use a checkpoint of {world} shards")
    part = load_pth(path / "consolidated.00.pth")
    params = read_params(path)
    args = make_args(params, path / "params.json", vocab_size=part["tok_embeddings.weight"].shape[0],
                     max_seq_len=steps + 1)
    lin = linear_maker(part, np.dtype(np.float32), quantize)
    blocks = [build_layer(args, part, i, lin) for i in range(args.n_layers)]
    mats = [m for a, f in blocks for m in (a.wqkv, a.wo, f.w13, f.w2)]
    nbytes = sum(w.nbytes for m in mats for w in m.parts)
    kv = KVCache(args, 1, steps + 1, np.float32, n_kv_heads=blocks[0][0].n_kv_heads)
    rotation = rope_tables(args, np.float32)
    x = np.random.default_rng(0).standard_normal((1, 1, args.dim)).astype(np.float32)
    times = []
    with blas_threads(1):  # bf16/int8 tiles: our threads, one BLAS thread each (as Transformer.forward does)
        for pos in range(steps + 1):
            t0 = time.perf_counter()
            for i, (att, ffn) in enumerate(blocks):
                att(x, pos, rotation[pos:pos + 1], causal_mask(1, pos, np.float32), kv.k[i], kv.v[i])
                ffn(x)
            if pos:  # the first pass reads the weights from disk
                times.append((time.perf_counter() - t0) / args.n_layers)
    return float(np.median(times)), nbytes


def _cpu_seconds(pids: list[int]) -> list[float]:
    """User + system CPU seconds each process has used so far (Linux /proc)."""
    def one(pid):
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return [one(p) for p in pids]


def _idle_cores(group: ActorGroup, seconds: float = 2.0) -> float:
    """Cores the actors burn in ``seconds`` of doing nothing."""
    pids = [w["pid"] for w in group.where]
    before = _cpu_seconds(pids)
    time.sleep(seconds)
    return sum(_cpu_seconds(pids)) / seconds - sum(before) / seconds


def _alternate(group: ActorGroup, rounds: int, run) -> dict[str, list[float]]:
    """``run()``'s figure, plain calls and a compiled graph alternating ``rounds`` times. Each compiled
    round compiles a new graph and tears it down after, so that no graph (whose idle actors spin on
    their channels) runs beside the plain calls."""
    from llama2np.distributed import actors

    actors.COMPILED_GRAPHS = True
    figures = {"plain": [], "compiled": []}
    for _ in range(rounds):
        for kind in figures:
            group.compiled = None if kind == "compiled" else False  # None: compiled at the next reduction
            figures[kind].append(run())
            group._end_compiled()
    return figures


def _report(what: str, unit: str, figures: dict[str, list[float]]) -> None:
    for kind, m in figures.items():
        print(f"{what}, {kind}: median {np.median(m):.3f} {unit} (rounds: {', '.join(f'{v:.3f}' for v in m)})")
    print("ratio compiled / plain per round: "
          + ", ".join(f"{c / p:.2f}" for c, p in zip(figures["compiled"], figures["plain"])), flush=True)


def round_trips(world: int, rounds: int, calls: int = 200) -> None:
    """Empty decode reductions of ``world`` actors (a (1, 1, 8192) float32 input, 32 KiB as at 70B),
    plain actor calls and the compiled graph alternating ``rounds`` times; medians in ms."""
    import ray

    from llama2np.distributed import actors

    ray.init(address="local", num_cpus=world, include_dashboard=False, log_to_driver=False)
    group, x = ActorGroup(world), np.zeros((1, 1, 8192), np.float32)
    t0 = time.perf_counter()
    actors.COMPILED_GRAPHS = True
    group.reduce("ping", x, 0, what="ping")  # compiles the graph and runs it once
    print(f"{world} actors: compiling the graph and its first execution {time.perf_counter() - t0:.2f} s; "
          f"idle actors burn {_idle_cores(group):.2f} cores with the graph up", flush=True)
    group._end_compiled()
    print(f"... and {_idle_cores(group):.2f} cores without it", flush=True)

    def run():
        group.reduce("ping", x, 0, what="ping")  # (compiles the graph in a compiled round)
        group.round_trips = []
        for _ in range(calls):
            group.reduce("ping", x, 0, what="ping")
        return float(np.median([rt for _, rt, _ in group.round_trips])) * 1e3

    _report("empty reduction", "ms", _alternate(group, rounds, run))
    group.close()


def decode(path: Path, world: int, rounds: int, steps: int) -> None:
    """Tokens/s of ``steps`` decode steps on ``world`` local actors, plain calls and the compiled graph
    alternating ``rounds`` times (greedy; every step a forward pass of one token through the KV cache)."""
    import ray

    ray.init(address="local", num_cpus=world, include_dashboard=False, log_to_driver=False)
    model = Llama2.from_pretrained(path, tensor_parallel=world, max_seq_len=rounds * 2 * (steps + 1) + 16)
    tm, group = model.model, model.model.group
    cache = tm.new_cache(1)
    pos = 0
    logits = tm.forward(np.array([[1, 450, 4996]]), pos, cache)
    pos += 3

    def run():
        nonlocal pos, logits
        tm.forward(np.array([[int(logits[0, -1].argmax())]]), pos, cache)  # (compiles the graph)
        pos += 1
        t0 = time.perf_counter()
        for _ in range(steps):
            logits = tm.forward(np.array([[int(logits[0, -1].argmax())]]), pos, cache)
            pos += 1
        return steps / (time.perf_counter() - t0)

    print(f"{world} actors, {model.args.n_layers} layers of dim {model.args.dim}: {steps} decode steps per round",
          flush=True)
    _report("decode", "tokens/s", _alternate(group, rounds, run))
    tm.close()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path, nargs="?")
    ap.add_argument("--round-trips", type=int, metavar="N", help="only time empty reductions of N actors")
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds of --round-trips / --decode")
    ap.add_argument("--decode", action="store_true",
                    help="only time decode steps of the checkpoint, plain calls vs compiled graph")
    ap.add_argument("--tensor-parallel", type=int, default=8)
    ap.add_argument("--steps", type=int, default=8, help="decode steps measured")
    ap.add_argument("--network-ms", type=float, default=0.5,
                    help="assumed extra round trip per reduction between machines (LAN), ms")
    ap.add_argument("--no-check", action="store_true", help="skip the one-process logits comparison")
    a = ap.parse_args(argv)
    if a.round_trips:
        return round_trips(a.round_trips, a.rounds)
    if a.model is None:
        ap.error("give a checkpoint, or --round-trips N")
    if a.decode:
        return decode(a.model, a.tensor_parallel, a.rounds, a.steps)
    n = a.tensor_parallel
    import ray

    from bench import read_bandwidth  # scripts/bench/bench.py: a dot product over 1 GiB on all threads

    print(f"machine: {num_threads()} cores, read bandwidth {read_bandwidth(num_threads(), GiB) / 1e9:.1f} GB/s",
          flush=True)

    # 1. one slice alone
    alone = {}
    for quantize in (None, "int8"):
        per_layer, nbytes = one_slice(a.model, n, quantize, a.steps)
        alone[quantize] = per_layer
        print(f"one slice alone ({quantize or 'bf16'}): {per_layer * 1e3:.2f} ms per layer per token, "
              f"{nbytes / 2 ** 20:.0f} MiB of weights for {read_params(a.model)['n_layers']} layers", flush=True)

    # 2. N local actors
    ray.init(address="local", num_cpus=n, include_dashboard=False, log_to_driver=False)  # a new cluster of its own
    t0 = time.perf_counter()
    model = Llama2.from_pretrained(a.model, tensor_parallel=n, max_seq_len=256)
    print(f"{n} actors loaded in {time.perf_counter() - t0:.1f} s", flush=True)
    tm, group, layers = model.model, model.model.group, model.args.n_layers
    prompt = np.array([[1, 450, 4996, 17354, 1701, 29916]])
    cache = tm.new_cache(1, 256)
    tm.forward(prompt, 0, cache)
    group.round_trips = []
    step_times, pos = [], prompt.shape[1]
    for _ in range(a.steps):
        t0 = time.perf_counter()
        tm.forward(np.array([[29871]]), pos, cache)
        step_times.append(time.perf_counter() - t0)
        pos += 1
    trips = np.array([(rt, comp) for _, rt, comp in group.round_trips])  # (steps * 2 * layers, 2)
    per_layer = trips[:, 0].reshape(a.steps, layers, 2).sum(axis=2)  # attention + feed-forward round trips
    overhead = trips[:, 0] - trips[:, 1]
    step = float(np.median(step_times))
    driver = step - float(np.median(per_layer.sum(axis=1)))
    group.round_trips = []
    for _ in range(20):  # the same round trip with no work in it: Ray's own cost, without the actors' compute
        group.reduce("ping", np.zeros((1, 1, model.args.dim), np.float32), 0, what="ping")
    ping = np.array([rt for _, rt, _ in group.round_trips])
    rss = group.call("peak_rss")
    empty = {n: float(np.median(ping)) * 1e3}
    for k in sorted({1, 2, 4} - {n}):  # how an empty reduction's cost grows with the number of actors
        g = ActorGroup(k)
        g.round_trips = []
        for _ in range(20):
            g.reduce("ping", np.zeros((1, 1, model.args.dim), np.float32), 0, what="ping")
        empty[k] = float(np.median([rt for _, rt, _ in g.round_trips])) * 1e3
        g.close()
    plan = memory_plan(model.args, n, "bfloat16", max_seq_len=256)
    print(f"per-actor peak RSS: {', '.join(f'{r / 2 ** 20:.0f}' for r in rss)} MiB "
          f"(the plan counts {plan.actor_weights / 2 ** 20:.0f} MiB of weights each)")
    print(f"decode step: {step * 1e3:.1f} ms = {layers} layers x {np.median(per_layer) * 1e3:.1f} ms "
          f"+ driver {driver * 1e3:.1f} ms (embedding, norms, output projection, sampling-free)")
    print(f"reduction round trip: median {np.median(trips[:, 0]) * 1e3:.2f} ms, of which the slowest actor "
          f"computes {np.median(trips[:, 1]) * 1e3:.2f} ms; Ray overhead median {np.median(overhead) * 1e3:.2f} ms, "
          f"p90 {np.percentile(overhead, 90) * 1e3:.2f} ms (all {n} actors share this machine's cores)")
    print(f"an empty reduction ({n} calls, {n} answers, no work): median {np.median(ping) * 1e3:.2f} ms, "
          f"p90 {np.percentile(ping, 90) * 1e3:.2f} ms; with 1, 2, 4, ... actors: "
          + ", ".join(f"{k}: {v:.2f} ms" for k, v in sorted(empty.items())))

    # 3. correctness on the real shape
    if not a.no_check:
        ids = prompt[0].tolist()
        got = model.logits(ids)
        model.model.close()
        want = Llama2.from_pretrained(a.model, max_seq_len=256).logits(ids)
        print(f"logits vs one process: max |diff| {np.abs(got - want).max():.2e} "
              f"(logits up to {np.abs(want).max():.1f})")

    # extrapolation: 80 layers, one actor per machine
    ray_ms, net_ms = float(np.median(ping)) * 1e3, a.network_ms
    print(f"\nextrapolated to Llama 2 70B ({FULL_LAYERS} layers) on {n} machines like this one, one actor each "
          f"(reduction = empty reduction {ray_ms:.2f} ms + assumed network {net_ms:.2f} ms):")
    full = model.args.__class__(**{**model.args.to_params(), "n_layers": FULL_LAYERS})
    for quantize, label in ((None, "bf16"), ("int8", "int8")):
        compute = alone[quantize] * FULL_LAYERS
        comm = 2 * FULL_LAYERS * (ray_ms + net_ms) / 1e3
        total = compute + comm + driver
        need = memory_plan(full, n, "bfloat16", quantize=quantize).actor_total
        print(f"  {label}: {1 / total:.2f} tokens/s = {total:.2f} s/token: slices {compute:.2f} s, "
              f"reductions {comm:.2f} s, driver {driver:.2f} s; {need / GiB:.1f} GiB per actor")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
