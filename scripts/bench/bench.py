#!/usr/bin/env python
"""Benchmark llama2np: prefill and decode speed, memory, and how close decode gets to the memory bound.

    python scripts/bench/bench.py --shape 110m --compare-hf
    python scripts/bench/bench.py --shape 1b --prompt-len 512 --new-tokens 16
    python scripts/bench/bench.py /tmp/synth-7b-meta --prompt-len 16,128 --new-tokens 8 --runs 1 --compare-hf
    python scripts/bench/bench.py /tmp/synth-13b-hf --quantize int8 --new-tokens 8 --runs 1
    python scripts/bench/bench.py --speculative positions|lookup ...   (scripts/bench/bench_speculative.py)

Small shapes get random weights made in memory (seeded, so ``--compare-hf``
rebuilds the very same weights in its worker process); 7b/13b need a checkpoint,
e.g. from ``scripts/checkpoints/make_synthetic_checkpoint.py``. Every figure is measured in
this run: the machine's read bandwidth (NumPy, all threads), sgemm GFLOP/s, and
the llama2np / HF timings, so the printed ratios compare like with like.
Decode tokens/s is the median over ``--runs`` runs of each run's median step.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from llama2np.model.linear import Int8Linear, Linear
from llama2np.model.args import PRESETS, ModelArgs
from llama2np.model.transformer import Transformer
from llama2np.model.threads import blas_threads, num_threads, run_parallel, set_num_threads
from llama2np.model.storage import float32_to_bf16

SHAPES = {
    "tiny": ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, max_seq_len=256, hidden_dim=128),
    "15m": ModelArgs(dim=288, n_layers=6, n_heads=6, vocab_size=32000, max_seq_len=1024, hidden_dim=768),
    "110m": ModelArgs(dim=768, n_layers=12, n_heads=12, vocab_size=32000, max_seq_len=1024, hidden_dim=2048),
    "1b": ModelArgs(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, vocab_size=32000, max_seq_len=2048,
                    hidden_dim=5632),
    "7b": PRESETS["7B"], "13b": PRESETS["13B"],
}
GiB = 1 << 30


def random_state(args: ModelArgs, storage: str, seed: int) -> dict[str, np.ndarray]:
    """Random weights in Meta naming (std 1/sqrt(fan_in)), float32 or bf16-stored."""
    from llama2np.loaders.common import expected_shapes

    rng = np.random.default_rng(seed)
    state = {}
    for name, shape in expected_shapes(args).items():
        if len(shape) == 1:
            w = np.ones(shape, dtype=np.float32)
        else:
            w = rng.standard_normal(shape, dtype=np.float32) * np.float32(shape[-1] ** -0.5)
        state[name] = float32_to_bf16(w) if storage == "bf16" else w.astype(storage)
    return state


def load(opts) -> tuple[Transformer, float]:
    """The model under test and its load time in seconds."""
    t0 = time.perf_counter()
    if opts.checkpoint:
        from llama2np.llama import Llama2

        model = Llama2.from_pretrained(opts.checkpoint, dtype=opts.compute, quantize=opts.quantize).model
    else:
        args = SHAPES[opts.shape]
        state = random_state(args, opts.storage, opts.seed)
        t0 = time.perf_counter()  # making random numbers is not loading
        model = Transformer(args, state, opts.compute, quantize=opts.quantize)
    return model, time.perf_counter() - t0


def weight_bytes_per_token(model: Transformer) -> int:
    """Bytes of weights one decode step streams from memory (every matrix once, one embedding row)."""
    linears = model.linears()
    total = sum(sum(p.nbytes for p in lin.parts) for lin in linears)
    total += sum(lin.scale.nbytes for lin in linears if isinstance(lin, Int8Linear))
    return total + model.tok_embeddings[0].nbytes


def kv_bytes_per_token(model: Transformer, context: float) -> float:
    a = model.args
    return 2 * a.n_layers * a.n_kv_heads * a.head_dim * context * model.dtype.itemsize


def read_bandwidth(threads: int, nbytes: int, repeats: int = 5) -> float:
    """Median read bandwidth (bytes/s) of a dot product over ``nbytes`` (at least 256 MiB, at most 2 GiB).

    Pass the bytes one decode step reads: some machines have caches of hundreds of MB, and
    a small model streams from them faster than a big one streams from DRAM.
    """
    a = np.ones(int(np.clip(nbytes, 256 << 20, 2 << 30)) // 4, dtype=np.float32)
    chunks = [[c] for c in np.array_split(a, threads)]
    rates = []
    with blas_threads(1):  # our threads, one BLAS thread each: no oversubscribed cores
        for _ in range(repeats):
            t0 = time.perf_counter()
            run_parallel(lambda c: np.dot(c[0], c[0]), chunks)
            rates.append(a.nbytes / (time.perf_counter() - t0))
    return float(np.median(rates))


def sgemm_gflops(m: int, k: int, n: int, repeats: int = 3) -> float:
    a, b = np.ones((m, k), np.float32), np.ones((k, n), np.float32)
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = max(best, 2 * m * k * n / (time.perf_counter() - t0) / 1e9)
    return best


def machine_worker(spec: dict) -> dict:
    """Read bandwidth and sgemm GFLOP/s (the GEMM peak at this model's width), in the child."""
    set_num_threads(spec["threads"])
    with blas_threads(spec["threads"]):
        at_rows = {str(n): sgemm_gflops(n, spec["dim"], spec["hidden"]) for n in spec.get("rows", [])}
    return {"bandwidth": read_bandwidth(spec["threads"], spec["nbytes"]),
            "sgemm": sgemm_gflops(512, spec["dim"], spec["hidden"]), "sgemm_rows": at_rows}


def measure_machine(threads: int, nbytes: int, dim: int, hidden: int, rows: list[int] = ()) -> dict:
    """``machine_worker`` in a child process: its buffers (up to 2 GiB) must not count in our peak RSS.
    ``rows``: also sgemm GFLOP/s with that many rows (a prefill's), each."""
    spec = {"threads": threads, "nbytes": nbytes, "dim": dim, "hidden": hidden, "rows": list(rows)}
    return json.loads(_child("--machine-worker", spec).splitlines()[-1])


def _child(flag: str, spec: dict) -> str:
    """Run this script with ``flag SPEC_JSON``; its stdout (RuntimeError with its stderr if it fails)."""
    proc = subprocess.run([sys.executable, __file__, flag, json.dumps(spec)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{flag} failed:\n{proc.stderr[-2000:]}")
    return proc.stdout


def prefill_flops(model: Transformer, n: int) -> float:
    a = model.args
    matmul = 2 * n * _linear_params(model)
    return matmul + 4 * n * n * a.dim * a.n_layers  # + q k^T and probs v over the whole (masked) square


def _linear_params(model: Transformer) -> int:
    return sum(lin.out_features * lin.in_features for lin in model.linears())


def run_llama2np(model: Transformer, prompts: list[np.ndarray], new_tokens: int, runs: int, profile: bool) -> dict:
    """Median prefill seconds of each prompt, the first call's seconds, and the median decode-step
    seconds (after the longest prompt); bandwidth and sgemm are measured between the runs (in a child
    process), so a machine shared with other jobs loads both sides of each ratio alike."""
    prefill, decode, bandwidth, gemm, cores = [[] for _ in prompts], [], [], [], []
    gemm_rows = [[] for _ in prompts]
    a = model.args
    t0 = time.perf_counter()
    model.forward(prompts[0][None, :1], 0, model.new_cache(1, 1))  # a memory-mapped checkpoint is read now
    first_s = time.perf_counter() - t0
    for _ in range(runs):
        machine = measure_machine(num_threads(), weight_bytes_per_token(model), a.dim, a.ffn_hidden_dim,
                                  [len(p) for p in prompts])
        bandwidth.append(machine["bandwidth"])
        gemm.append(machine["sgemm"])
        for g, p in zip(gemm_rows, prompts):
            g.append(machine["sgemm_rows"][str(len(p))])
        for times, prompt in zip(prefill, prompts):
            cache = model.new_cache(1, len(prompt) + new_tokens)
            t0 = time.perf_counter()
            logits = model.forward(prompt[None], 0, cache)
            times.append(time.perf_counter() - t0)
        token, steps = int(logits[0, -1].argmax()), []
        cpu0, wall0 = _cpu_seconds(), time.perf_counter()
        for i in range(new_tokens):
            t0 = time.perf_counter()
            logits = model.forward(np.array([[token]]), len(prompt) + i, cache)
            steps.append(time.perf_counter() - t0)
            token = int(logits[0, -1].argmax())
        decode.append(float(np.median(steps)))
        cores.append((_cpu_seconds() - cpu0) / (time.perf_counter() - wall0))
    if profile:
        import cProfile
        import pstats

        cache = model.new_cache(1, len(prompt) + new_tokens)
        model.forward(prompt[None], 0, cache)
        prof = cProfile.Profile()
        prof.enable()
        for i in range(new_tokens):
            model.forward(np.array([[token]]), len(prompt) + i, cache)
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(14)
    return {"prefill_s": [float(np.median(t)) for t in prefill], "decode_s": float(np.median(decode)),
            "first_s": first_s, "bandwidth": float(np.median(bandwidth)), "sgemm": float(np.median(gemm)),
            "sgemm_rows": [float(np.median(g)) for g in gemm_rows],
            "cores": float(np.median(cores))}


def _cpu_seconds() -> float:
    """CPU time this process has used (all its threads): with wall time, how many cores it got."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# --- Hugging Face transformers on the same weights, in a child process --------------------


def hf_worker(spec: dict) -> dict:
    """Time HF LlamaForCausalLM greedy generate on the weights ``spec`` names (runs in the child)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(spec["threads"])
    if spec["checkpoint"]:
        from llama2np.loaders import load_checkpoint

        ckpt = load_checkpoint(spec["checkpoint"])
        args, state = ckpt.args, ckpt.state
    else:
        args = SHAPES[spec["shape"]]
        state = random_state(args, spec["storage"], spec["seed"])
    dtype = {"float32": torch.float32, "float64": torch.float64, "bf16": torch.bfloat16}[spec["hf_dtype"]]
    config = LlamaConfig(vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.ffn_hidden_dim,
                         num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads,
                         num_key_value_heads=args.n_kv_heads, rms_norm_eps=args.norm_eps,
                         rope_theta=args.rope_theta, max_position_embeddings=args.max_seq_len,
                         tie_word_embeddings=False, torch_dtype=dtype)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.load_state_dict(hf_state(args, state, dtype), assign=True, strict=False)
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)  # its buffers were left on "meta"
    model.eval()
    prompts = [torch.tensor(np.asarray(p))[None] for p in spec["prompts"]]
    n = spec["new_tokens"]

    def generate(prompt, k: int) -> float:
        t0 = time.perf_counter()
        model.generate(prompt, max_new_tokens=k, min_new_tokens=k, do_sample=False,
                       attention_mask=torch.ones_like(prompt), pad_token_id=0)
        return time.perf_counter() - t0

    with torch.inference_mode():
        generate(prompts[0], 2)  # warm-up
        prefill, longest, cores = [[] for _ in prompts], [], []
        for _ in range(spec["runs"]):
            for times, prompt in zip(prefill, prompts):
                times.append(generate(prompt, 1))
            cpu0, wall0 = _cpu_seconds(), time.perf_counter()
            longest.append(generate(prompts[-1], n + 1))
            cores.append((_cpu_seconds() - cpu0) / (time.perf_counter() - wall0))
    prefill_s = [float(np.median(t)) for t in prefill]
    return {"prefill_s": prefill_s, "decode_s": (float(np.median(longest)) - prefill_s[-1]) / n,
            "cores": float(np.median(cores)),
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def hf_state(args: ModelArgs, state, dtype) -> dict:
    """Meta-named numpy weights as HF LlamaForCausalLM tensors (wq/wk rows back in HF's half-split order)."""
    import torch

    def tensor(a, heads=None):
        if a.dtype.names:  # llama2np's BF16 structured dtype: reinterpret the bits, no copy
            t = torch.from_numpy(np.asarray(a).view(np.int16)).view(torch.bfloat16)
        else:
            t = torch.from_numpy(np.asarray(a))
        if heads is not None:  # Meta (pairs interleaved) -> HF (real halves first) per head
            out, inp = t.shape
            t = t.reshape(heads, out // heads // 2, 2, inp).transpose(1, 2).reshape(out, inp)
        return t.to(dtype).contiguous()

    hf = {"model.embed_tokens.weight": tensor(state["tok_embeddings.weight"]),
          "model.norm.weight": tensor(state["norm.weight"]), "lm_head.weight": tensor(state["output.weight"])}
    names = {"attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
             "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
             "feed_forward.w3": "mlp.up_proj", "attention_norm": "input_layernorm",
             "ffn_norm": "post_attention_layernorm"}
    for i in range(args.n_layers):
        p, q = f"layers.{i}.", f"model.layers.{i}."
        hf[q + "self_attn.q_proj.weight"] = tensor(state[p + "attention.wq.weight"], args.n_heads)
        hf[q + "self_attn.k_proj.weight"] = tensor(state[p + "attention.wk.weight"], args.n_kv_heads)
        for meta, name in names.items():
            hf[q + name + ".weight"] = tensor(state[p + meta + ".weight"])
    return hf


def run_hf(opts, prompts: list[np.ndarray]) -> dict | None:
    spec = {"checkpoint": opts.checkpoint, "shape": opts.shape, "storage": opts.storage, "seed": opts.seed,
            "hf_dtype": "bf16" if opts.storage == "bf16" or opts.checkpoint and opts.hf_bf16 else opts.compute,
            "threads": opts.threads, "prompts": [p.tolist() for p in prompts], "new_tokens": opts.new_tokens, "runs": opts.runs}
    try:
        out = _child("--hf-worker", spec)
    except RuntimeError as e:
        print(f"HF comparison: {e}", file=sys.stderr)
        return None
    return {**json.loads(out.strip().splitlines()[-1]), "hf_dtype": spec["hf_dtype"]}


# --- main ---------------------------------------------------------------------------------


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--speculative"]:  # forward cost against positions, prompt lookup against plain
        from bench_speculative import main as speculative
        return speculative(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", nargs="?", help="checkpoint directory or file (else --shape)")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="110m")
    ap.add_argument("--dtype", choices=["float32", "float64", "bf16"], default="float32",
                    help="compute dtype; bf16: random weights stored bf16, computed in float32")
    ap.add_argument("--quantize", choices=["int8"], help="weight-only quantisation at load")
    ap.add_argument("--prompt-len", default="32", metavar="N[,N...]",
                    help="prompt length(s) to time prefill at; decode follows the last")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=num_threads())
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compare-hf", action="store_true", help="time HF transformers on the same weights")
    ap.add_argument("--hf-bf16", action="store_true", default=True,
                    help="(checkpoints) run HF in bf16, as the checkpoint is stored")
    ap.add_argument("--profile", action="store_true", help="cProfile the decode steps")
    ap.add_argument("--hf-worker", help=argparse.SUPPRESS)
    ap.add_argument("--machine-worker", help=argparse.SUPPRESS)
    opts = ap.parse_args(argv)
    for worker, spec in ((hf_worker, opts.hf_worker), (machine_worker, opts.machine_worker)):
        if spec:
            print(json.dumps(worker(json.loads(spec))))
            return 0
    if not opts.checkpoint and opts.shape in ("7b", "13b"):
        ap.error(f"--shape {opts.shape}: random weights this big are not made in memory; write a checkpoint with "
                 f"scripts/checkpoints/make_synthetic_checkpoint.py --shape {opts.shape} and pass its path")
    opts.compute = "float32" if opts.dtype == "bf16" else opts.dtype
    opts.storage = opts.dtype if not opts.checkpoint else "checkpoint"
    set_num_threads(opts.threads)

    model, load_s = load(opts)
    args = model.args
    lens = [int(n) for n in opts.prompt_len.split(",")]
    prompts = [np.random.default_rng(opts.seed + 1).integers(3, args.vocab_size, n) for n in lens]
    res = run_llama2np(model, prompts, opts.new_tokens, opts.runs, opts.profile)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    per_token = weight_bytes_per_token(model) + kv_bytes_per_token(model, lens[-1] + opts.new_tokens / 2)
    bandwidth, gemm = res["bandwidth"], res["sgemm"]
    bound = bandwidth / per_token
    decode_tps = 1 / res["decode_s"]

    what = opts.checkpoint or f"{opts.shape} random"
    print(f"model      {what}: dim {args.dim}, {args.n_layers} layers, {args.n_heads}/{args.n_kv_heads} heads, "
          f"hidden {args.ffn_hidden_dim}, vocab {args.vocab_size}; {opts.dtype} "
          f"{'+ ' + opts.quantize if opts.quantize else ''}; threads {opts.threads}")
    print(f"load       {load_s:.2f} s, then the first call (1 token, cold) {res['first_s']:.2f} s: "
          f"{load_s + res['first_s']:.1f} s to the first token; peak RSS {peak_rss / GiB:.2f} GiB")
    for n, t, at_n in zip(lens, res["prefill_s"], res["sgemm_rows"]):
        gflops = prefill_flops(model, n) / t / 1e9
        print(f"prefill    {n} tokens: {n / t:.1f} tok/s, {gflops:.1f} GFLOP/s = {gflops / at_n:.0%} of measured "
              f"sgemm at {n} rows {at_n:.1f} GFLOP/s, {gflops / gemm:.0%} of sgemm at 512 rows {gemm:.1f} "
              f"({n}|512 x {args.dim} x {args.ffn_hidden_dim}, {opts.threads} threads)")
    print(f"decode     {decode_tps:.2f} tok/s (median of {opts.runs} runs x {opts.new_tokens} tokens), "
          f"CPU time {res['cores']:.2f} x wall time (of {opts.threads} threads)")
    print(f"bound      {per_token / 1e6:.1f} MB read per token / {bandwidth / 1e9:.1f} GB/s measured read "
          f"bandwidth = {bound:.2f} tok/s; achieved {decode_tps / bound:.0%}")
    if opts.compare_hf:
        del model
        gc.collect()
        hf = run_hf(opts, prompts)
        if hf:
            print(f"HF         transformers {hf['hf_dtype']}: prefill "
                  + ", ".join(f"{n}: {n / t:.1f} tok/s" for n, t in zip(lens, hf["prefill_s"]))
                  + f"; decode {1 / hf['decode_s']:.2f} tok/s (generate of the last prompt using "
                  f"{hf['cores']:.2f} cores), peak RSS {hf['peak_rss'] / GiB:.2f} GiB")
            print(f"ratio      llama2np/HF: decode {hf['decode_s'] / res['decode_s']:.2f}x, prefill "
                  + ", ".join(f"{n}: {h / t:.2f}x" for n, h, t in zip(lens, hf["prefill_s"], res["prefill_s"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
