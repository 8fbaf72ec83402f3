"""Meta's Llama 2 tokenizer: a sentencepiece BPE model with BOS/EOS added by flag."""

from __future__ import annotations

from pathlib import Path

from .errors import TokenizerError


class Tokenizer:
    """Wraps ``tokenizer.model``; ids are exactly those of Meta's ``Tokenizer``."""

    def __init__(self, model_path: str | Path):
        import sentencepiece

        self.path = Path(model_path)
        if not self.path.is_file():
            raise TokenizerError(f"{self.path}: no such tokenizer file")
        self.sp = sentencepiece.SentencePieceProcessor()
        try:
            self.sp.Load(str(self.path))
        except (OSError, RuntimeError) as e:
            raise TokenizerError(f"{self.path}: not a sentencepiece model ({e})") from None
        self.vocab_size: int = self.sp.vocab_size()
        self.bos_id: int = self.sp.bos_id()
        self.eos_id: int = self.sp.eos_id()
        self.pad_id: int = self.sp.pad_id()

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise TokenizerError(f"encode takes a str, got {type(text).__name__}")
        ids = self.sp.Encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids) -> str:
        return self.sp.Decode([int(i) for i in ids])
