"""The model: hyper-parameters, the transformer blocks, Linear and its widening kernels, the KV cache, threads."""

from .args import PRESETS, ModelArgs
from .transformer import Transformer

__all__ = ["ModelArgs", "PRESETS", "Transformer"]
