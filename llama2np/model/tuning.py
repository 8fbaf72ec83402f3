"""Tile sizes measured on this CPU at first use, and remembered per CPU model.

How many weights a decode tile should hold depends on the CPU: its L2 size,
how fast one core widens bf16 pairs, and how long two threads take to hand the
GIL back and forth (a 2-core Intel Xeon widens 5.1 G values/s per core, a Zen 4
core 6+). So instead of one constant, the first model big enough to stream its
weights from memory times each candidate on a bf16 matrix larger than the
last-level cache (a decode step's access pattern: one GEMV per tile, every
tile read once), rounds alternating and the median kept, and the choice is
cached in the user's cache directory under the CPU's model name. Later
processes on the same CPU model read the cache.

``LLAMA2NP_DECODE_TILE`` (values per tile) overrides both; ``LLAMA2NP_TUNING=off``
keeps the built-in default without measuring.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from .linear import Linear, decode_tile, set_decode_tile
from .storage import BF16
from .threads import blas_threads, num_threads

#: decode tile sizes tried (values widened per tile; 1 MiB of float32 = 256K)
CANDIDATES = (128 * 1024, 256 * 1024, 512 * 1024, 1024 * 1024)
#: the test matrix: bf16 rows x columns (64 MiB, past the last-level caches of the CPUs measured)
SHAPE = (8192, 4096)
#: timing rounds, candidates alternating within each (a shared machine disturbs them alike)
ROUNDS = 5
#: models whose tiled weights are smaller than this are not worth measuring for (they stay in caches)
TUNE_BYTES = 256 << 20
CACHE_VERSION = 1


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else what ``platform`` tells."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def cache_file() -> Path:
    """Where choices are kept: $XDG_CACHE_HOME/llama2np (default ~/.cache/llama2np), or
    %LOCALAPPDATA%\\llama2np on Windows."""
    if sys.platform == "win32" and os.environ.get("LOCALAPPDATA"):
        root = Path(os.environ["LOCALAPPDATA"])
    else:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "llama2np" / "tuning.json"


def _key(threads: int) -> str:
    return f"v{CACHE_VERSION} {cpu_model()} | {threads} threads | numpy {np.__version__}"


def measure_decode_tiles(candidates=CANDIDATES, rounds: int = ROUNDS, shape=SHAPE) -> dict[int, float]:
    """Median G weights/s of a one-row bf16 product with each decode tile size, on ``num_threads()`` threads."""
    rows, cols = shape
    bits = np.full((rows, cols // 2), 0x3F803F80, dtype=np.uint32)  # every value 1.0 (bf16 0x3F80)
    weight = bits.view(BF16).reshape(rows, cols)
    layer = Linear(weight, np.float32)
    x = np.ones((1, cols), np.float32)
    times: dict[int, list[float]] = {c: [] for c in candidates}
    saved = decode_tile()
    try:
        with blas_threads(1):
            for c in candidates:  # build each plan and warm the buffers once
                set_decode_tile(c)
                layer(x)
            for _ in range(rounds):
                for c in candidates:
                    set_decode_tile(c)
                    t0 = time.perf_counter()
                    layer(x)
                    times[c].append(time.perf_counter() - t0)
    finally:
        set_decode_tile(saved)
    return {c: rows * cols / float(np.median(t)) / 1e9 for c, t in times.items()}


def tuned_decode_tile() -> int | None:
    """The decode tile size for this CPU: from the environment, the cache, or measured now (and cached);
    None: the built-in default."""
    if os.environ.get("LLAMA2NP_DECODE_TILE"):
        return int(os.environ["LLAMA2NP_DECODE_TILE"])
    if os.environ.get("LLAMA2NP_TUNING", "").lower() in ("off", "0", "no"):
        return None
    key, path = _key(num_threads()), cache_file()
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    entry = cached.get(key) if isinstance(cached, dict) else None
    if isinstance(entry, dict) and entry.get("decode_tile") in CANDIDATES:
        return int(entry["decode_tile"])
    rates = measure_decode_tiles()
    best = max(rates, key=rates.get)
    cached = cached if isinstance(cached, dict) else {}
    cached[key] = {"decode_tile": best, "g_weights_per_s": {str(c): round(r, 2) for c, r in rates.items()},
                   "measured": time.strftime("%Y-%m-%d")}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cached, indent=1))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home: use the measurement in this process only
    return best


def tune_for(model_bytes: int) -> None:
    """Set the decode tile for a model whose tiled weights take ``model_bytes`` (small models: left as is)."""
    if model_bytes >= TUNE_BYTES:
        set_decode_tile(tuned_decode_tile())
