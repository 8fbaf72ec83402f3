"""Where the server meets the engine: a checked request in, the engine's decode loop, tokens and log-probabilities out.

This is the only module of the server that calls the model. A request's options
become a ``GenerationConfig`` (checked before the request is queued, so a bad one
is answered at once), its prompts become token ids, and ``Engine`` runs them in
the engine's ``Decoder`` (continuous batching): a request added between two steps
is prefilled at the next one and then joins the running batch, one forward per
step for every running request, each at its own position; it leaves the batch
when it finishes or its client goes away.

Log-probabilities are those OpenAI defines: log-softmax of the model's logits
at temperature 1, whatever the sampling options, i.e. of exactly what
``Llama2.logits`` returns for the sequence (computed in float64). The text each
token adds comes from the tokenizer's stream decoder, so the pieces join into
the returned text and ``text_offset`` points into it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from ..checks import is_int
from ..errors import InputError
from ..generation.chat import dialog_tokens
from ..generation.config import GenerationConfig
from ..generation.decode import Decoder, Request, Stats
from ..generation.generate import new_request
from ..generation.sampling import log_softmax
from ..llama import Llama2

MAX_TOP_LOGPROBS = 20  # alternatives per position a request may ask for (OpenAI's chat limit)
LOGSOFTMAX_ROWS = 256  # positions widened to float64 at a time (bounds the temporary to 256 x vocab)

# the engine's reasons -> OpenAI's: the end-of-sequence token and a stop string both "stop"
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length", "context": "length", "cancelled": "stop"}


def generation_config(max_tokens: int | None, temperature, top_p, top_k, min_p, repetition_penalty,
                      frequency_penalty, presence_penalty, logit_bias: Mapping[int, float] | None, seed,
                      stop: Sequence[str], vocab_size: int) -> GenerationConfig:
    """A request's options as the engine's checked ``GenerationConfig`` (InputError naming a bad one).

    max_tokens None: up to the context length (set per prompt by ``for_prompt``).
    """
    config = GenerationConfig(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                              repetition_penalty=repetition_penalty, frequency_penalty=frequency_penalty,
                              presence_penalty=presence_penalty, logit_bias=logit_bias,
                              max_new_tokens=0 if max_tokens is None else max_tokens, seed=seed, stop=stop,
                              logprobs=True)
    config.check_vocab(vocab_size)
    return config


def for_prompt(config: GenerationConfig, max_tokens: int | None, prompt_len: int, context_len: int,
               index: int = 0) -> GenerationConfig:
    """The config of prompt ``index`` of a request: seed + index (as a batch), max_tokens None = the room left."""
    changes = {}
    if max_tokens is None:
        changes["max_new_tokens"] = max(0, context_len - prompt_len)
    if config.seed is not None and index:
        changes["seed"] = config.seed + index
    return config.replace(**changes) if changes else config


def logit_bias_ids(bias: Mapping[str, float] | None) -> dict[int, float] | None:
    """OpenAI's logit_bias (JSON keys are strings of token ids) -> {token id: bias}."""
    if not bias:
        return None
    out = {}
    for key, value in bias.items():
        if not (isinstance(key, str) and key.isdigit() and len(key) <= 9):  # 9 digits: any real vocabulary
            raise InputError(f"logit_bias keys must be token ids, got {key!r}")
        out[int(key)] = value
    return out


# --- prompts -----------------------------------------------------------------------------


@dataclass
class Prompt:
    """One sequence to continue: its ids, and the text it came from (None for a token prompt)."""

    ids: list[int]
    text: str | None = None


def completion_prompts(model: Llama2, prompt) -> list[Prompt]:
    """OpenAI's ``prompt``: a string, a list of strings, a list of token ids or a list of id lists.

    Text is encoded with BOS first (as Meta's generation and llama.cpp's server do);
    token ids are used as given.
    """
    if isinstance(prompt, str):
        prompt = [prompt]
    elif isinstance(prompt, list) and prompt and all(is_int(t) for t in prompt):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise InputError("prompt must be a string, a list of strings, a list of token ids or a list of those")
    out = []
    for p in prompt:
        if isinstance(p, str):
            out.append(Prompt(model.tokenizer.encode(p, bos=True), p))
        elif isinstance(p, list) and p and all(is_int(t) for t in p):
            out.append(Prompt(model.check_ids(p).tolist()))
        else:
            raise InputError("prompt must be a string, a list of strings, a non-empty list of token ids or a "
                             "list of those")
    for p in out:
        if len(p.ids) > model.args.max_seq_len:
            raise InputError(f"the prompt is {len(p.ids)} tokens, longer than the context length "
                             f"{model.args.max_seq_len}")
    return out


def chat_prompt(model: Llama2, messages) -> Prompt:
    """A dialog in Meta's chat format (InputError if it does not fit the context with room for an answer)."""
    ids = dialog_tokens(model.tokenizer, messages)
    if len(ids) >= model.args.max_seq_len:
        raise InputError(f"the messages are {len(ids)} tokens in the chat format, leaving no room for an answer "
                         f"in the context length {model.args.max_seq_len}")
    return Prompt(ids)


