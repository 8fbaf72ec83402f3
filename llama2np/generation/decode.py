"""Autoregressive generation: prefill the prompt, then one token per step through the KV cache.

A batch follows Meta's ``Llama.generate``: prompts are left-aligned in one
(batch, total_len) array, the first forward call prefills every row up to the
shortest prompt, and each later call feeds one position for the whole batch;
a row still inside its (longer) prompt keeps its prompt token instead of the
sampled one. Every row has its own random generator, stopping rule and text
decoder, so its tokens are those it would get alone. Rows that finish are
dropped from the batch (and from the KV cache) so they cost nothing more.

A single prompt, and every row when decoding speculatively, goes through
``drafting.decode_row`` instead: one sequence through a ``PrefixCache`` (the
model's kept one for a single prompt, so a shared prefix is not recomputed),
with or without drafts; without them it takes exactly the steps above.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Iterator, Mapping, Sequence

import numpy as np

from ..checks import is_int
from ..errors import ContextLengthWarning, InputError
from ..model.transformer import Transformer
from ..progress import layer_callback
from ..tokenizer import StreamDecoder, Tokenizer, check_text
from .drafting import PromptLookup, decode_row, make_drafter
from .prefix_cache import PrefixCache
from .sampling import SamplingParams, check_processors, check_sampling, log_softmax, make_rngs, sample

LLAMA_BOS, LLAMA_EOS = 1, 2  # used for id prompts when the model has no tokenizer


@dataclass
class Completion:
    """One finished generation."""

    ids: list[int]  # new token ids (the prompt's first when echo=True); EOS is not included
    text: str | None  # the new text (after the prompt; cut before a stop string); None for id prompts
    logprobs: list[float] | None  # log p of each new token under the model (temperature 1), if asked
    finish_reason: str  # "eos", "length" (max_new_tokens), "stop" (a stop string) or "context"
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


class _Row:
    """The state of one sequence: its tokens so far, its text, and why it stopped."""

    def __init__(self, prompt: list[int], max_new_tokens: int, context_len: int, eos_id: int,
                 decoder: StreamDecoder | None, stop: Sequence[str], want_logprobs: bool):
        self.prompt, self.max_new_tokens, self.context_len = prompt, max_new_tokens, context_len
        self.eos_id, self.decoder, self.stop = eos_id, decoder, list(stop)
        self.new_ids: list[int] = []
        self.logprobs: list[float] | None = [] if want_logprobs else None
        self.text = ""  # decoded text so far (after the prompt)
        self.released = 0  # characters of self.text handed out; the rest may begin a stop string
        self.finish_reason: str | None = None
        if max_new_tokens == 0:
            self.finish_reason = "length"
        elif len(prompt) >= context_len:
            self._cut()

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

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
                      ContextLengthWarning, stacklevel=5)

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


def run(model: Transformer, rows: list[_Row], params: SamplingParams, rngs: list[np.random.Generator],
        stats: Stats) -> Iterator[list[tuple[int, str]]]:
    """Generate for every row; after each step yield (row index, newly printable text) per row that moved."""
    lens = np.array([len(r.prompt) for r in rows])
    active = np.array([i for i, r in enumerate(rows) if not r.done], dtype=np.int64)
    if active.size == 0:
        return
    total_len = min(model.args.max_seq_len, max(len(rows[i].prompt) + rows[i].max_new_tokens for i in active))
    tokens = np.zeros((len(rows), total_len), dtype=np.int64)  # (batch, total_len), left-aligned prompts
    for i in active:
        tokens[i, :lens[i]] = rows[i].prompt
    cache = model.new_cache(active.size, total_len)
    stats.prompt_tokens += int(lens[active].sum())
    prev = 0
    on_layer = layer_callback(model.args.n_layers, int(lens[active].min()) * active.size, model.progress)
    for cur in range(int(lens[active].min()), total_len):
        t0 = time.perf_counter()
        logits = model.forward(tokens[active, prev:cur], prev, cache, on_layer)[:, -1]  # (active, vocab)
        on_layer = None  # a bar for the prefill only
        gen = lens[active] <= cur  # rows past their prompt; the others keep their prompt token
        events = []
        if gen.any():
            rows_gen = active[gen]
            next_ids = sample(logits[gen], params, [rngs[i] for i in rows_gen],
                              [(rows[i].prompt, rows[i].new_ids) for i in rows_gen])
            lps = None
            if rows[rows_gen[0]].logprobs is not None:
                lps = np.take_along_axis(log_softmax(logits[gen]), next_ids[:, None], axis=-1)[:, 0]
            tokens[rows_gen, cur] = next_ids
            for j, i in enumerate(rows_gen):
                events.append((int(i), rows[i].push(int(next_ids[j]), None if lps is None else float(lps[j]))))
        elapsed = time.perf_counter() - t0
        stats.forward_passes += 1
        stats.new_tokens += int(gen.sum())
        if prev == 0:
            stats.prompt_seconds += elapsed
        else:
            stats.new_seconds += elapsed
            stats.decode_steps += int(gen.sum())
        prev = cur
        yield events
        finished = np.array([rows[i].done for i in active])
        if finished.all():
            return
        if finished.any():
            cache = cache.keep_rows(~finished, cur)
            active = active[~finished]


# --- the user-facing call ---------------------------------------------------------------


def _as_prompts(prompt) -> tuple[list, bool]:
    """(list of single prompts, whether a batch was given); each prompt a str or a list of ints."""
    def single(p) -> bool:
        return isinstance(p, str) or (isinstance(p, (list, tuple, np.ndarray)) and all(is_int(t) for t in p))

    if single(prompt):
        return [prompt], False
    if isinstance(prompt, (list, tuple)) and prompt and all(single(p) for p in prompt):
        return list(prompt), True
    raise InputError("prompt must be a str, a list of token ids (ints), or a list of those for a batch; got "
                     f"{_describe(prompt)}")


def _describe(prompt) -> str:
    if isinstance(prompt, (list, tuple)):
        odd = next((p for p in prompt if not (isinstance(p, str) or is_int(p))), None)
        if odd is not None and not isinstance(odd, (list, tuple)):
            return f"a list containing {type(odd).__name__} {odd!r}"
        return "a list mixing strs, ints and lists"
    return f"{type(prompt).__name__}"


def _prompt_ids(p, tokenizer: Tokenizer | None, vocab_size: int, max_seq_len: int) -> list[int]:
    if isinstance(p, str):
        check_text(p, "the prompt")
        ids = tokenizer.encode(p, bos=True)
    else:
        ids = [int(t) for t in p] or [tokenizer.bos_id if tokenizer else LLAMA_BOS]  # empty: start from BOS
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise InputError(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
    if len(ids) > max_seq_len:
        raise InputError(f"the prompt is {len(ids)} tokens, longer than the context length {max_seq_len}")
    return ids


class GenerationStream:
    """Iterator over the pieces of one streamed generation: text pieces, or ids for an id prompt.

    After it is exhausted, ``completion`` holds the whole result and ``stats`` the timings.
    """

    def __init__(self, steps: Iterator, row: _Row, stats: Stats, as_text: bool, prompt_text: str | None,
                 echo: bool):
        self.completion: Completion | None = None
        self.stats = stats
        self._iter = self._pieces(steps, row, as_text, prompt_text, echo)

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._iter)

    def _pieces(self, steps, row, as_text, prompt_text, echo):
        if echo:
            yield from ([prompt_text or ""] if as_text else row.prompt)
        sent = 0
        for events in steps:
            if as_text and events and events[0][1]:
                yield events[0][1]
            elif not as_text:
                yield from row.new_ids[sent:]
                sent = len(row.new_ids)
        self.completion = _finish(row, echo, prompt_text)


def _steps(model: Transformer, rows: list[_Row], params: SamplingParams, rngs: list[np.random.Generator],
           stats: Stats, prefix: PrefixCache | None, drafter, num_draft: int) -> Iterator[list[tuple[int, str]]]:
    """The whole generation's events: a plain batch in lockstep (``run``), else row after row.

    One row decodes through ``prefix`` (the model's kept KV cache) when given, so
    its prompt's shared prefix is not recomputed.
    """
    if len(rows) > 1 and drafter is None:
        yield from run(model, rows, params, rngs, stats)
        return
    for i, (row, rng) in enumerate(zip(rows, rngs)):
        cache = prefix if prefix is not None and len(rows) == 1 else PrefixCache(
            model, min(model.args.max_seq_len, len(row.prompt) + row.max_new_tokens))
        for events in decode_row(row, params, rng, stats, cache, drafter, num_draft):
            yield [(i, text) for _, text in events]


def _finish(row: _Row, echo: bool, prompt_text: str | None) -> Completion:
    ids = (row.prompt + row.new_ids) if echo else list(row.new_ids)
    text = row.text if row.decoder is not None else None
    if echo and text is not None and prompt_text is not None:
        text = prompt_text + text
    return Completion(ids, text, row.logprobs, row.finish_reason, list(row.prompt))


def generate(model: Transformer, tokenizer: Tokenizer | None, prompt, max_new_tokens: int = 256,
             temperature: float = 0.6, top_p: float = 0.9, top_k: int | None = None, seed=None,
             stop: str | Sequence[str] | None = None, echo: bool = False, logprobs: bool = False,
             stream: bool = False, text_context: bool = True, text_out: bool = False, *, min_p: float = 0.0,
             repetition_penalty: float = 1.0, frequency_penalty: float = 0.0, presence_penalty: float = 0.0,
             logit_bias: Mapping[int, float] | None = None, prompt_lookup: int | None = None,
             draft_model: Transformer | None = None, num_draft: int | None = None,
             prefix: PrefixCache | None = None, draft_prefix: PrefixCache | None = None,
             stats: Stats | None = None):
    """See ``Llama2.generate``.

    text_context=False decodes the new tokens on their own rather than as the prompt's
    continuation; text_out=True returns text for id prompts too (both for chat).
    prefix: a single prompt decodes through this kept KV cache (KV reuse); draft_prefix
    the same for the draft model. stats: filled in with the call's counts and timings.
    """
    check_sampling(temperature, top_p, top_k, max_new_tokens)
    check_processors(min_p, repetition_penalty, frequency_penalty, presence_penalty, logit_bias,
                     model.args.vocab_size)
    params = SamplingParams(float(temperature), float(top_p), top_k, float(min_p), float(repetition_penalty),
                            float(frequency_penalty), float(presence_penalty),
                            {int(k): float(v) for k, v in logit_bias.items()} if logit_bias else None)
    drafter, num_draft = make_drafter(prompt_lookup, draft_model, num_draft, model, draft_prefix)
    prompts, batched = _as_prompts(prompt)
    if stream and batched:
        raise InputError("stream=True takes one prompt, not a batch")
    if not (stop is None or isinstance(stop, (str, list, tuple))):
        raise InputError(f"stop must be a str, a list of str or None, got {type(stop).__name__} {stop!r}")
    stop = [stop] if isinstance(stop, str) else list(stop or [])
    if any(not isinstance(s, str) or not s for s in stop):
        raise InputError(f"stop must be a non-empty str or a list of them, got {stop!r}")
    if tokenizer is None and (stop or text_out or any(isinstance(p, str) for p in prompts)):
        what = "stop strings need" if stop else "a text prompt needs"
        raise InputError(f"{what} a tokenizer and this model has none: pass token ids, or tokenizer_path= "
                         "to from_pretrained")
    args = model.args
    rngs = make_rngs(seed, len(prompts))
    eos = tokenizer.eos_id if tokenizer is not None else LLAMA_EOS
    as_text = [text_out or isinstance(p, str) for p in prompts]
    rows = []
    for p, text in zip(prompts, as_text):
        ids = _prompt_ids(p, tokenizer, args.vocab_size, args.max_seq_len)
        decoder = tokenizer.stream(ids if text_context else ()) if text or stop else None
        rows.append(_Row(ids, max_new_tokens, args.max_seq_len, eos, decoder, stop, logprobs))

    stats = stats if stats is not None else Stats()
    stats.drafter = "prompt lookup" if isinstance(drafter, PromptLookup) else "draft model" if drafter else None
    steps = _steps(model, rows, params, rngs, stats, prefix, drafter, num_draft)
    if stream:
        prompt_text = prompts[0] if isinstance(prompts[0], str) else None
        return GenerationStream(steps, rows[0], stats, as_text[0], prompt_text, echo)
    for _ in steps:
        pass
    results = []
    for p, row, is_text in zip(prompts, rows, as_text):
        c = _finish(row, echo, p if isinstance(p, str) else None)
        results.append(c if logprobs else (c.text if is_text else c.ids))
    return results if batched else results[0]
