#!/usr/bin/env python
"""llama2np beside llama.cpp on the same weights: prefill and decode, alternating, with the ratios.

    python scripts/bench/bench_llamacpp.py weights/llama-2-7b-hf --llama-cpp ~/src/llama.cpp \\
        --gguf weights/llama-2-7b-bf16.gguf --prompt-len 16,128 --new-tokens 16 --rounds 3

Optional (never in CI): needs a llama.cpp build with its tools (``llama-bench``).
``--llama-cpp`` is llama.cpp's directory: ``llama-bench`` is looked for in its
``bin/`` or ``build/bin/``, ``convert_hf_to_gguf.py`` (and ``gguf-py``) in it or
in its ``src/vendor/llama.cpp/``. A checkpoint that is not a GGUF file is
converted once with llama.cpp's own converter (``--outtype bf16``; it wants
``tokenizer.model`` beside the weights) into ``--gguf``. Both engines then run
on that one file, so they read the same weights from the same page cache.

Each round runs ``llama-bench -t THREADS`` (prefill ``pp N``, decode ``tg N``)
and then llama2np in a fresh process (``bench.py``'s timings: prefill of each
prompt, median decode step, the read bandwidth and sgemm measured between
them). Medians over rounds, and llama2np / llama.cpp per round.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def find(root: Path, *candidates: str) -> Path:
    for c in candidates:
        if (root / c).exists():
            return root / c
    raise SystemExit(f"{root}: none of {', '.join(candidates)} found")


def convert(checkpoint: Path, gguf: Path, converter: Path) -> None:
    """llama.cpp's converter, HF directory -> BF16 GGUF."""
    env = {**os.environ, "PYTHONPATH": str(converter.parent / "gguf-py")}
    cmd = [sys.executable, str(converter), str(checkpoint), "--outtype", "bf16", "--outfile", str(gguf)]
    print("converting:", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=env)


def llamacpp_round(bench: Path, gguf: Path, threads: int, lens: list[int], new_tokens: int) -> dict:
    """tok/s of llama-bench's pp N (each prompt length) and tg new_tokens, one repetition."""
    cmd = [str(bench), "-m", str(gguf), "-t", str(threads), "-p", ",".join(map(str, lens)), "-n", str(new_tokens),
           "-r", "1", "-o", "json"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    tests = json.loads(out)
    prefill = {t["n_prompt"]: t["avg_ts"] for t in tests if t["n_gen"] == 0}
    decode = next(t["avg_ts"] for t in tests if t["n_prompt"] == 0)
    return {"prefill": [prefill[n] for n in lens], "decode": decode}


def llama2np_child(spec: dict) -> dict:
    """llama2np's timings in this (fresh) process."""
    from bench import run_llama2np, kv_bytes_per_token, weight_bytes_per_token
    from llama2np import Llama2
    from llama2np.model.threads import set_num_threads

    set_num_threads(spec["threads"])
    model = Llama2.from_pretrained(spec["gguf"], progress=False).model
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, model.args.vocab_size, n) for n in spec["lens"]]
    res = run_llama2np(model, prompts, spec["new_tokens"], 1, False)
    per_token = weight_bytes_per_token(model) + kv_bytes_per_token(model, spec["lens"][-1] + spec["new_tokens"] / 2)
    return {"prefill": [n / t for n, t in zip(spec["lens"], res["prefill_s"])], "decode": 1 / res["decode_s"],
            "bound": res["bandwidth"] / per_token, "bandwidth": res["bandwidth"], "sgemm_rows": res["sgemm_rows"],
            "prefill_gflops": [_gflops(model, n, t) for n, t in zip(spec["lens"], res["prefill_s"])]}


def _gflops(model, n: int, seconds: float) -> float:
    from bench import prefill_flops

    return prefill_flops(model, n) / seconds / 1e9


