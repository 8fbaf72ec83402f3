"""Tokenizer: Meta's ids, and streamed detokenisation that joins to exactly decode()."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import shared_path
from llama2np import InputError, Tokenizer, TokenizerError

TEXTS = ["Once upon a time", "  two leading spaces", "emoji 😀🎉 and CJK 中文字符, Ελληνικά", "\n\nnew lines\n",
         "a", "", "tabs\tand  double  spaces ", "🦙"]


@pytest.fixture(scope="module")
def meta_tok() -> Tokenizer:
    return Tokenizer(shared_path("llama2-tokenizer", "tokenizer.model"))


@pytest.fixture(scope="module")
def tok512() -> Tokenizer:
    return Tokenizer(shared_path("stories260K", "tok512.model"))


def streamed(tok: Tokenizer, ids, context=()) -> list[str]:
    dec = tok.stream(context)
    pieces = [dec.push(i) for i in ids]
    return pieces + [dec.flush()]


def test_ids_match_meta_reference_cases(meta_tok):
    cases = json.loads(shared_path("reference", "llama2_tokenizer_cases.json").read_text())
    assert len(cases) >= 5
    for case in cases:
        assert meta_tok.encode(case["text"], bos=True) == case["ids_with_bos"], case["text"]
        assert meta_tok.encode(case["text"], bos=False) == case["ids_with_bos"][1:]


def test_special_ids_and_flags(meta_tok):
    assert (meta_tok.bos_id, meta_tok.eos_id, meta_tok.vocab_size) == (1, 2, 32000)
    ids = meta_tok.encode("Hello", bos=True, eos=True)
    assert ids[0] == 1 and ids[-1] == 2 and meta_tok.decode(ids) == "Hello"


def test_decode_round_trips(meta_tok):
    for text in TEXTS:
        if text == text.lstrip(" "):  # sentencepiece drops the dummy-prefix space only
            assert meta_tok.decode(meta_tok.encode(text)) == text


def test_stream_joins_to_decode_with_byte_fallback(meta_tok):
    for text in TEXTS:
        ids = meta_tok.encode(text, bos=True)
        pieces = streamed(meta_tok, ids)
        assert "".join(pieces) == meta_tok.decode(ids)
        assert not any("\ufffd" in p for p in pieces), text  # never a broken character
    emoji = meta_tok.encode("😀", bos=False)
    assert len(emoji) >= 4  # byte fallback: the pieces are raw UTF-8 bytes
    assert streamed(meta_tok, emoji)[:-2] == [""] * (len(emoji) - 1)  # held until the last byte arrives


def test_stream_of_random_ids_joins_to_decode(meta_tok, tok512):
    rng = np.random.default_rng(0)
    for tok in (meta_tok, tok512):
        spaces = [i for i in range(tok.vocab_size) if not tok.sp.IdToPiece(i).strip("\u2581")]
        assert spaces  # whitespace-only pieces, whose leading-space handling differs between models
        for _ in range(300):
            # mix byte-fallback ids (3..258), whitespace pieces, ordinary pieces and the odd BOS/EOS
            ids = rng.integers(0, tok.vocab_size, 30)
            kind = rng.random(30)
            ids = np.where(kind < 0.4, rng.integers(3, 259, 30), ids)
            ids = np.where(kind > 0.8, rng.choice(spaces, 30), ids)
            ids = ids.tolist()
            assert "".join(streamed(tok, ids)) == tok.decode(ids)
            context, new = ids[:10], ids[10:]  # as a continuation: the text the new ids add
            if not tok.decode(context).endswith("\ufffd"):
                assert "".join(streamed(tok, new, context)) == tok.decode(ids)[len(tok.decode(context)):]


def test_stream_with_context_continues_the_prompt(meta_tok):
    prompt, full = meta_tok.encode("The llama said"), meta_tok.encode("The llama said hello 😀 there")
    assert full[:len(prompt)] == prompt
    pieces = streamed(meta_tok, full[len(prompt):], context=prompt)
    assert "".join(pieces) == " hello 😀 there"


def test_bad_input(meta_tok, tmp_path):
    with pytest.raises(TokenizerError, match="no such tokenizer"):
        Tokenizer(tmp_path / "missing.model")
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="junk.model"):
        Tokenizer(tmp_path / "junk.model")
    with pytest.raises(InputError, match="str"):
        meta_tok.encode([1, 2])
    with pytest.raises(TokenizerError, match="32000"):
        meta_tok.decode([1, 32000])
