"""RoPE scaling in GGUF metadata (``llama.rope.*``), read as llama.cpp reads it; see docs/families.md."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import ConfigError

#: the ``llama.rope.*`` keys read here; any other (YaRN's, attention factors...) is refused, not skipped
_ROPE_KEYS = ("llama.rope.freq_base", "llama.rope.dimension_count", "llama.rope.scaling.type",
              "llama.rope.scaling.factor", "llama.rope.scale_linear", "llama.rope.scaling.original_context_length",
              "llama.rope.scaling.finetuned")


def rope_scaling_metadata(rope: dict[str, Any], path: Path) -> dict:
    """The ModelArgs RoPE scaling fields from the metadata, read as llama.cpp's ``llama_model::load_hparams`` does.

    The factor is ``llama.rope.scaling.factor``, else the older ``llama.rope.scale_linear``
    (0 or absent: none); the type defaults to linear. Type "none" never scales. llama.cpp has no
    dynamic NTK (its converter drops HF's "dynamic"), and "yarn", "longrope" or any other type
    is refused with a ConfigError naming it, as is any ``llama.rope.*`` key not read here.
    ``rope``: every ``llama.rope.*`` key of the file and its value.
    """
    stray = [key for key in rope if key not in _ROPE_KEYS]
    if stray:
        raise ConfigError(f"{path}: metadata {', '.join(stray)} is not supported (llama2np computes plain, "
                          "linear and dynamic RoPE only; see docs/families.md)")
    kind = rope.get("llama.rope.scaling.type")
    factors = {key: value for key in ("llama.rope.scaling.factor", "llama.rope.scale_linear")
               if (value := rope.get(key)) is not None}
    for key, value in factors.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or value == float("inf"):
            raise ConfigError(f"{path}: {key} must be a non-negative finite number, got {value!r}")
    if len(set(factors.values())) > 1:
        raise ConfigError(f"{path}: llama.rope.scaling.factor and llama.rope.scale_linear disagree "
                          f"({', '.join(f'{v:g}' for v in factors.values())})")
    factor = next(iter(factors.values()), 0.0)
    original = rope.get("llama.rope.scaling.original_context_length")
    if kind is not None and kind not in ("none", "linear"):
        why = "llama.cpp has no dynamic NTK scaling" if kind == "dynamic" else "llama2np computes linear scaling only"
        raise ConfigError(f"{path}: llama.rope.scaling.type {kind!r} is not supported in GGUF files ({why}; "
                          "see docs/families.md)")
    if kind == "none":
        if factor not in (0.0, 1.0):
            raise ConfigError(f"{path}: llama.rope.scaling.type 'none' with a scaling factor of {factor:g}: "
                              "which one is meant is unknown")
        return {}
    if factor in (0.0, 1.0):  # llama.cpp: no factor, no scaling (a factor of 1 changes nothing)
        return {}
    if original is not None and (isinstance(original, bool) or not isinstance(original, int) or original < 1):
        raise ConfigError(f"{path}: llama.rope.scaling.original_context_length must be a positive integer, "
                          f"got {original!r}")
    return {"rope_scaling": "linear", "rope_scaling_factor": float(factor), "rope_original_max_seq_len": original}
