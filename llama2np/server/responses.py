"""OpenAI's response objects, built from what ``engine`` returns; runs on the engine thread.

A ``CompletionWork`` / ``ChatWork`` is a checked request. ``run`` generates each
of its prompts in turn, calling ``emit(index, piece)`` with the text as it is
made (what a stream sends), and returns the response's ``choices`` and
``usage``. With ``echo`` the prompt's tokens come first in ``logprobs``, the
first one's log-probability ``null`` (nothing predicts it), as OpenAI returns it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..llama import Llama2
from .engine import (Generated, Options, Prompt, Scores, generate, offsets, score, text_pieces, token_bytes,
                     token_text)

Emit = Callable[[int, str], None]


@dataclass
class CompletionWork:
    prompts: list[Prompt]
    options: Options
    echo: bool = False
    logprobs: int | None = None  # alternatives per position; None: no logprobs

    def run(self, model: Llama2, emit: Emit, cancelled: Callable[[], bool]) -> tuple[list[dict], dict]:
        choices, usage = [], _usage()
        for i, prompt in enumerate(self.prompts):
            prompt_text = prompt.text if prompt.text is not None else model.tokenizer.decode(prompt.ids)
            if self.echo:
                emit(i, prompt_text)
            seed = None if self.options.seed is None else self.options.seed + i  # prompt i: seed + i, as a batch
            gen = yield_from(generate(model, prompt, self.options, seed, True, cancelled), i, emit)
            if gen.stopped:
                break
            choices.append({"index": i, "text": (prompt_text if self.echo else "") + gen.text,
                            "logprobs": self._logprobs(model, prompt, gen, prompt_text),
                            "finish_reason": gen.finish_reason})
            _count(usage, len(prompt.ids), len(gen.ids))
        return choices, usage

    def _logprobs(self, model: Llama2, prompt: Prompt, gen: Generated, prompt_text: str) -> dict | None:
        if self.logprobs is None:
            return None
        ids = prompt.ids + gen.ids
        first = 1 if self.echo else len(prompt.ids)
        sc = score(model, ids, first, self.logprobs) if first < len(ids) else Scores([], [])
        new_pieces = text_pieces(model, gen.ids, prompt.ids)
        if self.echo:
            shown = ids
            pieces = text_pieces(model, prompt.ids) + new_pieces
            token_lp, top = [None] + sc.token_logprobs, [None] + [_top_dict(model, t) for t in sc.top]
            start = 0
        else:
            shown, pieces = gen.ids, new_pieces
            token_lp, top = sc.token_logprobs, [_top_dict(model, t) for t in sc.top]
            start = len(prompt_text)
        return {"tokens": [token_text(model, t) for t in shown], "token_logprobs": token_lp,
                "top_logprobs": top, "text_offset": offsets(pieces, start)}


@dataclass
class ChatWork:
    prompt: Prompt
    options: Options
    logprobs: bool = False
    top_logprobs: int = 0

    def run(self, model: Llama2, emit: Emit, cancelled: Callable[[], bool]) -> tuple[list[dict], dict]:
        seed = self.options.seed
        gen = yield_from(generate(model, self.prompt, self.options, seed, False, cancelled), 0, emit)
        if gen.stopped:
            return [], _usage()
        choice = {"index": 0, "message": {"role": "assistant", "content": gen.text},
                  "logprobs": self._logprobs(model, gen) if self.logprobs else None,
                  "finish_reason": gen.finish_reason}
        usage = _usage()
        _count(usage, len(self.prompt.ids), len(gen.ids))
        return [choice], usage

    def _logprobs(self, model: Llama2, gen: Generated) -> dict:
        ids = self.prompt.ids + gen.ids
        first = len(self.prompt.ids)
        sc = score(model, ids, first, self.top_logprobs) if gen.ids else Scores([], [])
        content = []
        for token, lp, top in zip(gen.ids, sc.token_logprobs, sc.top):
            entry = _chat_token(model, token, lp)
            entry["top_logprobs"] = [_chat_token(model, t, v) for t, v in top]
            content.append(entry)
        return {"content": content}


def yield_from(steps, index: int, emit: Emit):
    """Run a generator of text pieces to its end, emitting each piece; its return value."""
    while True:
        try:
            piece = next(steps)
        except StopIteration as end:
            return end.value
        if piece:
            emit(index, piece)


def _chat_token(model: Llama2, token: int, logprob: float) -> dict:
    return {"token": token_text(model, token), "logprob": logprob, "bytes": token_bytes(model, token)}


def _top_dict(model: Llama2, top: list[tuple[int, float]]) -> dict[str, float]:
    """{token text: log p}, likeliest first; two ids with the same text keep the likelier."""
    out: dict[str, float] = {}
    for token, lp in top:
        out.setdefault(token_text(model, token), lp)
    return out


def _usage() -> dict:
    return {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}


def _count(usage: dict, prompt_tokens: int, completion_tokens: int) -> None:
    usage["prompt_tokens"] += prompt_tokens
    usage["completion_tokens"] += completion_tokens
    usage["total_tokens"] += prompt_tokens + completion_tokens
