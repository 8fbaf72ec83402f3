"""One sequence being generated (``Request``), its result (``Completion``) and a call's counts (``Stats``).

A request holds everything that is its own: the prompt, the options, its random
generator, its text decoder and stop strings, the tokens so far and why it
stopped. The decode loop (``decode.Decoder``) only appends tokens to it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from ..errors import ContextLengthWarning
from ..tokenizer import StreamDecoder
from .config import GenerationConfig


@dataclass
class Completion:
    """One finished generation."""

    ids: list[int]  # new token ids (the prompt's first when echo=True); EOS is not included
    text: str | None  # the new text (after the prompt; cut before a stop string); None for id prompts
    logprobs: list[float] | None  # log p of each new token under the model (temperature 1), if asked
    finish_reason: str | None  # "eos", "length" (max_new_tokens), "stop" (a stop string), "context",
    # "cancelled" (Request.cancel); None while it is still running
    prompt_ids: list[int] = field(default_factory=list)


@dataclass
class Stats:
    """Token counts and wall time of a generate call: prefill (prompt) and decode (new tokens)."""

    prompt_tokens: int = 0  # prompt tokens the prefill computed
    prompt_seconds: float = 0.0  # the prefill call (which also yields the first new token)
    new_tokens: int = 0
    decode_steps: int = 0  # new tokens made by the calls after the prefill
    new_seconds: float = 0.0  # time of those calls
    cached_tokens: int = 0  # prompt tokens whose keys/values were reused from the previous call
    recomputed_tokens: int = 0  # positions computed again because another call had reused the kept cache
    forward_passes: int = 0  # calls of the model (prefill included; a batch step counts once)
    drafted: int = 0  # tokens proposed by the drafter (prompt lookup or draft model)
    accepted: int = 0  # of those, tokens the model accepted
    drafter: str | None = None  # "prompt lookup" / "draft model" when decoding speculatively

    @property
    def tokens_per_pass(self) -> float:
        return self.new_tokens / self.forward_passes if self.forward_passes else float("nan")

    @property
    def prompt_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds else float("nan")

    @property
    def new_tokens_per_s(self) -> float:
        return self.decode_steps / self.new_seconds if self.new_seconds else float("nan")

    def summary(self) -> str:
        """One line for people: token counts, and speeds where something was timed."""
        if not self.prompt_seconds:
            return "no forward pass ran: no new tokens were asked for, or the prompt fills the context"
        decode = f", {self.new_tokens_per_s:.1f} tokens/s" if self.new_seconds else ""
        cached = f" (+{self.cached_tokens} cached)" if self.cached_tokens else ""
        line = (f"prompt: {self.prompt_tokens} tokens{cached}, {self.prompt_tokens_per_s:.1f} tokens/s | "
                f"generation: {self.new_tokens} tokens{decode}")
        if self.drafter:
            rate = f" ({self.accepted / self.drafted:.0%})" if self.drafted else ""
            line += (f" | {self.drafter}: {self.forward_passes} forward passes, {self.tokens_per_pass:.2f} "
                     f"tokens/pass, {self.drafted} drafted, {self.accepted} accepted{rate}")
        return line


class Request:
    """One sequence: its prompt and options, its tokens so far, its text, and why it stopped.

    prompt: token ids (checked by the caller against the vocabulary and context length);
    decoder: turns new ids into text (None: ids only; stop strings need one);
    prompt_text: the prompt as given, for ``echo`` of a text prompt.
    """

    def __init__(self, prompt: list[int], config: GenerationConfig, rng: np.random.Generator, context_len: int,
                 eos_id: int, decoder: StreamDecoder | None = None, prompt_text: str | None = None):
        self.prompt, self.config, self.rng, self.context_len = list(prompt), config, rng, context_len
        self.max_new_tokens, self.stop = config.max_new_tokens, list(config.stop)
        self.eos_id, self.decoder, self.prompt_text = eos_id, decoder, prompt_text
        self.new_ids: list[int] = []
        self.logprobs: list[float] | None = [] if config.logprobs else None
        self.text = ""  # decoded text so far (after the prompt)
        self.released = 0  # characters of self.text handed out; the rest may begin a stop string
        self.finish_reason: str | None = None
        if self.max_new_tokens == 0:
            self.finish_reason = "length"
        elif len(prompt) >= context_len:
            self._cut()

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def ids(self) -> list[int]:
        """prompt + new ids: the sequence whose next token is wanted."""
        return self.prompt + self.new_ids

    def cancel(self) -> None:
        """Stop here (e.g. the reader went away); the decode loop drops it at its next step."""
        if not self.done:
            self.finish_reason = "cancelled"

    def completion(self) -> Completion:
        """The result so far (the whole result once ``done``)."""
        echo = self.config.echo
        ids = self.ids if echo else list(self.new_ids)
        text = self.text if self.decoder is not None else None
        if echo and text is not None and self.prompt_text is not None:
            text = self.prompt_text + text
        return Completion(ids, text, None if self.logprobs is None else list(self.logprobs),
                          self.finish_reason, list(self.prompt))

    def push(self, token: int, logprob: float | None) -> str:
        """Take one new token; return the text it makes printable (may be "")."""
        if token == self.eos_id:
            self.finish_reason = "eos"
            return self._release(final=True)
        self.new_ids.append(token)
        if self.logprobs is not None:
            self.logprobs.append(logprob)
        if self.decoder is not None:
            self.text += self.decoder.push(token)
        if len(self.new_ids) == self.max_new_tokens:
            self.finish_reason = "length"
        elif len(self.prompt) + len(self.new_ids) >= self.context_len:
            self._cut()
        return self._release(final=self.done)

    def _cut(self) -> None:
        self.finish_reason = "context"
        warnings.warn(f"generation stopped at the context length {self.context_len}: the prompt has "
                      f"{len(self.prompt)} tokens and {len(self.new_ids)} new tokens were generated",
                      ContextLengthWarning, stacklevel=2)

    def _release(self, final: bool) -> str:
        """Text that can no longer turn out to be part of a stop string (all of it when final)."""
        if final and self.decoder is not None:
            self.text += self.decoder.flush()
        hits = [i for i in (self.text.find(s, max(0, self.released - len(s))) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            self.finish_reason = "stop"
            final = True
        end = len(self.text) if final else len(self.text) - _stop_prefix_len(self.text, self.stop)
        piece = self.text[self.released:end]
        self.released = max(self.released, end)
        return piece


def _stop_prefix_len(text: str, stop: Sequence[str]) -> int:
    """Length of the longest end of ``text`` that is the start of a stop string."""
    best = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best
