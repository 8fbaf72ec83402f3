"""llama2np: a pure-NumPy reference inference engine for Llama 2."""

from .errors import CheckpointError, ConfigError, ContextLengthWarning, InputError, Llama2npError, TokenizerError
from .generation.config import GenerationConfig
from .generation.decode import Completion
from .llama import Llama2
from .model.args import PRESETS, ModelArgs
from .model.transformer import Transformer
from .tokenizer import Tokenizer

__all__ = ["Llama2", "Completion", "GenerationConfig", "ContextLengthWarning", "ModelArgs", "PRESETS", "Transformer", "Tokenizer",
           "Llama2npError", "CheckpointError", "ConfigError", "InputError", "TokenizerError"]
__version__ = "0.1.0"
