"""Meta's Llama 2 chat format, token for token (``chat_completion`` in Meta's ``llama/generation.py``).

A dialog alternates user and assistant turns and may open with a system turn,
which is folded into the first user turn between ``<<SYS>>`` tags. Every
completed (user, assistant) pair becomes

    BOS "[INST] {user} [/INST] {answer} " EOS

and the last user turn, which the model answers, ``BOS "[INST] {user} [/INST]"``;
contents are stripped of surrounding whitespace. Each string is tokenised on
its own, so the sentencepiece dummy-prefix space starts each one.
"""

from __future__ import annotations

from typing import Mapping, Sequence

from ..errors import InputError
from ..tokenizer import Tokenizer, check_text

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
SPECIAL_TAGS = (B_INST, E_INST, "<<SYS>>", "<</SYS>>")


def check_content(content: str, what: str) -> None:
    """InputError if a message's text is not valid Unicode or holds a tag only the chat format may insert."""
    check_text(content, what)
    if any(tag in content for tag in SPECIAL_TAGS):
        raise InputError(f"{what} contains one of the special tags {', '.join(SPECIAL_TAGS)}, "
                         "which only the chat format may insert")


def check_dialog(messages: Sequence[Mapping[str, str]]) -> list[dict[str, str]]:
    """The dialog as plain dicts, or InputError saying what is wrong with it."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise InputError('a dialog is a non-empty list of {"role": ..., "content": ...} messages')
    dialog = []
    for n, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise InputError(f'message {n} must be a dict with str "role" and "content", got {m!r}')
        if m["role"] not in ("system", "user", "assistant"):
            raise InputError(f'message {n} has role {m["role"]!r}; roles are "system", "user", "assistant"')
        if m["role"] == "assistant":  # what the model wrote may hold a tag; refusing it would lock the chat
            check_text(m["content"], f"message {n}")
        else:
            check_content(m["content"], f"message {n}")
        dialog.append({"role": m["role"], "content": m["content"]})
    roles = [m["role"] for m in dialog]
    turns = roles[1:] if roles[0] == "system" else roles
    expected = ["user" if i % 2 == 0 else "assistant" for i in range(len(turns))]
    if not turns or turns != expected or turns[-1] != "user":
        raise InputError("roles must be an optional leading system message, then user and assistant "
                         f"alternating, starting and ending with user; got {roles}")
    return dialog


def dialog_tokens(tokenizer: Tokenizer, messages: Sequence[Mapping[str, str]]) -> list[int]:
    """The prompt ids for the assistant's next answer, exactly as Meta's ``chat_completion`` builds them."""
    dialog = check_dialog(messages)
    if dialog[0]["role"] == "system":
        first = {"role": "user", "content": B_SYS + dialog[0]["content"] + E_SYS + dialog[1]["content"]}
        dialog = [first] + dialog[2:]
    ids: list[int] = []
    for user, answer in zip(dialog[::2], dialog[1::2]):
        ids += tokenizer.encode(f"{B_INST} {user['content'].strip()} {E_INST} {answer['content'].strip()} ",
                                bos=True, eos=True)
    ids += tokenizer.encode(f"{B_INST} {dialog[-1]['content'].strip()} {E_INST}", bos=True, eos=False)
    return ids


def fit_dialog(tokenizer: Tokenizer, messages: Sequence[Mapping[str, str]],
               context_len: int) -> tuple[list[dict[str, str]], list[int]]:
    """The dialog, and its prompt ids, shortened if need be to leave room for an answer in ``context_len``.

    The oldest (user, assistant) exchanges after the system message are dropped first; InputError
    when the last user message does not fit even on its own (with the system message).
    """
    dialog = check_dialog(messages)
    system = dialog[:1] if dialog[0]["role"] == "system" else []
    turns = dialog[len(system):]
    while True:
        ids = dialog_tokens(tokenizer, system + turns)
        if len(ids) < context_len:
            return system + turns, ids
        if len(turns) == 1:
            with_system = " with the system prompt" if system else ""
            raise InputError(f"the message is {len(ids)} tokens in the chat format{with_system}; the context "
                             f"length {context_len} leaves room for at most {context_len - 1}")
        turns = turns[2:]
