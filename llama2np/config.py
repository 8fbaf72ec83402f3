"""Type and range checks of config values (params.json, config.json, ModelArgs).

A config is JSON someone wrote or edited by hand, so any field may hold a
string, a list or Infinity. Each check returns what is wrong with one value,
named by the field, so a loader can report every bad field of a file at once.
"""

from __future__ import annotations

import math
from typing import Mapping

from .errors import ConfigError

#: No Llama has a context anywhere near this; a bigger max_seq_len is a typo, not a model.
MAX_SEQ_LEN = 1 << 24

#: ModelArgs field -> what it must hold; those in ARG_OPTIONAL may also be None
ARG_KINDS = {"dim": "positive int", "n_layers": "positive int", "n_heads": "positive int",
             "n_kv_heads": "positive int", "max_seq_len": "positive int", "multiple_of": "positive int",
             "vocab_size": "int", "hidden_dim": "positive int", "ffn_dim_multiplier": "positive number",
             "norm_eps": "positive number", "rope_theta": "positive number"}
ARG_OPTIONAL = ("hidden_dim", "ffn_dim_multiplier")

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
    is_int = isinstance(value, int) and not isinstance(value, bool)
    ok = {
        "positive int": is_int and value > 0,
        "int": is_int,
        "positive number": (is_int or isinstance(value, float)) and math.isfinite(value) and value > 0,
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
