"""Model hyper-parameters (ModelArgs, the published presets) and the checks of config values.

Type and range checks of config values (params.json, config.json, ModelArgs).

A config is JSON someone wrote or edited by hand, so any field may hold a
string, a list or Infinity. Each check returns what is wrong with one value,
named by the field, so a loader can report every bad field of a file at once.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Mapping

from ..checks import is_int, is_number
from ..errors import ConfigError

#: No Llama has a context anywhere near this; a bigger max_seq_len is a typo, not a model.
MAX_SEQ_LEN = 1 << 24

#: ModelArgs field -> what it must hold; those in ARG_OPTIONAL may also be None
ARG_KINDS = {"dim": "positive int", "n_layers": "positive int", "n_heads": "positive int",
             "n_kv_heads": "positive int", "max_seq_len": "positive int", "multiple_of": "positive int",
             "vocab_size": "int", "hidden_dim": "positive int", "ffn_dim_multiplier": "positive number",
             "norm_eps": "positive number", "rope_theta": "positive number",
             "rope_scaling_factor": "positive number", "rope_original_max_seq_len": "positive int"}
ARG_OPTIONAL = ("hidden_dim", "ffn_dim_multiplier", "rope_original_max_seq_len")

#: RoPE scalings computed (Hugging Face's rope_type names); any other is refused, never run as plain RoPE
ROPE_SCALINGS = ("linear", "dynamic")

_KINDS = {
    "positive int": "a positive integer",
    "int": "an integer",
    "positive number": "a positive finite number",
    "bool": "true or false",
    "str": "a string",
    "object": "a JSON object",
}


def field_problem(name: str, value, kind: str, optional: bool = False) -> str | None:
    """What is wrong with ``value`` as field ``name`` of the given kind (see ``_KINDS``), or None."""
    if value is None and optional:
        return None
    whole = is_int(value)  # NumPy integers too, bools never
    ok = {
        "positive int": whole and value > 0,
        "int": whole,
        "positive number": is_number(value) and math.isfinite(value) and value > 0,
        "bool": isinstance(value, bool),
        "str": isinstance(value, str),
        "object": isinstance(value, dict),
    }[kind]
    return None if ok else f"{name} must be {_KINDS[kind]}{' or null' if optional else ''}, got {value!r}"


def check_fields(config: Mapping, kinds: Mapping[str, str], where: str, optional: tuple[str, ...] = ()) -> None:
    """Raise one ConfigError naming ``where`` and every present field of ``config`` of the wrong kind.

    ``kinds``: field -> kind; fields absent from ``config`` are not checked (defaults apply);
    those in ``optional`` may also be null.
    """
    problems = [p for key, kind in kinds.items() if key in config
                if (p := field_problem(key, config[key], kind, key in optional))]
    if problems:
        raise ConfigError(f"{where}: " + "; ".join(problems))


def require_object(config, where: str) -> dict:
    """``config`` itself must be a JSON object (a dict)."""
    if not isinstance(config, dict):
        raise ConfigError(f"{where}: expected a JSON object of model settings, got a JSON {_json_type(config)}")
    return config


def _json_type(value) -> str:
    return {list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number" if isinstance(value, (int, float)) else type(value).__name__)


@dataclass
class ModelArgs:
    """Hyper-parameters, named as in Meta's ``params.json``."""

    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None: as many as n_heads (no grouping)
    vocab_size: int = -1  # Meta ships -1; the loader takes it from tok_embeddings
    multiple_of: int = 256  # FFN hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 4096  # Llama 2 context length
    hidden_dim: int | None = None  # set by formats that state it (HF, llama2.c); else derived
    # RoPE scaling (see rope_scaling_fields): None, "linear" (position interpolation) or "dynamic" (NTK)
    rope_scaling: str | None = None
    rope_scaling_factor: float = 1.0
    rope_original_max_seq_len: int | None = None  # the pre-training context: dynamic rescales the base past it

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        for name in ARG_KINDS:  # NumPy scalars become Python numbers (params.json is written from these)
            value = getattr(self, name)
            if is_int(value):
                setattr(self, name, int(value))
            elif is_number(value):
                setattr(self, name, float(value))
        problems = [p for name, kind in ARG_KINDS.items()
                    if (p := field_problem(name, getattr(self, name), kind, name in ARG_OPTIONAL))]
        if not problems:
            if self.vocab_size < 1 and self.vocab_size != -1:
                problems.append(f"vocab_size must be a positive integer (or -1: from the embedding), "
                                f"got {self.vocab_size}")
            if self.max_seq_len > MAX_SEQ_LEN:
                problems.append(f"max_seq_len={self.max_seq_len} is absurd (the limit is {MAX_SEQ_LEN}; "
                                "Llama 2 was trained on 4096)")
            if self.dim % self.n_heads:
                problems.append(f"dim={self.dim} is not divisible by n_heads={self.n_heads}")
            elif self.head_dim % 2:
                problems.append(f"head_dim={self.head_dim} must be even for RoPE")
            if self.n_heads % self.n_kv_heads:
                problems.append(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
            problems += self._rope_scaling_problems()
        if problems:
            raise ConfigError("invalid model arguments: " + "; ".join(problems))

    def _rope_scaling_problems(self) -> list[str]:
        if self.rope_scaling is None:
            if self.rope_scaling_factor != 1.0:
                return [f"rope_scaling_factor={self.rope_scaling_factor} needs a rope_scaling type"]
            return []
        if self.rope_scaling not in ROPE_SCALINGS:
            return [f"rope_scaling {self.rope_scaling!r} is not supported (supported: {', '.join(ROPE_SCALINGS)})"]
        problems = []
        if self.rope_scaling_factor < 1:
            problems.append(f"rope_scaling_factor must be >= 1, got {self.rope_scaling_factor}")
        if self.rope_scaling == "dynamic" and self.rope_original_max_seq_len is None:
            problems.append("dynamic rope_scaling needs rope_original_max_seq_len (the context it rescales past)")
        return problems

    @classmethod
    def from_params(cls, params: Mapping, **overrides) -> "ModelArgs":
        """Build from a Meta ``params.json`` dict; keys this engine does not use are ignored.

        A ``rope_scaling`` given as an object is Hugging Face's spelling (``{"type": "linear",
        "factor": 4.0}``), as fine-tunes write it into params.json: see ``rope_scaling_fields``.
        """
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in params.items() if k in known}
        if isinstance(kwargs.get("rope_scaling"), dict):
            context = kwargs.get("max_seq_len", cls.max_seq_len)
            scaled = rope_scaling_fields(kwargs.pop("rope_scaling"), context, "rope_scaling")
            merge_rope_theta(kwargs, scaled, "rope_scaling")
            kwargs.update(scaled)
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_params(self) -> dict:
        """The inverse of ``from_params``: a dict to write as ``params.json``."""
        return asdict(self)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def n_rep(self) -> int:
        """Query heads sharing each key/value head."""
        return self.n_heads // self.n_kv_heads

    @property
    def ffn_hidden_dim(self) -> int:
        """SwiGLU hidden size, derived exactly as Meta's FeedForward does unless stated."""
        if self.hidden_dim is not None:
            return self.hidden_dim
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    def num_parameters(self) -> int:
        """Total weights, with separate embedding and output matrices (as Llama 2 has)."""
        d, kv = self.dim, self.n_kv_heads * self.head_dim
        attention = d * d * 2 + d * kv * 2
        ffn = 3 * d * self.ffn_hidden_dim
        per_layer = attention + ffn + 2 * d
        return self.n_layers * per_layer + d + 2 * self.vocab_size * d


