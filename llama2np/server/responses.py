"""OpenAI's response objects, built from what ``engine`` returns; runs on the engine thread.

A ``CompletionWork`` / ``ChatWork`` is a checked request. ``start`` makes its
engine requests (one per prompt; the text they make is streamed by the worker
as choice ``index``), and once they are all done ``finish`` returns the
response's ``choices`` and ``usage``. With ``echo`` the prompt's tokens come
first in ``logprobs``, the first one's log-probability ``null`` (nothing
predicts it), as OpenAI returns it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..generation.config import GenerationConfig
from ..llama import Llama2
from .engine import (Engine, Generated, Prompt, Request, Scores, for_prompt, offsets, score, text_pieces, token_bytes,
                     token_text)

Emit = Callable[[int, str], None]


@dataclass
class CompletionWork:
    prompts: list[Prompt]
    config: GenerationConfig
    max_tokens: int | None = 16
    echo: bool = False
    logprobs: int | None = None  # alternatives per position; None: no logprobs

    def start(self, engine: Engine, emit: Emit) -> list[Request]:
        model = engine.llama
        self.prompt_texts = [p.text if p.text is not None else model.tokenizer.decode(p.ids) for p in self.prompts]
        if self.echo:
            for i, text in enumerate(self.prompt_texts):
                emit(i, text)
        context = model.args.max_seq_len
        return [engine.request(p, for_prompt(self.config, self.max_tokens, len(p.ids), context, i))
                for i, p in enumerate(self.prompts)]

    def finish(self, model: Llama2, requests: list[Request]) -> tuple[list[dict], dict]:
        choices, usage = [], _usage()
        for i, (prompt, prompt_text, request) in enumerate(zip(self.prompts, self.prompt_texts, requests)):
            gen = Generated.of(request)
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
    config: GenerationConfig
    max_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int = 0

    def start(self, engine: Engine, emit: Emit) -> list[Request]:
        config = for_prompt(self.config, self.max_tokens, len(self.prompt.ids), engine.llama.args.max_seq_len)
        return [engine.request(self.prompt, config, in_context=False)]

    def finish(self, model: Llama2, requests: list[Request]) -> tuple[list[dict], dict]:
        gen = Generated.of(requests[0])
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
