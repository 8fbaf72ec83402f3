"""Meta's Llama 2 tokenizer: a sentencepiece BPE model with BOS/EOS added by flag."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import InputError, TokenizerError


class Tokenizer:
    """Wraps ``tokenizer.model``; ids are exactly those of Meta's ``Tokenizer``."""

    def __init__(self, model_path: str | Path, serialized: bytes | None = None):
        """``model_path``: a tokenizer.model; or with ``serialized`` (a ModelProto's bytes, e.g. rebuilt
        from a GGUF's vocabulary), the file those bytes came from, named in errors."""
        import sentencepiece

        self.path = Path(model_path)
        if serialized is None and not self.path.is_file():
            raise TokenizerError(f"{self.path}: no such tokenizer file")
        self.sp = sentencepiece.SentencePieceProcessor()
        try:
            if serialized is None:
                self.sp.Load(str(self.path))
            else:
                self.sp.LoadFromSerializedProto(serialized)
        except (OSError, RuntimeError) as e:
            raise TokenizerError(f"{self.path}: not a sentencepiece model ({e})") from None
        self.vocab_size: int = self.sp.vocab_size()
        self.bos_id: int = self.sp.bos_id()
        self.eos_id: int = self.sp.eos_id()
        self.pad_id: int = self.sp.pad_id()

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Ids of ``text``, with BOS first (bos=True) and EOS last (eos=True)."""
        if not isinstance(text, str):
            raise InputError(f"encode takes a str, got {type(text).__name__}")
        check_text(text)
        ids = self.sp.Encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids) -> str:
        """Text of ``ids``; BOS/EOS vanish and the first piece's leading space is dropped, as in Meta's."""
        if isinstance(ids, (str, bytes)) or not hasattr(ids, "__iter__"):
            raise InputError(f"decode takes a list of int token ids, got {type(ids).__name__}")
        ids = list(ids)
        odd = next((i for i in ids if not isinstance(i, (int, np.integer)) or isinstance(i, bool)), None)
        if odd is not None:
            raise InputError(f"decode takes int token ids, got {type(odd).__name__} {odd!r}")
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise TokenizerError(f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
        return self.sp.Decode(ids)

    def id_to_piece(self, token: int) -> str:
        """The vocabulary's name for one id: its sentencepiece piece ("▁the", "<0x0A>", "</s>")."""
        if not isinstance(token, (int, np.integer)) or isinstance(token, bool):
            raise InputError(f"id_to_piece takes an int token id, got {type(token).__name__} {token!r}")
        if not 0 <= token < self.vocab_size:
            raise TokenizerError(f"token id {token} is outside the vocabulary [0, {self.vocab_size})")
        return self.sp.IdToPiece(int(token))

    def stream(self, context: Sequence[int] = ()) -> "StreamDecoder":
        """A decoder that turns ids arriving one at a time into printable text pieces."""
        return StreamDecoder(self, context)


def check_text(text: str, what: str = "the text") -> None:
    """InputError if ``text`` holds lone surrogates (not Unicode that UTF-8 can encode)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        codes = ", ".join(f"U+{ord(c):04X}" for c in text[e.start:e.end])
        raise InputError(f"{what} is not valid Unicode: lone surrogate {codes} at character {e.start} "
                         f"(in {text[max(0, e.start - 10):e.end + 10]!r})") from None


class StreamDecoder:
    """Incremental detokenisation: ``push(id)`` returns the text that id completes, maybe "".

    Joined, the pieces are exactly ``decode(ids)``; after ``context`` ids they are
    the text the new ids add to the context. Sentencepiece's own decoder does the
    work (the leading space of the first piece, byte-fallback pieces), applied to a
    short window: the ids from the last plain piece (an "anchor": not a byte,
    control, unknown or whitespace-only piece) on, with the anchor's own text cut off. A trailing
    U+FFFD means byte pieces that do not yet form a whole UTF-8 character, so that
    text is held back until the character completes (or ``flush`` at the end).
    """

    def __init__(self, tokenizer: Tokenizer, context: Sequence[int] = ()):
        self.tokenizer, self.sp = tokenizer, tokenizer.sp
        self.window: list[int] = []  # ids from the anchor (at index 0) on; all ids while there is no anchor
        self.anchored = False
        self.anchor_len = 0  # characters of the anchor's own text at the start of the window's text
        self.emitted = ""  # text released after the anchor
        for token in context:
            self.push(token)

    def _text(self) -> str:
        return self.sp.Decode(self.window)[self.anchor_len:]

    def push(self, token: int) -> str:
        token = int(token)
        if not 0 <= token < self.tokenizer.vocab_size:
            raise TokenizerError(f"token id {token} is outside the vocabulary [0, {self.tokenizer.vocab_size})")
        self.window.append(token)
        text = self._text()
        if text.endswith("\ufffd") or not text.startswith(self.emitted):
            return ""
        piece, self.emitted = text[len(self.emitted):], text
        sp = self.sp
        plain = not (sp.IsControl(token) or sp.IsByte(token) or sp.IsUnknown(token) or sp.IsUnused(token))
        if plain and sp.IdToPiece(token).strip("\u2581"):
            # everything up to this piece is final: it becomes the new anchor. Whitespace-only pieces
            # cannot anchor: some models' decoders strip all the leading whitespace of a sequence.
            self.window, self.anchored, self.emitted = [token], True, ""
            self.anchor_len = len(sp.Decode([token]))
        return piece

    def flush(self) -> str:
        """Whatever is still held back (an unfinished character prints as U+FFFD)."""
        text = self._text()
        if not text.startswith(self.emitted):  # cannot happen with sentencepiece; never reprint
            return ""
        piece, self.emitted = text[len(self.emitted):], text
        return piece
