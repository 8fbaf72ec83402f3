"""Rotary position embeddings (Su et al. 2021): the rotation tables, with RoPE scaling as Hugging Face computes it.

Position m rotates dimension pair i of every query and key head by the angle
m * f_i, f_i = base^(-2i / head_dim) (Meta's ``freqs_cis``). RoPE scalings change f_i
(``rope_frequencies``):

* linear (position interpolation, Chen et al. 2023): f_i / factor, for every position;
* dynamic (Hugging Face's dynamic NTK): the plain f_i while a forward pass ends within
  the original context L; a forward pass whose positions end at n > L rotates all its
  positions with a bigger base (``rope_frequencies``). So a key's rotation depends on the
  forward pass that computed it: a prompt's keys on the prompt's length, a decoded
  token's key on its own position + 1. Keys in a KV cache keep the rotation they got,
  as in Hugging Face's cache during generation; ``rope_end_key`` says which rotation
  that was, so a cache reused by another sequence is reused only where a fresh
  computation of that sequence would rotate alike (``generation.prefix_cache``).
"""

from __future__ import annotations

import numpy as np

from .args import ModelArgs


def rope_frequencies(args: ModelArgs, seq_len: int | None = None) -> np.ndarray:
    """The rotation frequency of each dimension pair, base^(-2i / head_dim): (head_dim // 2,) float64.

    With the checkpoint's RoPE scaling, as Hugging Face's ``modeling_rope_utils`` computes it:
    linear divides every frequency by the factor; dynamic keeps the plain base up to the
    original context L and, for a forward pass whose positions end at ``seq_len`` > L, uses the base
    base * (factor * seq_len / L - (factor - 1)) ** (head_dim / (head_dim - 2)).
    HF computes these in float32; here they are float64.
    """
    d, base = args.head_dim, args.rope_theta
    if args.rope_scaling == "dynamic" and seq_len is not None and seq_len > args.rope_original_max_seq_len:
        stretch = args.rope_scaling_factor * seq_len / args.rope_original_max_seq_len - (args.rope_scaling_factor - 1)
        base = base * stretch ** (d / (d - 2))
    freqs = 1.0 / base ** (np.arange(0, d, 2, dtype=np.float64) / d)
    return freqs / args.rope_scaling_factor if args.rope_scaling == "linear" else freqs


def rope_tables(args: ModelArgs, dtype: np.dtype, length: int | None = None, start: int = 0,
                seq_len: int | None = None) -> np.ndarray:
    """e^(i * position * frequency), positions [start, length) (default max_seq_len): (length - start, head_dim // 2).

    Meta's ``freqs_cis``. Angles are computed in float64 and only then rounded to
    the compute dtype, so float64 logits are not limited by a float32 angle.
    ``seq_len``: where the forward pass's positions end (dynamic scaling's base depends on it).
    """
    end = args.max_seq_len if length is None else length
    return _rotation(np.outer(np.arange(start, end, dtype=np.float64), rope_frequencies(args, seq_len)), dtype)


def _rotation(angles: np.ndarray, dtype: np.dtype) -> np.ndarray:
    rotation = np.empty(angles.shape, dtype=np.result_type(dtype, np.complex64))
    rotation.real, rotation.imag = np.cos(angles), np.sin(angles)
    return rotation


def plain_rope_len(args: ModelArgs) -> int:
    """How far a forward pass may reach and still rotate with the checkpoint's one fixed set of
    frequencies: the original context for dynamic scaling, the whole context otherwise."""
    return args.rope_original_max_seq_len if args.rope_scaling == "dynamic" else args.max_seq_len


def rope_end_key(args: ModelArgs, end: int) -> int:
    """Which rotation a forward pass ending at position ``end`` (exclusive) gives its positions:
    0 for the fixed frequencies (every model but a dynamic one past its original context), else ``end``.
    Two keys of one position are alike when their ``rope_end_key`` is."""
    return end if end > plain_rope_len(args) else 0


class RopeTable:
    """``rope_tables`` built as far as calls reach (doubling, at most max_seq_len), so a long
    max_seq_len costs memory only once positions that far are used."""

    def __init__(self, args: ModelArgs, dtype: np.dtype):
        self.args, self.dtype, self.table = args, dtype, rope_tables(args, dtype, 0)

    def __call__(self, start: int, end: int) -> np.ndarray:
        """Rotations of positions [start, end) of one forward pass: (end - start, head_dim // 2) complex."""
        if rope_end_key(self.args, end):
            # Past the original context, dynamic scaling's base depends on where this forward's positions
            # end (HF: max(position_ids) + 1), so these rows are computed for this call alone. Keys already
            # in the KV cache keep the rotation they were given, as in HF's cache.
            return rope_tables(self.args, self.dtype, end, start, seq_len=end)
        if end > len(self.table):
            length = min(self.args.max_seq_len, max(end, 2 * len(self.table), 256))
            self.table = rope_tables(self.args, self.dtype, length)
        return self.table[start:end]

    def rows(self, positions: np.ndarray) -> np.ndarray:
        """Rotations of one token per batch row, row b at positions[b] of its own sequence:
        (batch,) -> (batch, head_dim // 2) complex.

        Each row is rotated as its own one-token forward pass would rotate it (dynamic scaling:
        with the base of a pass ending at positions[b] + 1; Hugging Face would give a whole batch
        the base of its longest row), so a row decodes in a batch as it would alone.
        """
        within = positions < plain_rope_len(self.args)  # their pass ends within: the fixed frequencies
        if within.all():
            return self(0, int(positions.max()) + 1)[positions]
        rotation = np.empty((len(positions), self.args.head_dim // 2), dtype=np.result_type(self.dtype, np.complex64))
        if within.any():
            rotation[within] = self(0, int(positions[within].max()) + 1)[positions[within]]
        for b in np.flatnonzero(~within):
            rotation[b] = self(int(positions[b]), int(positions[b]) + 1)[0]
        return rotation
