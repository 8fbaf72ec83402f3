"""Where the server meets the engine: a checked request in, ``Llama2`` calls, tokens and log-probabilities out.

This is the only module of the server that calls the model. A request's options
become an ``Options`` (checked before the request is queued, so a bad one is
answered at once), its prompt becomes token ids, and ``generate`` runs one
sequence through ``Llama2``'s generation, yielding the text as it is made.

Log-probabilities are those OpenAI defines: log-softmax of the model's logits
at temperature 1, whatever the sampling options, i.e. of exactly what
``Llama2.logits`` returns for the sequence (computed in float64). The text each
token adds comes from the tokenizer's stream decoder, so the pieces join into
the returned text and ``text_offset`` points into it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np

from ..checks import is_int
from ..errors import ContextLengthWarning, InputError
from ..generation.chat import dialog_tokens
from ..generation.sampling import check_processors, check_sampling, log_softmax, make_rngs
from ..llama import Llama2

MAX_TOP_LOGPROBS = 20  # alternatives per position a request may ask for (OpenAI's chat limit)
LOGSOFTMAX_ROWS = 256  # positions widened to float64 at a time (bounds the temporary to 256 x vocab)

# the engine's reasons -> OpenAI's: the end-of-sequence token and a stop string both "stop"
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length", "context": "length"}


@dataclass(frozen=True)
class Options:
    """One request's generation options, in the engine's terms (OpenAI's defaults are the caller's)."""

    max_tokens: int | None  # None: up to the context length
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: Mapping[int, float] | None = field(default=None, compare=False)
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def check(self, vocab_size: int) -> None:
        """InputError naming the first bad option (the engine's own checks and messages)."""
        if self.max_tokens is not None and (not is_int(self.max_tokens) or self.max_tokens < 0):
            raise InputError(f"max_tokens must be an integer >= 0, got {self.max_tokens!r}")
        check_sampling(self.temperature, self.top_p, self.top_k)
        check_processors(self.min_p, self.repetition_penalty, self.frequency_penalty, self.presence_penalty,
                         self.logit_bias, vocab_size)
        make_rngs(self.seed, 1)  # checks the seed
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise InputError(f"stop must be a non-empty string or a list of them, got {list(self.stop)!r}")

    def max_new_tokens(self, prompt_len: int, context_len: int) -> int:
        room = max(0, context_len - prompt_len)
        return room if self.max_tokens is None else min(self.max_tokens, room)


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


@dataclass
class Generated:
    """One finished generation: the new ids and text, and OpenAI's finish reason."""

    ids: list[int]
    text: str
    finish_reason: str
    stopped: bool = False  # cut short because the client went away


def generate(model: Llama2, prompt: Prompt, options: Options, seed: int | None, in_context: bool = True,
             cancelled: Callable[[], bool] = lambda: False) -> Iterator[str]:
    """Generate after ``prompt``, yielding text pieces; the generator's return value is a ``Generated``.

    in_context: the text continues the prompt's (completions); False decodes the answer on
    its own (chat). ``cancelled`` is polled between steps and ends the generation early.
    """
    n_new = options.max_new_tokens(len(prompt.ids), model.args.max_seq_len)
    with warnings.catch_warnings():  # reaching the context length is finish_reason "length", not a warning
        warnings.simplefilter("ignore", ContextLengthWarning)
        stream = model._generate(prompt.ids, max_new_tokens=n_new, temperature=options.temperature,
                                 top_p=options.top_p, top_k=options.top_k, seed=seed, stop=list(options.stop),
                                 logprobs=True, stream=True, text_context=in_context, text_out=True,
                                 min_p=options.min_p, repetition_penalty=options.repetition_penalty,
                                 frequency_penalty=options.frequency_penalty,
                                 presence_penalty=options.presence_penalty, logit_bias=options.logit_bias)
        pieces = []
        for piece in stream:
            pieces.append(piece)
            yield piece
            if cancelled():
                return Generated([], "".join(pieces), "stop", stopped=True)
    done = stream.completion
    return Generated(list(done.ids), done.text, FINISH_REASONS[done.finish_reason])


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
