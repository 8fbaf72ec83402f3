"""Interface state stays out of the core: progress is passed down, pieces are named through the tokenizer's
public API, and the wording of a missing-tokenizer error belongs to whoever reports it."""

from __future__ import annotations

from pathlib import Path

import pytest

from llama2np import InputError, Llama2, TokenizerError
from llama2np.generation.prefix_cache import PrefixCache
from llama2np.model.transformer import Transformer
from tiny_model import tiny_model

DEMO = Path(__file__).resolve().parents[1] / "weights" / "demo"


def test_id_to_piece_names_a_vocabulary_entry():
    tok = Llama2.from_pretrained(DEMO).tokenizer
    assert tok.id_to_piece(1) == "<s>" and tok.id_to_piece(2) == "</s>"
    word = tok.encode("Once", bos=False)[0]
    assert tok.id_to_piece(word).lstrip("\u2581") == "Once"
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        tok.id_to_piece(tok.vocab_size)
    with pytest.raises(InputError, match="int token id"):
        tok.id_to_piece("1")


def test_progress_is_an_argument_not_model_state(capsys):
    assert not hasattr(Transformer, "progress")
    model = tiny_model()
    model.progress = True  # bars at once, whatever the length
    model.logits(list(range(1, 30)), reuse_cache=False)
    assert "forward pass, 29 tokens" in capsys.readouterr().err
    model.progress = False
    model.generate(list(range(1, 30)), max_new_tokens=2, temperature=0)
    assert capsys.readouterr().err == ""
    cache = PrefixCache(model.model)
    cache.forward(list(range(1, 30)), progress=True)
    assert "forward pass" in capsys.readouterr().err


def test_the_python_api_words_its_own_missing_tokenizer_error():
    model = tiny_model()
    assert not model.has_tokenizer
    with pytest.raises(TokenizerError, match="pass tokenizer_path= to from_pretrained"):
        model.tokenizer
