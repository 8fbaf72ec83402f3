"""Memory plan for tensor-parallel inference, from a model's config alone (no weights read).

Counts what llama2np keeps, as ``linear.py`` stores it: bf16 weights under
float32 compute stay bf16 (2 bytes), other float weights become the compute
dtype, int8 weights are 1 byte plus one compute-dtype scale per row. The KV
cache is counted full, at the context length.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from ..errors import ConfigError, DistributedError, InputError
from ..model.args import PRESETS, ModelArgs
from ..model.storage import resolve_compute_dtype
from .shard import Shard, check_world

GiB = 1024 ** 3
#: memory a machine keeps for the OS, Ray's own processes and the object store's working set
RESERVED_BYTES = 2 * GiB
_ITEMSIZE = {"bfloat16": 2, "float16": 2, "float32": 4, "float64": 8}


def available_memory() -> int | None:
    """Bytes this machine can still hand out (Linux MemAvailable), or None when unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def human(n: int) -> str:
    """Bytes as B / KiB / MiB / GiB with two decimals."""
    for unit, size in (("GiB", GiB), ("MiB", 1024 ** 2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


#: a GGUF tensor type -> the storage name it is held as (F32/F16/BF16 memory-mapped as they are)
_GGUF_PLAIN = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


def matrix_bytes(rows: int, cols: int, storage: str, dtype: np.dtype, quantize: str | None) -> int:
    """Bytes llama2np holds for one (rows, cols) weight matrix. ``storage`` may be a GGUF tensor type:
    Q8_0, Q4_K ... are held as int8 codes with per-block scales (``model.quant_blocks``); other quantized
    types as gguf's float32 values (then as any float32 weight)."""
    if quantize == "int8":
        return rows * cols + rows * dtype.itemsize
    if storage in _GGUF_PLAIN:
        storage = _GGUF_PLAIN[storage]
    elif storage not in _ITEMSIZE:
        from ..loaders.gguf_blocks import form_bytes, supported

        if supported(storage):
            return form_bytes(storage, rows, cols)
        storage = "float32"
    if storage == "bfloat16" and dtype == np.float32:
        return rows * cols * 2
    return rows * cols * dtype.itemsize


@dataclass
class MemoryPlan:
    """Bytes per actor (each holds the same amount) and for the driver."""

    args: ModelArgs
    world: int
    actor_weights: int
    actor_kv_cache: int
    driver_weights: int

    @property
    def actor_total(self) -> int:
        return self.actor_weights + self.actor_kv_cache

    def machines(self, ram_bytes: int) -> int | None:
        """Machines of ``ram_bytes`` each needed with one actor per machine (the driver beside actor 0),
        or None when an actor does not fit one."""
        usable = ram_bytes - RESERVED_BYTES
        if self.actor_total + self.driver_weights > usable:
            return None
        return self.world


def memory_plan(args: ModelArgs, world: int, storage: str = "bfloat16", dtype: str = "float32",
                quantize: str | None = None, max_seq_len: int | None = None, batch_size: int = 1,
                tensor_types: Mapping[str, str] | None = None) -> MemoryPlan:
    """What each of ``world`` actors and the driver hold for ``args`` stored as ``storage``.

    ``tensor_types``: each tensor's own storage by its Meta name (a GGUF's types, see
    ``loaders.gguf.tensor_types``), overriding ``storage``.
    """
    compute = resolve_compute_dtype(dtype)
    if tensor_types is not None:
        return _typed_plan(args, world, tensor_types, compute, quantize, max_seq_len, batch_size)
    if storage not in _ITEMSIZE:
        raise InputError(f"storage must be one of {sorted(_ITEMSIZE)}, got {storage!r}")
    if quantize not in (None, "int8"):
        raise InputError(f"quantize must be None or 'int8', got {quantize!r}")
    world = check_world(world, InputError)  # bounded before the loop over ranks below
    Shard(0, world).check(args)
    per_layer = max(sum(matrix_bytes(r, c, storage, compute, quantize) for r, c in
                        Shard(k, world).layer_shapes(args).values()) for k in range(world))  # the biggest slice
    shard = Shard(0, world)
    kv_heads = len(shard.kv_heads(args))
    seq = max_seq_len or args.max_seq_len
    kv = 2 * args.n_layers * batch_size * kv_heads * seq * args.head_dim * compute.itemsize
    vocab = args.vocab_size if args.vocab_size > 0 else 32000
    driver = (vocab * args.dim * _ITEMSIZE[storage]  # embedding rows are widened when looked up
              + matrix_bytes(vocab, args.dim, storage, compute, quantize)  # output projection
              + (2 * args.n_layers + 1) * args.dim * compute.itemsize  # norms
              + seq * args.head_dim * compute.itemsize)  # RoPE table: head_dim / 2 complex numbers per position
    return MemoryPlan(args, world, args.n_layers * per_layer, kv, driver)


def _typed_plan(args: ModelArgs, world: int, types: Mapping[str, str], compute: np.dtype, quantize: str | None,
                max_seq_len: int | None, batch_size: int) -> MemoryPlan:
    """memory_plan with a storage per tensor: each layer counted with its own types."""
    if quantize not in (None, "int8"):
        raise InputError(f"quantize must be None or 'int8', got {quantize!r}")
    if world < 1:
        raise InputError(f"tensor_parallel must be >= 1, got {world}")
    Shard(0, world).check(args)
    shards = [Shard(k, world).layer_shapes(args) for k in range(world)]
    weights = sum(max(sum(matrix_bytes(r, c, types[f"layers.{i}.{n}"], compute, quantize) for n, (r, c) in s.items())
                      for s in shards) for i in range(args.n_layers))
    kv_heads = len(Shard(0, world).kv_heads(args))
    seq = max_seq_len or args.max_seq_len
    kv = 2 * args.n_layers * batch_size * kv_heads * seq * args.head_dim * compute.itemsize
    embedding = types["tok_embeddings.weight"]
    driver = (matrix_bytes(args.vocab_size, args.dim, embedding, compute, None)  # looked up, never requantized
              + (matrix_bytes(args.vocab_size, args.dim, types["output.weight"], compute, quantize)
                 if "output.weight" in types else matrix_bytes(args.vocab_size, args.dim, embedding, compute, quantize)
                 if quantize else 0)  # absent: the embedding's own matrix, shared
              + (2 * args.n_layers + 1) * args.dim * compute.itemsize + seq * args.head_dim * compute.itemsize)
    return MemoryPlan(args, world, weights, kv, driver)


def check_node_memory(plan: MemoryPlan, actors_on_node: int, who: str) -> None:
    """DistributedError naming ``who`` when this machine lacks the memory its ``actors_on_node`` actors need."""
    need, free = plan.actor_total * actors_on_node, available_memory()
    if free is not None and need > free:
        raise DistributedError(
            f"{who}: {actors_on_node} actor(s) on this node need {human(need)} ({human(plan.actor_weights)} of "
            f"weights and {human(plan.actor_kv_cache)} of KV cache at context {plan.args.max_seq_len} each) but "
            f"only {human(free)} is available: add machines, use quantize='int8' or a shorter max_seq_len")


def read_model_config(path: str | Path, max_seq_len: int | None = None) -> tuple[ModelArgs, str]:
    """(ModelArgs, storage dtype) from a directory's params.json or config.json, no weights read.

    Meta's params.json states neither: Llama 2 releases are bf16 with 32000 tokens. HF's
    config.json states both (torch_dtype, vocab_size).
    """
    from ..loaders.common import check_max_seq_len, make_args
    from ..loaders.hf import read_config
    from ..model.args import require_object

    check_max_seq_len(max_seq_len)
    path = Path(path).expanduser()
    if (path / "params.json").is_file():
        params = require_object(_read_json(path / "params.json"), path / "params.json")
        overrides = {"max_seq_len": max_seq_len} if max_seq_len is not None else {}
        if params.get("vocab_size", -1) in (-1, None):
            overrides["vocab_size"] = 32000  # Meta ships -1; every Llama 2 release has 32000
        return make_args(params, path / "params.json", **overrides), "bfloat16"
    if (path / "config.json").is_file():
        config = require_object(_read_json(path / "config.json"), path / "config.json")
        storage = str(config.get("torch_dtype") or config.get("dtype") or "bfloat16")
        return read_config(path, None, max_seq_len), storage if storage in _ITEMSIZE else "bfloat16"
    raise ConfigError(f"{path}: no params.json or config.json to plan from")


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ConfigError(f"{path}: not valid JSON: {e}") from None


def valid_worlds(args: ModelArgs, limit: int = 64) -> list[int]:
    """Actor counts that split this model evenly."""
    worlds = []
    for n in range(1, limit + 1):
        try:
            Shard(0, n).check(args)
        except ConfigError:
            continue
        worlds.append(n)
    return worlds


def machines_table(ram_bytes: int, storage: str = "bfloat16") -> list[tuple[str, str, int | None, int]]:
    """(model, quantize label, machines needed or None, bytes per actor) for the Llama 2 presets."""
    rows = []
    for name, args in PRESETS.items():
        for quantize in (None, "int8"):
            fit = None
            for n in valid_worlds(args):
                p = memory_plan(args, n, storage, quantize=quantize)
                if p.machines(ram_bytes) is not None:
                    fit = p
                    break
            rows.append((name, quantize or storage, fit.world if fit else None, fit.actor_total if fit else 0))
    return rows
