"""llama2np as an lm-evaluation-harness model named ``llama2np`` (``pip install llama2np[eval]``).

    python -m llama2np.lm_eval --model llama2np --model_args pretrained=weights/llama-2-7b,dtype=float64 \\
        --tasks hellaswag

(lm-eval finds models registered by an import, so ``python -m llama2np.lm_eval`` is lm-eval's own
command line with this module imported; in Python, ``import llama2np.lm_eval`` before
``lm_eval.simple_evaluate(model="llama2np", ...)``.)

Scoring runs on the engine directly. The requests that share a context (a task's
answer choices) form one group: the context goes through the model once, its
keys and values are copied to one KV-cache row per choice, and all the choices'
continuations then go through one batched forward pass, right-padded (causal
attention: padding after a token cannot change its logits). Log-likelihoods are
log-softmax of the logits in float64, the numbers ``Llama2.logits`` gives for the
whole sequence. Like Hugging Face's model in lm-eval, a context longer than the
context length keeps its last tokens; text is encoded with BOS first unless
``add_bos_token=False``.
"""

from __future__ import annotations

from typing import Iterable

import lm_eval.models  # noqa: F401  (lm-eval's own models first: it loads them only into an empty registry)
import numpy as np
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from .errors import InputError
from .generation.sampling import log_softmax
from .llama import Llama2


def _flag(value) -> bool:
    """A model_args flag: lm-eval passes them as strings ("True", "false") or bools."""
    if isinstance(value, str):
        if value.lower() not in ("true", "false", "1", "0"):
            raise InputError(f"expected True or False, got {value!r}")
        return value.lower() in ("true", "1")
    return bool(value)


