"""One exception hierarchy for everything llama2np refuses.

Catch ``Llama2npError`` to handle any of them. Each message names the file or
the argument at fault and what was expected.
"""


class Llama2npError(Exception):
    """Base class of every error llama2np raises on purpose."""


class CheckpointError(Llama2npError):
    """A checkpoint on disk is missing, truncated, unsafe or does not match its config."""


class ConfigError(Llama2npError):
    """A params.json / config.json is missing a key, holds a bad value, or disagrees with the tensors."""


class TokenizerError(Llama2npError):
    """No tokenizer where one is needed, or one that does not fit the model."""


class InputError(Llama2npError, ValueError):
    """A bad argument from the caller: prompt too long, bad sampling parameter, wrong type."""


class DistributedError(Llama2npError):
    """A tensor-parallel actor or node died, did not answer in time, or cannot hold its slice."""


class ContextLengthWarning(UserWarning):
    """The prompt fitted but the answer was cut at the model's context length."""