def merge_rope_theta(params: dict, scaled: dict, where: str) -> None:
    """A theta stated twice (top level and inside the scaling object) must agree."""
    if "rope_theta" in scaled and params.get("rope_theta", scaled["rope_theta"]) != scaled["rope_theta"]:
        raise ConfigError(f"rope_theta={params['rope_theta']} but {where} says rope_theta={scaled['rope_theta']}")


def rope_scaling_fields(scaling, context, where: str) -> dict:
    """The ModelArgs fields (rope_scaling, rope_scaling_factor, rope_original_max_seq_len, max_seq_len)
    of a RoPE scaling in Hugging Face's spelling: ``{"type" | "rope_type": ..., "factor": ...}``.

    ``context``: the context length the config states (config.json's max_position_embeddings).
    Computed as Hugging Face's ``modeling_rope_utils`` does:

    * linear (position interpolation, Chen et al. 2023): positions / factor. The context is the
      stated one (a checkpoint extended to 32K says 32768).
    * dynamic (NTK-aware, Hugging Face's "dynamic"): positions within the stated context keep the
      plain base; beyond it the base grows with the sequence length. HF treats the stated context as
      the original one, so the context here is factor x it, the length the factor stretches to.

    Any other type (yarn, llama3, longrope, ...) is a ConfigError naming it: run as plain RoPE
    it would load and give wrong logits. ``where`` names the config in errors. A ``rope_theta``
    inside (Hugging Face v5 keeps it there) comes back as the rope_theta field.
    """
    if scaling is None:
        return {}
    if not isinstance(scaling, dict):
        raise ConfigError(f"{where} must be a JSON object or null, got {scaling!r}")
    check_fields(scaling, {"type": "str", "rope_type": "str", "factor": "positive number", "rope_theta":
                           "positive number", "original_max_position_embeddings": "positive int"}, where)
    kinds = {scaling[k] for k in ("type", "rope_type") if k in scaling}
    if len(kinds) > 1:
        raise ConfigError(f"{where}: type {scaling['type']!r} and rope_type {scaling['rope_type']!r} disagree")
    kind = kinds.pop() if kinds else "default"
    theta = {"rope_theta": scaling["rope_theta"]} if "rope_theta" in scaling else {}
    if kind == "default":  # plain RoPE (Hugging Face v5 writes {"rope_type": "default", "rope_theta": ...})
        stray = sorted(set(scaling) - {"type", "rope_type", "rope_theta"})
        if stray:
            raise ConfigError(f"{where}: {', '.join(stray)} without a scaling type (plain RoPE has none)")
        return theta
    if kind not in ROPE_SCALINGS:
        raise ConfigError(f"{where}: rope_type {kind!r} is not supported (llama2np computes the RoPE scalings "
                          f"{' and '.join(ROPE_SCALINGS)}; see docs/families.md)")
    unknown = sorted(set(scaling) - {"type", "rope_type", "factor", "rope_theta", "original_max_position_embeddings"})
    if unknown:
        raise ConfigError(f"{where}: key(s) {', '.join(unknown)} are not part of {kind} RoPE scaling")
    if "factor" not in scaling:
        raise ConfigError(f"{where}: {kind} RoPE scaling needs a factor")
    factor = float(scaling["factor"])
    if factor < 1:
        raise ConfigError(f"{where}: factor must be >= 1 (it stretches the context), got {factor}")
    original = scaling.get("original_max_position_embeddings")
    if kind == "linear":
        return {**theta, "rope_scaling": kind, "rope_scaling_factor": factor, "rope_original_max_seq_len": original}
    if original is not None and original != context:  # HF's dynamic rescales past the stated context only
        raise ConfigError(f"{where}: original_max_position_embeddings={original} differs from the stated context "
                          f"{context}, which Hugging Face's dynamic scaling rescales past: which one is meant "
                          "is unknown")
    return {**theta, "rope_scaling": kind, "rope_scaling_factor": factor, "rope_original_max_seq_len": context,
            "max_seq_len": int(min(MAX_SEQ_LEN, factor * context))}


#: The published Llama 2 shapes (params.json of Meta's release, vocab filled in).
PRESETS: dict[str, ModelArgs] = {
    "7B": ModelArgs(dim=4096, n_layers=32, n_heads=32, vocab_size=32000),
    "13B": ModelArgs(dim=5120, n_layers=40, n_heads=40, vocab_size=32000),
    "70B": ModelArgs(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, vocab_size=32000,
                     ffn_dim_multiplier=1.3, multiple_of=4096),
}