# --- generation ----------------------------------------------------------------------------


class Engine:
    """The model's decode loop, fed from the server's engine thread (the only thread that touches the model).

    stats: the decoder's counts (forward passes, tokens), kept across engines (the worker makes a new
    engine after a crash).
    """

    def __init__(self, model: Llama2, stats: Stats | None = None):
        self.llama = model
        self.decoder = Decoder(model.model, progress=False, stats=stats)

    def request(self, prompt: Prompt, config: GenerationConfig, in_context: bool = True) -> Request:
        """A request for ``prompt``: text continuing the prompt's (completions), or on its own (chat)."""
        return new_request(self.llama.model, self.llama.tokenizer, prompt.ids, config, text_context=in_context,
                           text_out=True)

    def add(self, requests: list[Request]) -> None:
        """Start requests at the next step: each is prefilled, then decodes in the batch of running ones.

        No KV reuse across requests here: each prefill runs through its own cache, so a
        request joins the batch whatever else runs (scoring, ``score``, reuses the model's
        kept cache through ``Llama2.logits``).
        """
        self.decoder.add(requests)

    @property
    def running(self) -> bool:
        return bool(self.decoder.running)

    @property
    def stats(self) -> Stats:
        return self.decoder.stats

    def step(self) -> list[tuple[Request, str]]:
        """One forward for the running batch (and one per new request's prompt): (request, new text) per mover."""
        return self.decoder.step()


@dataclass
class Generated:
    """One finished generation: the new ids and text, and OpenAI's finish reason."""

    ids: list[int]
    text: str
    finish_reason: str

    @classmethod
    def of(cls, request: Request) -> "Generated":
        return cls(list(request.new_ids), request.text, FINISH_REASONS[request.finish_reason])


# --- log-probabilities -------------------------------------------------------------------


@dataclass
class Scores:
    """Log-probabilities of the tokens at positions ``first``.. of a sequence, and the top alternatives."""

    token_logprobs: list[float]  # log p(token i | tokens < i)
    top: list[list[tuple[int, float]]]  # per position, the n likeliest (id, log p), likeliest first


def score(model: Llama2, ids: Sequence[int], first: int, top_n: int) -> Scores:
    """Log-softmax of ``Llama2.logits(ids)``: for positions ``first`` .. len(ids) - 1 (first >= 1)."""
    logits = model.logits(list(ids))  # (seq, vocab); position i predicts token i + 1
    target = np.asarray(ids[first:], dtype=np.int64)
    token_lp, top = [], []
    for a in range(first - 1, len(ids) - 1, LOGSOFTMAX_ROWS):
        b = min(a + LOGSOFTMAX_ROWS, len(ids) - 1)
        lp = log_softmax(logits[a:b])  # (rows, vocab) float64
        token_lp += np.take_along_axis(lp, target[a - first + 1:b - first + 1, None], axis=-1)[:, 0].tolist()
        if top_n:
            best = np.argpartition(-lp, top_n - 1, axis=-1)[:, :top_n]  # (rows, top_n), unordered
            for row, cand in zip(lp, best):
                order = cand[np.argsort(-row[cand], kind="stable")]
                top.append([(int(t), float(row[t])) for t in order])
        else:
            top += [[] for _ in range(b - a)]
    return Scores(token_lp, top)


def check_top(n, what: str) -> int:
    if n is None:
        return 0
    if not is_int(n) or not 0 <= n <= MAX_TOP_LOGPROBS:
        raise InputError(f"{what} must be an integer from 0 to {MAX_TOP_LOGPROBS}, got {n!r}")
    return int(n)


# --- token text -------------------------------------------------------------------------


def token_text(model: Llama2, token: int) -> str:
    """A token as OpenAI names it: its text with sentencepiece's word-start mark as a space.

    Byte-fallback tokens: the character for ASCII, else ``bytes:\\xNN`` (OpenAI's form).
    """
    sp = model.tokenizer.sp
    piece = sp.IdToPiece(int(token))
    if sp.IsByte(int(token)):
        value = int(piece[3:5], 16)  # "<0xNN>"
        return chr(value) if value < 0x80 else f"bytes:\\x{value:02x}"
    return piece.replace("\u2581", " ")


def token_bytes(model: Llama2, token: int) -> list[int]:
    sp = model.tokenizer.sp
    if sp.IsByte(int(token)):
        return [int(sp.IdToPiece(int(token))[3:5], 16)]
    return list(token_text(model, token).encode("utf-8"))


def text_pieces(model: Llama2, ids: Sequence[int], context: Sequence[int] = ()) -> list[str]:
    """The text each of ``ids`` adds after ``context`` (joined: the decoded text; "" for a held-back byte)."""
    decoder = model.tokenizer.stream(context)
    pieces = [decoder.push(t) for t in ids]
    if pieces:
        pieces[-1] += decoder.flush()
    return pieces


def offsets(pieces: Sequence[str], start: int) -> list[int]:
    """Character offset of each piece in the text they make, counting from ``start``."""
    return (start + np.cumsum([0] + [len(p) for p in pieces[:-1]])).tolist() if pieces else []
