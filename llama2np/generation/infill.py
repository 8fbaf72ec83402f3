"""CodeLlama's fill-in-the-middle: the prompt Meta's codellama ``llama/generation.py`` builds, and its answer.

CodeLlama's tokenizer adds four pieces to Llama 2's 32000: ``▁<PRE>``, ``▁<SUF>``,
``▁<MID>`` and ``▁<EOT>`` (ids 32007-32010 of its 32016). Meta's
``infilling_prompt_tokens`` lays the prompt out prefix-suffix-middle (PSM):

    BOS, <PRE>, encode(prefix), <SUF>, encode_infilling(suffix), <MID>

or, with ``suffix_first`` (SPM), BOS, <PRE>, <SUF>, encode_infilling(suffix), <MID>,
encode(prefix). ``encode`` adds sentencepiece's leading space (the dummy prefix);
``encode_infilling`` does not: it encodes "☺" + text and drops the first two ids
("▁" and "☺"). The model writes the middle and ends it with <EOT> (EOS does not stop
it, as in Meta's ``text_infilling``); the middle is decoded keeping its first piece's
leading space (Meta's ``decode_infilling``).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InputError, TokenizerError
from ..tokenizer import Tokenizer, check_text

#: the infilling pieces, as CodeLlama's tokenizer.model spells them
PIECES = {"prefix": "▁<PRE>", "suffix": "▁<SUF>", "middle": "▁<MID>", "end": "▁<EOT>"}
#: encoded in front of a text to take sentencepiece's leading space off it (Meta's encode_infilling)
MARK = "☺"


@dataclass(frozen=True)
class InfillTokens:
    prefix: int
    suffix: int
    middle: int
    end: int  # <EOT>: the middle is complete


def infill_tokens(tokenizer: Tokenizer) -> InfillTokens:
    """The ids of the four infilling pieces; InputError when the vocabulary lacks any (not a CodeLlama)."""
    ids = {name: tokenizer.sp.PieceToId(piece) for name, piece in PIECES.items()}
    # sentencepiece answers the unknown piece's id for a piece it does not have
    missing = [piece for name, piece in PIECES.items() if tokenizer.sp.IdToPiece(ids[name]) != piece]
    if missing:
        raise InputError(f"{tokenizer.path}: the vocabulary has no infilling token(s) {', '.join(missing)}: "
                         "fill-in-the-middle needs a CodeLlama model and its tokenizer (ids 32007-32010 of 32016)")
    return InfillTokens(**ids)


def encode_infilling(tokenizer: Tokenizer, text: str) -> list[int]:
    """Ids of ``text`` without the leading space sentencepiece puts before it (Meta's ``encode_infilling``)."""
    marked = tokenizer.sp.Encode(MARK + text)
    mark = tokenizer.sp.Encode(MARK)
    if len(mark) != 2 or marked[:2] != mark:  # Llama's vocabulary: "▁", "☺"
        raise TokenizerError(f"{tokenizer.path}: {MARK!r} does not encode as two pieces ({mark}), which Meta's "
                             "infilling encoding relies on")
    return marked[2:]


def infilling_prompt(tokenizer: Tokenizer, prefix: str, suffix: str, suffix_first: bool = False) -> list[int]:
    """The prompt ids of Meta's ``infilling_prompt_tokens`` (PSM; SPM with ``suffix_first``)."""
    for text, what in ((prefix, "prefix"), (suffix, "suffix")):
        if not isinstance(text, str):
            raise InputError(f"the {what} must be a str, got {type(text).__name__}")
        check_text(text, f"the {what}")
    if not isinstance(suffix_first, bool):
        raise InputError(f"suffix_first must be True or False, got {suffix_first!r}")
    t = infill_tokens(tokenizer)
    bos = [tokenizer.bos_id]
    if suffix_first:
        return bos + [t.prefix, t.suffix] + encode_infilling(tokenizer, suffix) + [t.middle] + \
            tokenizer.encode(prefix, bos=False)
    return bos + [t.prefix] + tokenizer.encode(prefix, bos=False) + [t.suffix] + \
        encode_infilling(tokenizer, suffix) + [t.middle]


def decode_infilling(tokenizer: Tokenizer, ids: list[int]) -> str:
    """The middle's text, keeping its first piece's leading space (Meta's ``decode_infilling``)."""
    return tokenizer.sp.Decode([tokenizer.sp.PieceToId(MARK)] + list(ids))[1:]
