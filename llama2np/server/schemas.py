"""The request bodies the server accepts: OpenAI's field names and JSON types, plus llama2np's extra samplers.

Types are strict (no "5" for 5, no true for 1); the values themselves are
checked by the engine (its ``GenerationConfig``), whose messages the client
gets. Fields OpenAI defines that a request may send and that change nothing
here (``user``, ``stream_options`` without usage...) are accepted; ones that
would change the answer and are not implemented (``n`` > 1, ``best_of`` > 1,
``suffix``) are refused.
"""

from __future__ import annotations

from typing import Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

from ..errors import InputError
from ..generation.config import GenerationConfig
from .engine import generation_config, logit_bias_ids

Number = Union[StrictInt, StrictFloat]
Stop = Union[StrictStr, list[StrictStr], None]

MAX_STOP = 16  # stop strings per request (OpenAI allows 4)
MAX_PROMPTS = 64  # prompts in one completions request


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: StrictStr | None = None
    max_tokens: StrictInt | None = None
    temperature: Number = 1.0
    top_p: Number = 1.0
    seed: StrictInt | None = None
    stop: Stop = None
    logit_bias: dict[str, Number] | None = None
    presence_penalty: Number = 0.0
    frequency_penalty: Number = 0.0
    stream: StrictBool = False
    stream_options: dict | None = None
    n: StrictInt = 1
    # llama2np's other samplers, as extra fields (as vLLM and llama.cpp's server name them)
    top_k: StrictInt | None = None
    min_p: Number = 0.0
    repetition_penalty: Number = 1.0

    def config(self, vocab_size: int) -> GenerationConfig:
        """The engine's checked options (max_tokens None: up to the context length, per prompt)."""
        if self.n != 1:
            raise InputError(f"n must be 1 (one choice per prompt), got {self.n}")
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stop) > MAX_STOP:
            raise InputError(f"stop takes at most {MAX_STOP} strings, got {len(stop)}")
        return generation_config(self.max_tokens, self.temperature, self.top_p, self.top_k, self.min_p,
                                 self.repetition_penalty, self.frequency_penalty, self.presence_penalty,
                                 logit_bias_ids(self.logit_bias), self.seed, stop, vocab_size)

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(_Request):
    prompt: Union[StrictStr, list[StrictStr], list[StrictInt], list[list[StrictInt]]] = Field(max_length=2**20)
    max_tokens: StrictInt | None = 16  # OpenAI's default
    echo: StrictBool = False
    logprobs: StrictInt | None = None
    best_of: StrictInt | None = None
    suffix: StrictStr | None = None

    def check_unsupported(self) -> None:
        if self.best_of not in (None, 1):
            raise InputError(f"best_of must be 1, got {self.best_of}")
        if self.suffix:
            raise InputError("suffix is not supported")
        if isinstance(self.prompt, list) and len(self.prompt) > MAX_PROMPTS and not isinstance(self.prompt[0], int):
            raise InputError(f"a request takes at most {MAX_PROMPTS} prompts, got {len(self.prompt)}")


class Message(BaseModel):
    role: StrictStr
    content: StrictStr


class ChatRequest(_Request):
    messages: list[Message] = Field(max_length=4096)
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = None


class TokenizeRequest(BaseModel):
    prompt: StrictStr
    add_special_tokens: StrictBool = True


class DetokenizeRequest(BaseModel):
    tokens: list[StrictInt]


