"""Meta's Llama 2 tokenizer: a sentencepiece BPE model with BOS/EOS added by flag."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

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
        """Text of ``ids``; BOS/EOS vanish and the first piece's leading space is dropped, as in Meta's."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise TokenizerError(f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
        return self.sp.Decode(ids)

    def stream(self, context: Sequence[int] = ()) -> "StreamDecoder":
        """A decoder that turns ids arriving one at a time into printable text pieces."""
        return StreamDecoder(self, context)


class StreamDecoder:
    """Incremental detokenisation: ``push(id)`` returns the new text it completes, maybe "".

    The pieces joined equal ``decode(context + ids)`` minus ``decode(context)``
    (with no context: exactly ``decode(ids)``). Text is re-derived from the
    whole sequence each time, so sentencepiece's own rules (the leading space of
    the first piece, byte-fallback pieces) apply unchanged; only text that cannot
    change any more is released. A trailing U+FFFD means byte-fallback pieces
    that do not yet form a whole UTF-8 character, so it is held back until the
    character completes (or ``flush`` at the end).
    """

    def __init__(self, tokenizer: Tokenizer, context: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self.ids: list[int] = [int(i) for i in context]
        self.skip = len(tokenizer.decode(self.ids)) if self.ids else 0  # context text, not ours to print
        self.emitted = ""  # text released so far (after the context)

    def _text(self) -> str:
        return self.tokenizer.decode(self.ids)[self.skip:]

    def push(self, token: int) -> str:
        self.ids.append(int(token))
        text = self._text()
        if text.endswith("\ufffd") or not text.startswith(self.emitted):
            return ""
        return self._release(text)

    def flush(self) -> str:
        """Whatever is still held back (an unfinished character prints as U+FFFD)."""
        return self._release(self._text())

    def _release(self, text: str) -> str:
        if not text.startswith(self.emitted):  # cannot happen with sentencepiece; never reprint
            return ""
        piece, self.emitted = text[len(self.emitted):], text
        return piece
