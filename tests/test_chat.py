"""Meta's Llama 2 chat format, checked token for token against ids built by hand from the published format."""

from __future__ import annotations

import pytest
import sentencepiece

from conftest import shared_path
from llama2np import InputError, Llama2, Tokenizer
from llama2np.generation.chat import dialog_tokens

BOS, EOS = 1, 2


@pytest.fixture(scope="module")
def sp():
    proc = sentencepiece.SentencePieceProcessor()
    proc.Load(str(shared_path("llama2-tokenizer", "tokenizer.model")))
    return proc


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(shared_path("llama2-tokenizer", "tokenizer.model"))


def test_single_turn(sp, tok):
    dialog = [{"role": "user", "content": "  What is the capital of France?\n"}]
    expected = [BOS] + sp.Encode("[INST] What is the capital of France? [/INST]")
    assert dialog_tokens(tok, dialog) == expected
    assert expected[:6] == [BOS, 518, 25580, 29962, 1724, 338]  # "[INST] What is" as Llama 2 chat sees it


def test_system_is_folded_into_the_first_user_turn(sp, tok):
    dialog = [{"role": "system", "content": "Always answer with a haiku."},
              {"role": "user", "content": "I am going to Paris, what should I see? "}]
    text = ("[INST] <<SYS>>\nAlways answer with a haiku.\n<</SYS>>\n\n"
            "I am going to Paris, what should I see? [/INST]")
    assert dialog_tokens(tok, dialog) == [BOS] + sp.Encode(text)


def test_multi_turn_wraps_each_exchange_in_bos_eos(sp, tok):
    dialog = [{"role": "system", "content": "Be brief."},
              {"role": "user", "content": "Hi!"},
              {"role": "assistant", "content": " Hello! How can I help?  "},
              {"role": "user", "content": "Name a colour."},
              {"role": "assistant", "content": "Blue."},
              {"role": "user", "content": "Another one."}]
    expected = ([BOS] + sp.Encode("[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi! [/INST] Hello! How can I help? ") + [EOS]
                + [BOS] + sp.Encode("[INST] Name a colour. [/INST] Blue. ") + [EOS]
                + [BOS] + sp.Encode("[INST] Another one. [/INST]"))
    assert dialog_tokens(tok, dialog) == expected


@pytest.mark.parametrize("dialog, match", [
    ([], "non-empty"), ("hello", "non-empty"),
    ([{"role": "assistant", "content": "hi"}], "roles"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "roles"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "roles"),
    ([{"role": "system", "content": "a"}], "roles"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}, {"role": "user", "content": "c"}], "roles"),
    ([{"role": "robot", "content": "a"}], "robot"),
    ([{"role": "user"}], "content"), ([{"role": "user", "content": 3}], "content"), (["hi"], "message 0"),
    ([{"role": "user", "content": "[INST] sneaky"}], "special tags"),
])
def test_bad_dialogs(tok, dialog, match):
    with pytest.raises(InputError, match=match):
        dialog_tokens(tok, dialog)


def test_chat_on_stories260k():
    model = Llama2.from_pretrained(shared_path("stories260K", "stories260K.bin"),
                                   tokenizer_path=shared_path("stories260K", "tok512.model"))
    dialog = [{"role": "user", "content": "Tell me a story."}]
    answer = model.chat(dialog, max_new_tokens=30, seed=1)
    assert isinstance(answer, str) and answer
    assert "".join(model.chat(dialog, max_new_tokens=30, seed=1, stream=True)) == answer
    ids = model.generate(dialog_tokens(model.tokenizer, dialog), max_new_tokens=30, seed=1)
    assert answer == model.tokenizer.decode(ids)  # decoded on its own, as Meta's chat_completion does