@register_model("llama2np")
class Llama2npLM(TemplateLM):
    """``pretrained``: a checkpoint path (or pass ``model=`` an already loaded ``Llama2``)."""

    def __init__(self, pretrained: str | None = None, dtype: str = "float32", tokenizer: str | None = None,
                 max_seq_len: int | None = None, quantize: str | None = None, add_bos_token=True,
                 batch_size: int | str = 8, max_gen_toks: int | str = 256, model: Llama2 | None = None, **kwargs):
        super().__init__()
        if model is None:
            if pretrained is None:
                raise InputError("llama2np needs model_args pretrained=PATH (a checkpoint)")
            model = Llama2.from_pretrained(pretrained, dtype=dtype, tokenizer_path=tokenizer,
                                           max_seq_len=int(max_seq_len) if max_seq_len else None, quantize=quantize)
        self.llama = model
        self.add_bos_token = _flag(add_bos_token)
        self.batch_size = max(1, int(batch_size)) if str(batch_size).isdigit() else 8  # "auto": 8
        self.max_gen_toks = int(max_gen_toks)

    # --- what TemplateLM asks for -----------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.llama.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.llama.tokenizer.bos_id

    @property
    def max_length(self) -> int:
        return self.llama.args.max_seq_len

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        bos = self.add_bos_token if add_special_tokens is None else add_special_tokens
        return self.llama.tokenizer.encode(string, bos=bool(bos))

    def tok_decode(self, tokens) -> str:
        return self.llama.tokenizer.decode(tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), whether every continuation token is the argmax) per request."""
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        groups: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}
        for n, (_, context, continuation) in enumerate(requests):
            context, continuation = self._fit(list(context), list(continuation))
            groups.setdefault(tuple(context), []).append((n, continuation))
        for context, items in groups.items():
            for a in range(0, len(items), self.batch_size):
                batch = items[a:a + self.batch_size]
                for (n, _), result in zip(batch, self._score_group(list(context), [c for _, c in batch])):
                    out[n] = result
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts, in disjoint windows of the context length (as lm-eval's HF model)."""
        results = []
        for (text,) in [r.args for r in requests]:
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.tok_encode(text, add_special_tokens=False), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)]
            scores = self._loglikelihood_tokens([(None, ctx, cont) for ctx, cont in windows])
            total = sum(s for s, _ in scores)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            results.append(total)
        return results

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, with do_sample) continuations, stopped at ``until``; batched per gen_kwargs."""
        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for n, r in enumerate(requests):
            groups.setdefault(repr(sorted(r.args[1].items())), []).append(n)
        for members in groups.values():
            kw = dict(requests[members[0]].args[1])
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kw.get("max_gen_toks", self.max_gen_toks))
            sample = bool(kw.get("do_sample", False)) and float(kw.get("temperature", 1.0)) > 0
            temperature = float(kw.get("temperature", 1.0)) if sample else 0.0
            prompts = [self.tok_encode(requests[n].args[0])[-(self.max_length - max_new):] or
                       [self.prefix_token_id] for n in members]
            for a in range(0, len(prompts), self.batch_size):
                done = self.llama.generate(prompts[a:a + self.batch_size], max_new_tokens=max_new,
                                           temperature=temperature, top_p=float(kw.get("top_p", 1.0)),
                                           seed=kw.get("seed", 1234), stop=until or None, logprobs=True)
                for n, prompt, c in zip(members[a:], prompts[a:], done):
                    text = c.text if c.text is not None else _continuation_text(self.llama, prompt, c.ids)
                    out[n] = text
                    self.cache_hook.add_partial("generate_until", requests[n].args, text)
        return out

    # --- scoring ------------------------------------------------------------------------

    def _fit(self, context: list[int], continuation: list[int]) -> tuple[list[int], list[int]]:
        """Keep the last max_length + 1 tokens (the last one is never fed): (context part, continuation)."""
        if not continuation:
            raise InputError("a loglikelihood request needs a non-empty continuation")
        if len(continuation) > self.max_length:
            raise InputError(f"a continuation of {len(continuation)} tokens does not fit the context length "
                             f"{self.max_length}")
        whole = (context + continuation)[-(self.max_length + 1):]
        return whole[:len(whole) - len(continuation)], continuation

    def _score_group(self, context: list[int], continuations: list[list[int]]) -> Iterable[tuple[float, bool]]:
        """Score continuations of one context: the context once, then all continuations in one batch."""
        transformer = self.llama.model
        longest = max(len(c) for c in continuations)
        one = transformer.new_cache(1, len(context) + longest - 1)
        last = transformer.forward(np.asarray([context]), 0, one)[0, -1]  # (vocab,): predicts continuation[0]
        logits = [[last] for _ in continuations]  # per row, the logits predicting each continuation token
        if longest > 1:
            rows = len(continuations)
            cache = transformer.new_cache(rows, len(context) + longest - 1)
            cache.reserve(len(context))
            cache.k[:, :, :, :len(context)] = one.k[:, :1, :, :len(context)]  # the context's keys/values, per row
            cache.v[:, :, :, :len(context)] = one.v[:, :1, :, :len(context)]
            fed = np.zeros((rows, longest - 1), dtype=np.int64)  # (rows, longest - 1), right-padded with id 0
            for r, c in enumerate(continuations):
                fed[r, :len(c) - 1] = c[:-1]
            more = transformer.forward(fed, len(context), cache)  # (rows, longest - 1, vocab)
            for r, c in enumerate(continuations):
                logits[r] += list(more[r, :len(c) - 1])
        for c, rows in zip(continuations, logits):
            lp = log_softmax(np.stack(rows))  # (len(c), vocab), float64
            ids = np.asarray(c)
            yield float(lp[np.arange(len(c)), ids].sum()), bool((lp.argmax(axis=-1) == ids).all())


def _continuation_text(model: Llama2, prompt: list[int], new_ids: list[int]) -> str:
    decoder = model.tokenizer.stream(prompt)
    return "".join(decoder.push(t) for t in new_ids) + decoder.flush()


def main() -> None:
    """lm-eval's command line, with the ``llama2np`` model registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
