"""``Llama2``: the user-facing model. Load a checkpoint, then ask it for logits or text."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from .errors import InputError, TokenizerError
from .generation import chat as _chat
from .generation import infill as _infill
from .generation.config import GenerationConfig
from .generation.generate import generate as _generate
from .generation.prefix_cache import PrefixCache
from .generation.request import Stats
from .loaders import load_checkpoint
from .loaders.readahead import read_ahead
from .model.args import ModelArgs
from .model.storage import resolve_compute_dtype
from .model.transformer import Transformer
from .progress import layer_callback
from .token_ids import check_token_ids
from .tokenizer import Tokenizer
from .tools import compare as _compare
from .tools import perplexity as _perplexity
from .tools import trace as _trace
from .tools import trace_compare as _trace_compare


class _Unset:
    """The default of an option not given: the ``GenerationConfig``'s (or ``config=``'s) value stands."""

    def __repr__(self) -> str:
        return "<GenerationConfig's>"


UNSET = _Unset()


class Llama2:
    """A loaded Llama 2 model plus (when one was found) its tokenizer.

    >>> model = Llama2.from_pretrained("weights/llama-2-7b")
    >>> model.logits([1, 450, 4996]).shape
    (3, 32000)
    """

    def __init__(self, model: Transformer, tokenizer: Tokenizer | None = None,
                 tokenizer_candidates: Sequence[Path] = (), source: Path | None = None,
                 progress: bool | None = None):
        self.model = model
        self._tokenizer = tokenizer
        self.tokenizer_candidates = list(tokenizer_candidates)  # where a tokenizer was looked for
        self.source = source
        self.progress = progress  # bars on long forwards and perplexity: None = on a terminal or in a notebook
        self._prefix: PrefixCache | None = None  # KV cache of the last single-row sequence (KV reuse)
        self._drafts: dict[str, Llama2] = {}  # draft models loaded from a path, by path
        self.last_stats: Stats | None = None  # counts and timings of the last generate / chat call

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: str = "float32", tokenizer_path: str | Path | None = None,
                        max_seq_len: int | None = None, progress: bool | None = None,
                        quantize: str | None = None, tensor_parallel: int | None = None,
                        ray_address: str | None = None, ray_timeout: float | None = None) -> "Llama2":
        """Load a checkpoint directory or file; its layout is detected from what is on disk.

        dtype: "float32" (default) or "float64" (reference-grade logits).
        tokenizer_path: a ``tokenizer.model``; by default looked for beside the checkpoint.
        max_seq_len: context length to allocate (default: the model's own).
        progress: progress bars while loading, on long forward passes and perplexity runs
            (default None: on a terminal or in a Jupyter notebook, never in logs or pipes).
        quantize: None, or "int8" for weight-only int8 with per-row scales (quantised tensor by
            tensor while loading: a quarter of float32's memory, half of bf16's).
        tensor_parallel: run the layers on this many Ray actors, each holding 1/N of every layer
            (``pip install llama2np[distributed]``; see README "70B on several machines").
        ray_address: the Ray cluster to join ("HOST:6379", or "auto": the one ``ray start`` made on this
            machine); default: the one this process already joined, else Ray's own choice ($RAY_ADDRESS,
            else a cluster ``ray start`` made on this machine, else a new local one).
        ray_timeout: seconds an actor may take to answer before ``DistributedError`` (default 120).
        """
        _check_from_pretrained_args(path, tokenizer_path, progress)
        compute = resolve_compute_dtype(dtype)
        if tensor_parallel is not None:
            from .distributed.transformer import DEFAULT_TIMEOUT, load_distributed

            ckpt, model = load_distributed(path, tensor_parallel, compute, quantize, max_seq_len, progress,
                                           ray_address, ray_timeout or DEFAULT_TIMEOUT)
        else:
            ckpt = load_checkpoint(path, max_seq_len=max_seq_len, progress=progress)
            model = Transformer(ckpt.args, ckpt.state, compute, quantize=quantize)
            read_ahead((p for lin in model.linears() for p in lin.parts), progress)
        candidates = [Path(tokenizer_path)] if tokenizer_path is not None else ckpt.tokenizer_candidates
        tokenizer = None
        if tokenizer_path is not None or any(p.is_file() for p in candidates):
            tokenizer = Tokenizer(next((p for p in candidates if p.is_file()), candidates[0]))
        elif ckpt.embedded_tokenizer is not None and (proto := ckpt.embedded_tokenizer()) is not None:
            tokenizer = Tokenizer(ckpt.source, serialized=proto)  # a GGUF's own vocabulary
        if tokenizer is not None:
            if tokenizer.vocab_size != ckpt.args.vocab_size:
                raise TokenizerError(f"{tokenizer.path}: tokenizer has {tokenizer.vocab_size} pieces but the "
                                     f"model at {ckpt.source} has vocab_size {ckpt.args.vocab_size}")
        return cls(model, tokenizer, candidates, ckpt.source, progress)

    @property
    def args(self) -> ModelArgs:
        return self.model.args

    @property
    def has_tokenizer(self) -> bool:
        return self._tokenizer is not None

    @property
    def tokenizer(self) -> Tokenizer:
        """The tokenizer; raises TokenizerError naming where it was looked for when there is none."""
        if self._tokenizer is None:
            where = ", ".join(str(p) for p in self.tokenizer_candidates) or "nowhere"
            raise TokenizerError(f"no tokenizer for this model (looked for {where}); pass tokenizer_path= to "
                                 "from_pretrained, or use token ids")
        return self._tokenizer

    def logits(self, tokens: Sequence[int] | np.ndarray, reuse_cache: bool = True) -> np.ndarray:
        """Next-token logits at every position: ids (seq,) -> (seq, vocab), or (batch, seq) -> (batch, seq, vocab).

        A causal forward pass from position 0. For one sequence, the positions it shares
        with the previous call's sequence are not recomputed (see ``clear_cache``);
        reuse_cache=False computes everything afresh and keeps nothing.
        """
        ids = self.check_ids(tokens)
        if ids.ndim == 1 and reuse_cache:
            return self._kept_cache().all_logits(ids.tolist(), self.progress)[1]
        on_layer = layer_callback(self.args.n_layers, ids.size, self.progress)
        out = self.model.forward(ids if ids.ndim == 2 else ids[None], on_layer=on_layer)
        return out if ids.ndim == 2 else out[0]

    def _kept_cache(self) -> PrefixCache:
        if self._prefix is None:
            self._prefix = PrefixCache(self.model)
        return self._prefix

    def clear_cache(self) -> None:
        """Free the KV cache kept from the last call (and the draft models loaded by path)."""
        self._prefix = None
        self._drafts.clear()

    def _draft(self, draft_model) -> "Llama2 | None":
        if draft_model is None or isinstance(draft_model, Llama2):
            return draft_model
        if not isinstance(draft_model, (str, Path)):
            raise InputError(f"draft_model must be a Llama2 or a checkpoint path, got {type(draft_model).__name__}")
        key = str(Path(draft_model).resolve())
        if key not in self._drafts:
            self._drafts[key] = Llama2.from_pretrained(draft_model, dtype=str(self.model.dtype))
        return self._drafts[key]

    def generate(self, prompt, max_new_tokens: int = UNSET, temperature: float = UNSET, top_p: float = UNSET,
                 top_k: int | None = UNSET, seed=UNSET, stop: str | Sequence[str] | None = UNSET, echo: bool = UNSET,
                 logprobs: bool = UNSET, stream: bool = False, *, min_p: float = UNSET,
                 repetition_penalty: float = UNSET, frequency_penalty: float = UNSET, presence_penalty: float = UNSET,
                 logit_bias: Mapping[int, float] | None = UNSET, prompt_lookup: int | None = UNSET,
                 draft_model: "Llama2 | str | Path | None" = None, num_draft: int | None = UNSET,
                 reuse_cache: bool = True, config: GenerationConfig | None = None):
        """Continue a prompt.

        prompt: a str -> the new text (what follows the prompt); a list of token ids
        -> the new ids (EOS not included; [] starts from BOS); a list of either -> a batch,
        one result per prompt, each the same as generating it alone (prompt i samples with
        seed + i, or pass a list of seeds).
        The options are the fields of ``GenerationConfig`` (defaults there: max_new_tokens 256,
        temperature 0.6, top_p 0.9); pass them as keywords, or a whole ``config=``, whose
        fields the keywords given override.
        temperature=0 is greedy; otherwise top_k and then top_p (Meta's nucleus) filter the
        softmax(logits / temperature) before one token is drawn with numpy.random.default_rng(seed).
        Stops at EOS, after max_new_tokens, at any of the ``stop`` strings (not included in the
        text) or at the context length (with a ContextLengthWarning).
        echo: prefix the prompt. logprobs: return ``Completion`` objects (ids, text, logprobs of
        the new tokens, finish_reason) instead. stream: return a ``GenerationStream`` iterator
        of text pieces (ids for an id prompt); its ``completion`` and ``stats`` fill in at the end.
        Other calls on this model may run between its pieces (see docs/generation.md).
        Logits processors, applied before temperature in Hugging Face's order: logit_bias
        ({token id: added logit}, -inf bans), repetition_penalty (HF/CTRL: > 1 discourages every
        token of prompt + output), frequency_penalty and presence_penalty (OpenAI's, over the new
        tokens). min_p (after top_p) drops tokens less likely than min_p times the likeliest.
        Speculative decoding (same output distribution; greedy output token-identical):
        prompt_lookup=N drafts by copying what followed the latest earlier occurrence of the
        last n <= N tokens; draft_model (a Llama2 sharing the vocabulary, or its path) drafts
        with a smaller model; num_draft tokens per step (default 3); the model checks
        a whole draft in one forward pass. Each row of a batch then decodes on its own.
        reuse_cache: a single prompt reuses the kept KV cache of the previous call for the
        tokens they share, and leaves its own behind (False: fresh cache, nothing kept).
        ``last_stats`` holds the call's counts: forward passes, drafted / accepted tokens.
        """
        options = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                       seed=seed, stop=stop, echo=echo, logprobs=logprobs, min_p=min_p,
                       repetition_penalty=repetition_penalty, frequency_penalty=frequency_penalty,
                       presence_penalty=presence_penalty, logit_bias=logit_bias, prompt_lookup=prompt_lookup,
                       num_draft=num_draft)
        return self._generate(prompt, _config(config, options), stream, draft_model, reuse_cache)

    def _generate(self, prompt, config: GenerationConfig, stream, draft_model, reuse_cache, **chat):
        """generation.generate with this model's kept KV caches, draft model, progress and stats."""
        if not isinstance(reuse_cache, bool):
            raise InputError(f"reuse_cache must be True or False, got {reuse_cache!r}")
        if not isinstance(stream, bool):
            raise InputError(f"stream must be True or False, got {stream!r}")
        draft = self._draft(draft_model)
        self.last_stats = Stats()
        return _generate(self.model, self._tokenizer, prompt, config, stream=stream,
                         draft_model=draft and draft.model, prefix=self._kept_cache() if reuse_cache else None,
                         draft_prefix=draft._kept_cache() if draft and reuse_cache else None,
                         stats=self.last_stats, progress=self.progress, **chat)

    def chat(self, messages, max_new_tokens: int = UNSET, temperature: float = UNSET, top_p: float = UNSET,
             top_k: int | None = UNSET, seed=UNSET, stop: str | Sequence[str] | None = UNSET, stream: bool = False,
             *, draft_model: "Llama2 | str | Path | None" = None, reuse_cache: bool = True,
             config: GenerationConfig | None = None, **options):
        """The assistant's answer to a dialog in Meta's chat format.

        messages: [{"role": "system" | "user" | "assistant", "content": str}, ...], an optional
        system message first, then user and assistant alternating, ending with user.
        Returns the answer text, or with stream=True an iterator of its pieces. The dialog's
        earlier turns come from the kept KV cache (only the new turn is prefilled).
        options: the other ``GenerationConfig`` fields (penalties, min_p, logit_bias,
        prompt_lookup, num_draft), as for ``generate``; or a whole ``config=``.
        """
        ids = _chat.dialog_tokens(self.tokenizer, messages)
        options |= dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                        seed=seed, stop=stop)
        return self._generate(ids, _config(config, options), stream, draft_model, reuse_cache,
                              text_context=False, text_out=True)

    def infill(self, prefix: str, suffix: str, max_new_tokens: int = UNSET, temperature: float = UNSET,
               top_p: float = UNSET, top_k: int | None = UNSET, seed=UNSET, suffix_first: bool = False, *,
               draft_model: "Llama2 | str | Path | None" = None, reuse_cache: bool = True,
               config: GenerationConfig | None = None, **options) -> str:
        """CodeLlama's fill-in-the-middle: the text that goes between ``prefix`` and ``suffix``.

        The prompt is Meta's codellama ``infilling_prompt_tokens`` (BOS <PRE> prefix <SUF> suffix <MID>;
        suffix_first=True: BOS <PRE> <SUF> suffix <MID> prefix); the middle ends at <EOT>. A model whose
        vocabulary has no infilling tokens is an InputError. options: as for ``generate``.
        """
        ids = _infill.infilling_prompt(self.tokenizer, prefix, suffix, suffix_first)
        options |= dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
        config = _config(config, options)
        if config.echo:
            raise InputError("infill returns the middle only: echo=True is for generate")
        eot = _infill.infill_tokens(self.tokenizer).end
        done = self._generate(ids, config, False, draft_model, reuse_cache, eos=eot)
        return _infill.decode_infilling(self.tokenizer, done.ids if config.logprobs else done)

    def perplexity(self, text: str, window: int | None = None, stride: int | None = None) -> float:
        """exp(mean negative log-likelihood) of ``text`` (BOS prepended), windowed over the context length."""
        if not isinstance(text, str):
            raise InputError(f"perplexity takes a str, got {type(text).__name__}")
        return _perplexity.perplexity(self.model, self.tokenizer.encode(text), window, stride,
                                      self.progress).perplexity

    def compare(self, others, tokens: Sequence[int] | None = None, text: str | None = None,
                window: int | None = None, stride: int | None = None):
        """How far other logits are from this model's (the reference; load it with dtype="float64").

        others: another ``Llama2`` (e.g. a GGUF quantization, or quantize="int8"), the path of an
        ``.npz`` of another engine's ``ids`` (n,) and ``logits`` (n, vocab), or a dict label -> either.
        The ids: ``tokens``, else ``text`` (encoded with BOS), else the .npz's ids. Returns a
        ``compare.Comparison`` (a dict label -> Comparison for a dict): per-position arrays and a
        ``summary`` dict (max |dlogit|, mean/p50/p90/p99/max KL(ref || other), top-1 agreement %,
        perplexity of each side). ``window``/``stride`` read long texts in windows like perplexity.
        """
        single = not isinstance(others, dict)
        items = {self._label(others): others} if single else dict(others)
        if tokens is None and text is not None:
            if not isinstance(text, str):
                raise InputError(f"text must be a str, got {type(text).__name__}")
            tokens = self.tokenizer.encode(text)
        sides: dict = {}
        for label, other in items.items():
            if isinstance(other, Llama2):
                sides[label] = other.model
                continue
            if not isinstance(other, (str, Path)):
                raise InputError(f"{label}: compare takes a Llama2 or the path of an .npz, got {type(other).__name__}")
            npz_ids, logits = _compare.read_logits_npz(other, self.args.vocab_size)
            if tokens is None:
                tokens = npz_ids
            elif not np.array_equal(np.asarray(tokens), npz_ids):
                raise InputError(f"{other}: its ids differ from the ids being compared")
            sides[label] = logits
        if tokens is None:
            raise InputError("compare needs token ids: pass tokens=, text=, or an .npz that holds ids")
        results = _compare.compare(self.model, tokens, sides, window, stride)
        return next(iter(results.values())) if single else results

    def trace(self, tokens: Sequence[int] | np.ndarray, out: str | Path | None = None, steps: str = "hidden",
              dtype: str | None = None):
        """Reference activations of one forward pass over ``tokens`` (ids, BOS first), layer by layer.

        Returns a dict of arrays, or with ``out`` writes them to that ``.npz`` (streamed: memory holds
        one layer's arrays) and returns its path. ``ids``, ``hidden_states`` (n_layers + 1, n, dim) as
        Hugging Face's ``output_hidden_states``, ``final_layer_output`` (n, dim, before the final norm),
        ``logits``; steps="all" adds every layer's ``layers.{i}.attention_norm``, ``q``, ``k`` (after
        RoPE, Meta's interleaved layout), ``v``, ``attention``, ``ffn_norm``, ``feed_forward``.
        dtype: of the arrays written (default: the compute dtype). See docs/trace.md.
        """
        ids = self.check_ids(tokens)
        if ids.ndim != 1:
            raise InputError(f"trace takes one sequence of token ids, got shape {ids.shape}")
        _trace.check_steps(steps)
        _trace.check_dtype(self.model, dtype)
        if out is None:
            return _trace.trace_arrays(self.model, ids, steps, dtype, self.progress)
        if not isinstance(out, (str, os.PathLike)):
            raise InputError(f"out must be a path, got {type(out).__name__}")
        from .cli.io import write_atomically

        out = Path(out)
        write_atomically(out, "out", lambda f: _trace.write_trace(self.model, ids, f, steps, dtype,
                                                                  self.progress))
        return out

    def compare_trace(self, other, reference=None, threshold: float = _trace_compare.THRESHOLD):
        """Where another engine's trace departs from the reference, layer by layer.

        other: an ``.npz`` trace (see ``trace``) or a dict of its arrays; reference: another trace,
        by default this model's trace of other's ids, computed now (with every step when other has
        steps). Returns a ``TraceComparison``: per array max |d|, NMSE, cosine (``rows``), the first
        layer whose output's NMSE exceeds ``threshold`` (``first_layer_over``, "layers.{i}") and its
        first step over; ``format()`` is the table ``compare --trace`` prints, ``to_dict()`` its JSON.
        """
        _trace_compare.check_threshold(threshold)
        if reference is not None:
            return _trace_compare.compare_traces(reference, other, threshold)
        trace, label = _trace_compare.as_trace(other, default="other")
        if "ids" not in trace:
            raise InputError(f"{label}: missing array ids (the tokens the trace is of)")
        try:
            ids = self.check_ids(trace["ids"])
        except InputError as e:
            raise InputError(f"{label}: array ids: {e}") from None
        steps = "all" if any(_trace.LAYER_ARRAY.fullmatch(name) for name in trace) else "hidden"
        with tempfile.TemporaryDirectory(prefix="llama2np-trace-") as tmp:
            path = Path(tmp) / "reference.npz"
            with open(path, "wb") as f:
                _trace.write_trace(self.model, ids, f, steps, progress=self.progress)
            return _trace_compare.compare_traces(path, trace, threshold, f"{self.source} ({self.model.dtype})",
                                                 label)

    @staticmethod
    def _label(other) -> str:
        if isinstance(other, Llama2):
            return f"{other.source} ({other.model.dtype})"
        return str(other)

    def check_ids(self, tokens) -> np.ndarray:
        """Token ids as an int64 array, checked against the vocabulary and the context length."""
        try:
            ids = np.asarray(tokens)
        except ValueError:
            raise InputError("token ids must be a flat list of ints or a rectangular (batch, seq) array") from None
        if ids.ndim not in (1, 2) or ids.shape[-1] == 0:
            raise InputError(f"expected a non-empty list of token ids, got shape {ids.shape}")
        if not np.issubdtype(ids.dtype, np.integer):  # e.g. floats, strs, or ints too big for int64 (object)
            odd = next((t for t in ids.ravel().tolist() if not isinstance(t, int) or isinstance(t, bool)), None)
            if odd is not None:
                raise InputError(f"token ids must be integers, got {type(odd).__name__} {odd!r}")
            bad = next(t for t in ids.ravel().tolist() if not 0 <= t < self.args.vocab_size)
            raise InputError(f"token id {bad} is outside the vocabulary [0, {self.args.vocab_size})")
        if not isinstance(tokens, np.ndarray):  # NumPy reads True as 1: check the caller's own items
            for row in ([tokens] if ids.ndim == 1 else tokens):
                check_token_ids(row, self.args.vocab_size)
        bad = ids[(ids < 0) | (ids >= self.args.vocab_size)]
        if bad.size:
            raise InputError(f"token id {int(bad[0])} is outside the vocabulary [0, {self.args.vocab_size})")
        if ids.shape[-1] > self.args.max_seq_len:
            raise InputError(f"{ids.shape[-1]} tokens exceed the context length {self.args.max_seq_len}")
        return ids.astype(np.int64)


def _check_from_pretrained_args(path, tokenizer_path, progress) -> None:
    """InputError naming the first from_pretrained argument of the wrong type."""
    for name, value in (("path", path), ("tokenizer_path", tokenizer_path)):
        if not isinstance(value, (str, os.PathLike)) and not (name == "tokenizer_path" and value is None):
            raise InputError(f"{name} must be a str or os.PathLike, got {type(value).__name__} {value!r}")
    if progress is not None and not isinstance(progress, bool):
        raise InputError(f"progress must be True, False or None (automatic), got {progress!r}")


def _config(config: GenerationConfig | None, options: dict) -> GenerationConfig:
    """``config`` (default: GenerationConfig()) with the options that were given; checked once."""
    if config is not None and not isinstance(config, GenerationConfig):
        raise InputError(f"config must be a GenerationConfig, got {type(config).__name__}")
    given = {k: v for k, v in options.items() if v is not UNSET}
    if config is None:
        unknown = sorted(set(given) - set(GenerationConfig.__dataclass_fields__))
        if unknown:
            return GenerationConfig().replace(**given)  # InputError naming the unknown option
        return GenerationConfig(**given)
    return config.replace(**given) if given else config
