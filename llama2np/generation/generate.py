"""``generate``: prompts and options in, results or a stream out, through one ``decode.Decoder``."""

from __future__ import annotations

from typing import Iterator

import numpy as np

from ..checks import is_int
from ..errors import InputError
from ..model.transformer import Transformer
from ..token_ids import check_token_ids
from ..tokenizer import Tokenizer, check_text
from .config import GenerationConfig
from .decode import Decoder
from .drafting import PromptLookup, make_drafter
from .prefix_cache import PrefixCache
from .request import Completion, Request, Stats
from .sampling import make_rngs

LLAMA_BOS, LLAMA_EOS = 1, 2  # used for id prompts when the model has no tokenizer


def _as_prompts(prompt) -> tuple[list, bool]:
    """(list of single prompts, whether a batch was given); each prompt a str or a list of ints."""
    def single(p) -> bool:
        if isinstance(p, np.ndarray):  # ids as an array: flat and integer, or an InputError saying what it is
            check_token_ids(p, np.iinfo(np.int64).max, "the prompt")  # the vocabulary is checked in _prompt_ids
            return True
        return isinstance(p, str) or (isinstance(p, (list, tuple)) and all(is_int(t) for t in p))

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
    It owns its request (tokens so far, random generator, text decoder): whatever other
    calls run between two pieces, the next piece is the one an uninterrupted stream gives.
    """

    def __init__(self, decoder: Decoder, request: Request, as_text: bool):
        self.completion: Completion | None = None
        self.stats = decoder.stats
        self._iter = self._pieces(decoder, request, as_text)

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._iter)

    def _pieces(self, decoder: Decoder, request: Request, as_text: bool) -> Iterator:
        if request.config.echo:
            yield from ([request.prompt_text or ""] if as_text else request.prompt)
        sent = 0
        while decoder.running:
            for _, text in decoder.step():
                if as_text and text:
                    yield text
                elif not as_text:
                    yield from request.new_ids[sent:]
                    sent = len(request.new_ids)
        self.completion = request.completion()


def new_request(model: Transformer, tokenizer: Tokenizer | None, prompt, config: GenerationConfig,
                rng: np.random.Generator | None = None, text_context: bool = True, text_out: bool = False,
                eos: int | None = None) -> Request:
    """A ``Request`` for one prompt (a str, or token ids), ready for ``Decoder.add``; InputError on a bad prompt.

    rng: its random generator (default: ``default_rng(config.seed)``, a list of seeds
    being for batches). Its text is decoded when the prompt is text, text_out is set or
    there are stop strings (all three need the tokenizer; see ``generate``). eos: the token
    that ends it instead of the tokenizer's EOS (CodeLlama's <EOT> when infilling).
    """
    if rng is None:
        if isinstance(config.seed, tuple):
            raise InputError(f"a list of seeds is for a batch; one prompt takes one seed, got {list(config.seed)}")
        rng = make_rngs(config.seed, 1)[0]
    if _as_prompts(prompt)[1]:
        raise InputError("a request takes one prompt (a str or a list of token ids), not a batch")
    as_text = text_out or isinstance(prompt, str)
    if tokenizer is None and (config.stop or as_text):
        what = "stop strings need" if config.stop else "a text prompt needs"
        raise InputError(f"{what} a tokenizer and this model has none: pass token ids, or tokenizer_path= "
                         "to from_pretrained")
    args = model.args
    ids = _prompt_ids(prompt, tokenizer, args.vocab_size, args.max_seq_len)
    decoder = tokenizer.stream(ids if text_context else ()) if as_text or config.stop else None
    if eos is None:
        eos = tokenizer.eos_id if tokenizer is not None else LLAMA_EOS
    return Request(ids, config, rng, args.max_seq_len, eos, decoder, prompt if isinstance(prompt, str) else None)


def generate(model: Transformer, tokenizer: Tokenizer | None, prompt, config: GenerationConfig, *,
             stream: bool = False, text_context: bool = True, text_out: bool = False,
             draft_model: Transformer | None = None, prefix: PrefixCache | None = None,
             draft_prefix: PrefixCache | None = None, stats: Stats | None = None, progress: bool | None = None,
             eos: int | None = None):
    """See ``Llama2.generate``.

    text_context=False decodes the new tokens on their own rather than as the prompt's
    continuation; text_out=True returns text for id prompts too (both for chat).
    prefix: a single prompt decodes through this kept KV cache (KV reuse); draft_prefix
    the same for the draft model. stats: filled in with the call's counts and timings.
    progress: bars on long prefills (None: on a terminal or in a notebook). eos: see ``new_request``.
    """
    if not isinstance(config, GenerationConfig):
        raise InputError(f"config must be a GenerationConfig, got {type(config).__name__}")
    config.check_vocab(model.args.vocab_size)
    drafter, num_draft = make_drafter(config, draft_model, model, draft_prefix)
    prompts, batched = _as_prompts(prompt)
    if stream and batched:
        raise InputError("stream=True takes one prompt, not a batch")
    rngs = make_rngs(config.seed, len(prompts))
    as_text = [text_out or isinstance(p, str) for p in prompts]
    requests = [new_request(model, tokenizer, p, config, rng, text_context, text_out, eos)
                for p, rng in zip(prompts, rngs)]

    stats = stats if stats is not None else Stats()
    stats.drafter = "prompt lookup" if isinstance(drafter, PromptLookup) else "draft model" if drafter else None
    decoder = Decoder(model, drafter, num_draft, progress, stats)
    decoder.add(requests, prefix if len(requests) == 1 else None)
    if stream:
        return GenerationStream(decoder, requests[0], as_text[0])
    decoder.run()
    results = []
    for r, is_text in zip(requests, as_text):
        c = r.completion()
        results.append(c if config.logprobs else (c.text if is_text else c.ids))
    return results if batched else results[0]