def llama2np_round(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"llama2np run failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", nargs="?", help="an HF checkpoint directory, or a GGUF file")
    ap.add_argument("--llama-cpp", type=Path, help="llama.cpp's directory (its build and converter)")
    ap.add_argument("--gguf", type=Path, help="the BF16 GGUF to write (or reuse) for a non-GGUF checkpoint")
    ap.add_argument("--prompt-len", default="16,128")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                    else os.cpu_count())
    ap.add_argument("--child", help=argparse.SUPPRESS)
    opts = ap.parse_args(argv)
    if opts.child:
        print(json.dumps(llama2np_child(json.loads(opts.child))))
        return 0
    if not opts.checkpoint or not opts.llama_cpp:
        ap.error("a checkpoint and --llama-cpp are needed")
    bench = find(opts.llama_cpp, "bin/llama-bench", "build/bin/llama-bench")
    checkpoint = Path(opts.checkpoint)
    if checkpoint.suffix == ".gguf":
        gguf = checkpoint
    else:
        if not opts.gguf:
            ap.error("--gguf: where to write the converted checkpoint")
        gguf = opts.gguf
        if not gguf.exists():
            convert(checkpoint, gguf, find(opts.llama_cpp, "convert_hf_to_gguf.py",
                                           "src/vendor/llama.cpp/convert_hf_to_gguf.py"))
    lens = [int(n) for n in opts.prompt_len.split(",")]
    spec = {"gguf": str(gguf), "threads": opts.threads, "lens": lens, "new_tokens": opts.new_tokens}
    ours, theirs = [], []
    for r in range(opts.rounds):
        theirs.append(llamacpp_round(bench, gguf, opts.threads, lens, opts.new_tokens))
        ours.append(llama2np_round(spec))
        o, t = ours[-1], theirs[-1]
        print(f"round {r + 1}: decode llama2np {o['decode']:.2f} / llama.cpp {t['decode']:.2f} tok/s "
              f"= {o['decode'] / t['decode']:.2f}x (bound {o['bound']:.2f} at {o['bandwidth'] / 1e9:.1f} GB/s: "
              f"{o['decode'] / o['bound']:.0%}); prefill "
              + ", ".join(f"{n}: {a:.1f} / {b:.1f} = {a / b:.2f}x ({g / s:.0%} of sgemm at {n} rows)"
                          for n, a, b, g, s in zip(lens, o["prefill"], t["prefill"], o["prefill_gflops"],
                                                   o["sgemm_rows"])), flush=True)

    def med(rows, key, i=None):
        return float(np.median([x[key] if i is None else x[key][i] for x in rows]))

    ratio = [o["decode"] / t["decode"] for o, t in zip(ours, theirs)]
    print(f"median: decode llama2np {med(ours, 'decode'):.2f} tok/s, llama.cpp BF16 {med(theirs, 'decode'):.2f}, "
          f"ratio {np.median(ratio):.2f}x; bound {med(ours, 'bound'):.2f} tok/s "
          f"({med(ours, 'bandwidth') / 1e9:.1f} GB/s), llama2np at {np.median([o['decode'] / o['bound'] for o in ours]):.0%}")
    for i, n in enumerate(lens):
        r = [o["prefill"][i] / t["prefill"][i] for o, t in zip(ours, theirs)]
        share = [o["prefill_gflops"][i] / o["sgemm_rows"][i] for o in ours]
        print(f"median: prefill {n} tokens llama2np {med(ours, 'prefill', i):.1f} tok/s, llama.cpp "
              f"{med(theirs, 'prefill', i):.1f}, ratio {np.median(r):.2f}x; llama2np at {np.median(share):.0%} of "
              f"sgemm at {n} rows ({med(ours, 'sgemm_rows', i):.0f} GFLOP/s)")
    print(f"commands: {bench} -m {gguf} -t {opts.threads} -p {opts.prompt_len} -n {opts.new_tokens} -r 1 -o json; "
          f"llama2np: bench.py's run_llama2np on {gguf}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
