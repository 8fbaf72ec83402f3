"""The command line, ``python -m llama2np``: commands, their flags, and file/stream checks."""

from .commands import main

__all__ = ["main"]
