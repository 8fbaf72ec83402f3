"""Hugging Face's layout: ``config.json`` + ``model*.safetensors`` (or ``pytorch_model*.bin``).

Tensor names map one to one onto Meta's. The one real difference is RoPE:
Meta rotates interleaved pairs (dims 2i, 2i+1 of each head), HF's Llama
rotates halves (dims i, i + head_dim/2). HF's conversion script therefore
reordered the rows of wq and wk per head. The state dict hands those out in
Meta's order (``unpermute``, a copy) to anyone who reads them by name, and as
stored (``LazyStateDict.stored``) to the model, which reorders the q/k outputs
of each token instead (a permutation of ``dim`` values), so loading copies no
weight and the memory-mapped originals are the only copy resident.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import CheckpointError, ConfigError
from ..model.args import ModelArgs, check_fields, merge_rope_theta, require_object, rope_scaling_fields
from ..model.storage import is_bf16
from .common import LazyStateDict, make_args, progress_bar
from .safetensors_file import open_safetensors
from .torch_pickle import load_pth

# HF name (after "model.layers.N.") -> Meta name (after "layers.N.")
_LAYER_NAMES = {
    "self_attn.q_proj.weight": "attention.wq.weight", "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight", "self_attn.o_proj.weight": "attention.wo.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight", "mlp.up_proj.weight": "feed_forward.w3.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "input_layernorm.weight": "attention_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
}
_TOP_NAMES = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
              "lm_head.weight": "output.weight"}
_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)")

# config.json key -> what it must hold (keys absent from a config keep their defaults)
_CONFIG_KINDS = {
    "hidden_size": "positive int", "intermediate_size": "positive int", "num_hidden_layers": "positive int",
    "num_attention_heads": "positive int", "num_key_value_heads": "positive int", "head_dim": "positive int",
    "vocab_size": "positive int", "max_position_embeddings": "positive int", "rms_norm_eps": "positive number",
    "rope_theta": "positive number", "rope_parameters": "object", "tie_word_embeddings": "bool",
    "attention_bias": "bool", "mlp_bias": "bool", "model_type": "str", "hidden_act": "str",
}
# ModelArgs field -> the config.json key it is read from
_ARG_KEYS = {"dim": "hidden_size", "hidden_dim": "intermediate_size", "n_layers": "num_hidden_layers",
             "n_heads": "num_attention_heads", "n_kv_heads": "num_key_value_heads", "norm_eps": "rms_norm_eps",
             "max_seq_len": "max_position_embeddings"}
_OPTIONAL = ("num_key_value_heads", "head_dim", "rope_parameters", "vocab_size")

_SAFETENSORS = ("model.safetensors.index.json", "model.safetensors")
_PYTORCH = ("pytorch_model.bin.index.json", "pytorch_model.bin")


def meta_name(hf_name: str) -> str | None:
    """Meta's name for an HF tensor name, or None for a tensor the model has no place for."""
    if hf_name in _TOP_NAMES:
        return _TOP_NAMES[hf_name]
    m = _LAYER_RE.fullmatch(hf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
    return None


def unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Rows of an HF q/k projection in Meta's interleaved RoPE order.

    Per head HF holds the rows as (2, head_dim/2): first every real part, then
    every imaginary part; Meta holds them as (head_dim/2, 2) pairs.
    """
    out_features, in_features = w.shape
    half = out_features // n_heads // 2
    bits = w.view(np.uint16) if is_bf16(w) else w  # copying a structured dtype is slow; its bits are not
    # (out, in) -> (heads, 2, half, in) -> (heads, half, 2, in) -> (out, in)
    rows = np.ascontiguousarray(bits.reshape(n_heads, 2, half, in_features).transpose(0, 2, 1, 3))
    return rows.reshape(out_features, in_features).view(w.dtype)


def is_hf_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file() and bool(weight_files(path, check=False))


def weight_files(directory: Path, check: bool = True) -> list[Path]:
    """The weight files of an HF directory: from the index when there is one, safetensors first.

    With ``check``, every file the index (or a ``-0000K-of-0000N`` name) promises must exist.
    """
    for index_name, single_name in (_SAFETENSORS, _PYTORCH):
        index = directory / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                names = sorted(set(weight_map.values()))
                if not all(isinstance(n, str) for n in names):
                    raise TypeError(f"weight_map values must be file names, got {names!r}")
            except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, KeyError, TypeError, AttributeError) as e:
                raise CheckpointError(f"{index}: not a valid weight index ({type(e).__name__}: {e})") from None
            files = [directory / n for n in names]
        elif (directory / single_name).is_file():
            files = [directory / single_name]
        else:
            stem, ext = single_name.rsplit(".", 1)
            files = sorted(directory.glob(f"{stem}-*-of-*.{ext}"))
        if not files:
            continue
        if check:
            _check_complete(directory, files, index)
        return files
    return []


def _check_complete(directory: Path, files: list[Path], index: Path) -> None:
    missing = [f.name for f in files if not f.is_file()]
    for f in files:  # model-00001-of-00003.safetensors promises 3 files
        m = re.fullmatch(r"(.+)-(\d+)-of-(\d+)\.(\w+)", f.name)
        if m:
            width, total = len(m.group(2)), int(m.group(3))
            missing += [n for k in range(1, total + 1)
                        if not (directory / (n := f"{m.group(1)}-{k:0{width}d}-of-{m.group(3)}.{m.group(4)}"))
                        .is_file()]
    if missing:
        where = f" (listed in {index.name})" if index.is_file() else ""
        raise CheckpointError(f"{directory}: missing shard(s) {', '.join(sorted(set(missing)))}{where}")


def read_config(directory: Path, vocab_rows: int | None, max_seq_len: int | None) -> ModelArgs:
    """ModelArgs from an HF ``config.json`` (the keys Llama-2-*-hf ships)."""
    path = directory / "config.json"
    try:
        c = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ConfigError(f"{path}: not valid JSON: {e}") from None
    check_fields(require_object(c, str(path)), _CONFIG_KINDS, str(path), optional=_OPTIONAL)
    if c.get("model_type", "llama") != "llama":
        raise ConfigError(f"{path}: model_type {c['model_type']!r} is not a Llama model")
    # RoPE: "rope_scaling" (Hugging Face configs before v5: {"type" | "rope_type": ..., "factor": ...}) or
    # "rope_parameters" (v5 configs, which keeps rope_theta there too); HF reads rope_scaling first.
    scaling = c.get("rope_scaling")
    where = f"{path}: rope_scaling" if scaling is not None else f"{path}: rope_parameters"
    context = c.get("max_position_embeddings", 4096)
    rope = rope_scaling_fields(scaling if scaling is not None else c.get("rope_parameters"), context, where)
    params_rope = rope_scaling_fields(c.get("rope_parameters"), context, f"{path}: rope_parameters")
    if scaling is not None and params_rope.get("rope_scaling") not in (None, rope.get("rope_scaling")):
        raise ConfigError(f"{path}: rope_scaling and rope_parameters state different RoPE scalings")
    merge_rope_theta(c, rope, where)
    merge_rope_theta(c, params_rope, f"{path}: rope_parameters")
    rope_theta = rope.pop("rope_theta", c.get("rope_theta", params_rope.get("rope_theta", 10000.0)))
    if rope.get("rope_scaling") == "linear" and "max_sequence_length" in c:
        # LMSYS's long-context fine-tunes (Vicuna-7B-v1.5-16k) keep Llama 2's 4096 as
        # max_position_embeddings and state the stretched context here
        check_fields(c, {"max_sequence_length": "positive int"}, str(path))
        context = max(context, c["max_sequence_length"])
    if c.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{path}: hidden_act {c['hidden_act']!r} is not supported (Llama 2 uses silu)")
    if c.get("attention_bias") or c.get("mlp_bias"):
        raise ConfigError(f"{path}: attention/mlp biases are not supported (Llama 2 has none)")
    missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
               if k not in c]
    if missing:
        raise ConfigError(f"{path}: missing key(s) {', '.join(missing)}")
    if vocab_rows is not None and c.get("vocab_size", vocab_rows) != vocab_rows:
        raise ConfigError(f"{path}: vocab_size={c['vocab_size']} but model.embed_tokens.weight has "
                          f"{vocab_rows} rows")
    params = {"dim": c["hidden_size"], "hidden_dim": c["intermediate_size"], "n_layers": c["num_hidden_layers"],
              "n_heads": c["num_attention_heads"], "n_kv_heads": c.get("num_key_value_heads"),
              "vocab_size": vocab_rows if vocab_rows is not None else c.get("vocab_size", -1),
              "norm_eps": c.get("rms_norm_eps", 1e-6), "rope_theta": rope_theta,
              "max_seq_len": context, **rope}
    try:
        args = make_args(params, path, max_seq_len)
    except ConfigError as e:  # ModelArgs names its own fields: say which config.json keys they are
        named = [f"{arg} is {key}" for arg, key in _ARG_KEYS.items() if re.search(rf"\b{arg}\b", str(e))]
        raise ConfigError(f"{e} (in config.json, {', '.join(named)})" if named else str(e)) from None
    if c.get("head_dim", args.head_dim) != args.head_dim:
        raise ConfigError(f"{path}: head_dim={c['head_dim']} but hidden_size / num_attention_heads = "
                          f"{args.head_dim}")
    return args


def _open(path: Path) -> dict[str, Callable[[], np.ndarray]]:
    """Name -> tensor maker for one weight file (.safetensors or torch zip)."""
    if path.suffix == ".safetensors":
        return open_safetensors(path)
    return {name: (lambda t=t: t) for name, t in load_pth(path).items()}


def load_hf(directory: Path, max_seq_len: int | None = None, progress: bool | None = None):
    """(ModelArgs, lazily built state dict in Meta naming) for an HF checkpoint directory."""
    directory = Path(directory)
    makers: dict[str, Callable[[], np.ndarray]] = {}
    found_in: dict[str, Path] = {}
    for path in progress_bar(weight_files(directory), "loading shards", progress):
        for hf_name, make in _open(path).items():
            if hf_name.endswith("rotary_emb.inv_freq"):  # a buffer older exports saved; RoPE is ours
                continue
            if hf_name in found_in:
                raise CheckpointError(f"{directory}: tensor {hf_name!r} is in both {found_in[hf_name].name} and "
                                      f"{path.name}: which one is meant is unknown")
            found_in[hf_name] = path
            makers[meta_name(hf_name) or hf_name] = make  # unknown names stay: validate reports them
    embed = makers.get("tok_embeddings.weight")
    vocab_rows = embed().shape[0] if embed is not None else None
    args = read_config(directory, vocab_rows, max_seq_len)

    # the raw (memory-mapped) tensors tell shape and dtype; unpermuting keeps both
    specs = {n: (lambda make=make: (tuple(make().shape), make().dtype)) for n, make in makers.items()}
    halves = {}
    for name in [n for n in makers if n.endswith(("attention.wq.weight", "attention.wk.weight"))]:
        heads = args.n_heads if name.endswith("wq.weight") else args.n_kv_heads
        halves[name] = (lambda make=makers[name], name=name, heads=heads: _check_heads(
            make(), heads, directory, name))
        makers[name] = (lambda stored=halves[name], heads=heads: unpermute(stored(), heads))
    config = json.loads((directory / "config.json").read_text())
    if "output.weight" not in makers and config.get("tie_word_embeddings") and embed is not None:
        makers["output.weight"], specs["output.weight"] = embed, specs["tok_embeddings.weight"]
    return args, LazyStateDict(makers, source=directory, specs=specs, halves=halves)


def _check_heads(w: np.ndarray, n_heads: int, directory: Path, name: str) -> np.ndarray:
    if w.ndim != 2 or w.shape[0] % (2 * n_heads):
        raise CheckpointError(f"{directory}: tensor {name} has shape {w.shape}, which does not split into "
                              f"{n_heads} heads of (real, imaginary) halves")
    return w
