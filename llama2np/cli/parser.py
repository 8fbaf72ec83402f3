"""The command line's flags: one argparse sub-parser per command (``llama2np.cli`` runs them).

``--help`` of each command lists these; the README's command-line table lists them too
(``tests/test_readme.py`` checks that it does).
"""

from __future__ import annotations

import argparse

PROG = "llama2np"


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit status 2)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive_int(text: str) -> int:
    """argparse type: an int >= 1 (the error names the flag)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _model_options(p: argparse.ArgumentParser, dtype: str = "float32") -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", metavar="PATH",
                   help="checkpoint: a Meta directory (params.json + consolidated.*.pth), a Hugging Face directory, "
                        "a llama2.c .bin or a llama.cpp .gguf (default: the one under weights/, else the demo model "
                        "weights/demo)")
    g.add_argument("--tokenizer", metavar="PATH", help="tokenizer.model (default: found beside the checkpoint)")
    g.add_argument("--dtype", default=dtype, choices=["float32", "float64"],
                   help=f"compute precision (default: {dtype})")
    g.add_argument("--max-seq-len", type=_positive_int, metavar="N", help="context length to use (default: the model's)")
    g.add_argument("--quantize", choices=["int8"], help="weight-only int8 (per-row scales), quantised "
                   "while loading: half of bf16's memory, a quarter of float32's")
    g = p.add_argument_group("tensor parallelism (pip install llama2np[distributed])")
    g.add_argument("--tensor-parallel", type=int, metavar="N",
                   help="run every layer split over N Ray actors (one per machine when the cluster has N)")
    g.add_argument("--ray-address", metavar="ADDR", help='Ray cluster to join, e.g. "auto" for the one '
                   "`ray start` made on this machine (default: $RAY_ADDRESS, else that one if any, else a new "
                   "local one)")


def _sampling_options(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=int, default=max_new_tokens, metavar="N",
                   help=f"stop after N new tokens (default: {max_new_tokens})")
    g.add_argument("--temperature", type=float, default=0.6, metavar="T", help="0 = greedy (default: 0.6)")
    g.add_argument("--top-p", type=float, default=0.9, metavar="P", help="nucleus sampling mass, in (0, 1] "
                                                                         "(default: 0.9)")
    g.add_argument("--top-k", type=int, default=None, metavar="K", help="sample among the K likeliest (default: off)")
    g.add_argument("--seed", type=int, default=None, metavar="S", help="random seed, for repeatable sampling")
    g.add_argument("--min-p", type=float, default=0.0, metavar="P",
                   help="drop tokens less likely than P times the likeliest, after top-p (default: 0, off)")
    g.add_argument("--repetition-penalty", type=float, default=1.0, metavar="R",
                   help="divide (multiply if negative) the logits of tokens already in prompt + output by R, "
                        "as Hugging Face does (default: 1, off)")
    g.add_argument("--frequency-penalty", type=float, default=0.0, metavar="F",
                   help="OpenAI's: subtract F x (times a token was generated) from its logit (default: 0)")
    g.add_argument("--presence-penalty", type=float, default=0.0, metavar="F",
                   help="OpenAI's: subtract F from the logit of every token generated so far (default: 0)")
    g.add_argument("--logit-bias", action="append", metavar="ID=BIAS",
                   help="add BIAS to token ID's logit; -inf bans it (repeatable)")
    g = p.add_argument_group("speculative decoding (same output distribution, fewer forward passes)")
    g.add_argument("--prompt-lookup", type=int, metavar="N",
                   help="draft by copying what followed the latest earlier occurrence of the last n <= N tokens")
    g.add_argument("--draft-model", metavar="PATH", help="draft with this smaller checkpoint (same vocabulary)")
    g.add_argument("--num-draft", type=int, metavar="K",
                   help="tokens drafted per forward pass (default: 3)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Llama 2 inference in pure NumPy: generate text, chat, score text, "
                                            "dump logits.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("generate", help="continue a prompt, streaming the text",
                       description="Continue a prompt, printing text as it is generated; prompt and generation "
                                   "speed go to stderr at the end.")
    p.add_argument("--prompt", default="", metavar="TEXT", help='text to continue (default: "", start from BOS)')
    p.add_argument("--stop", action="append", metavar="TEXT", help="stop when this text appears (repeatable)")
    p.add_argument("--suffix", metavar="TEXT", help="fill in the middle (CodeLlama): write what goes between the "
                   "prompt and TEXT, until <EOT>; prints prompt, middle and suffix")
    _model_options(p)
    _sampling_options(p, 256)
    p.set_defaults(run="generate")

    p = sub.add_parser("chat", help="interactive chat in Meta's Llama 2 chat format",
                       description="Chat with a Llama 2 chat model in the terminal ([INST] format). "
                                   "Type a message, Enter to send; Ctrl-D ends the chat.")
    p.add_argument("--system", metavar="TEXT", help="system prompt (<<SYS>> block of the first turn)")
    _model_options(p)
    _sampling_options(p, 512)
    p.set_defaults(run="chat")

    p = sub.add_parser("perplexity", help="perplexity of a text file",
                       description="Perplexity of a UTF-8 text file (BOS prepended), read in sliding windows "
                                   "of the context length.")
    p.add_argument("--file", required=True, metavar="TEXT", help="the text file to score")
    p.add_argument("--window", type=_positive_int, metavar="N", help="tokens per window (default: the context length)")
    p.add_argument("--stride", type=_positive_int, metavar="N", help="tokens between window starts (default: window / 2)")
    _model_options(p)
    p.set_defaults(run="perplexity")

    p = sub.add_parser("logits", help="dump next-token logits to .npy / .npz",
                       description="Write the logits of every position, (seq, vocab), for golden tests of other "
                                   "engines (--dtype float64 for reference-grade ones). .npz also stores the ids; "
                                   "--prompts writes many prompts into one .npz.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", metavar="TEXT", help="text, tokenized with BOS")
    src.add_argument("--ids", metavar='"1 2 3"', help="token ids, space separated")
    src.add_argument("--prompts", metavar="FILE.jsonl", help='many prompts, one JSON per line: "text", '
                     '{"text": ...}, {"ids": [...]} or [ids]; writes one .npz with ids, offsets, logits and '
                     "logprobs, streamed to disk")
    p.add_argument("--out", required=True, metavar="FILE", help="output file, .npy or .npz")
    _model_options(p)
    p.set_defaults(run="logits")

    p = sub.add_parser("trace", help="reference activations layer by layer, to an .npz",
                       description="Write one forward pass's activations: ids, hidden_states (n_layers + 1, n, "
                                   "dim) as Hugging Face's output_hidden_states, final_layer_output, logits; "
                                   "--steps all adds every layer's attention_norm, q, k, v, attention, ffn_norm, "
                                   "feed_forward (see docs/trace.md). Compare another engine's with compare --trace.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", metavar="TEXT", help="text, tokenized with BOS")
    src.add_argument("--ids", metavar='"1 2 3"', help="token ids, space separated")
    p.add_argument("--out", required=True, metavar="FILE.npz", help="the trace to write")
    p.add_argument("--steps", choices=["hidden", "all"], default="hidden",
                   help="hidden: the residual stream only (default); all: every step of every layer")
    _model_options(p)
    p.set_defaults(run="trace")

    p = sub.add_parser("compare", help="how far other logits are from float64 ones (KL, top-1, perplexity)",
                       description="Run the reference model (--model, float64 by default) over token ids and "
                                   "compare its logits, position by position, with another engine's (--logits "
                                   "FILE.npz holding ids (n,) and logits (n, vocab)) and/or a second llama2np model "
                                   "(--other PATH, --other-quantize int8): max |dlogit|, KL(ref||other) mean and "
                                   "percentiles, top-1 agreement, perplexity of each. With --trace: another "
                                   "engine's activations, layer by layer, and the first layer that departs.")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", metavar="TEXT", help="text, tokenized with BOS")
    src.add_argument("--text", metavar="FILE", help="a UTF-8 text file, tokenized with BOS, read in windows")
    src.add_argument("--ids", metavar='"1 2 3"', help="token ids, space separated (default: the ids in --logits)")
    p.add_argument("--logits", action="append", metavar="FILE.npz", help="another engine's ids and logits "
                   "(repeatable)")
    p.add_argument("--other", metavar="PATH", help="a second checkpoint to compare (e.g. a GGUF quantization)")
    p.add_argument("--other-dtype", default="float32", choices=["float32", "float64"],
                   help="compute precision of --other (default: float32)")
    p.add_argument("--other-quantize", choices=["int8"], help="quantize --other (default: the --model checkpoint) "
                   "to int8 while loading")
    p.add_argument("--window", type=int, metavar="N", help="tokens per forward pass (default: the context length)")
    p.add_argument("--stride", type=int, metavar="N", help="tokens between window starts (default: window / 2)")
    p.add_argument("--json", action="store_true", help="print everything as JSON")
    p.add_argument("--summary-only", action="store_true", help="print the summary table only")
    g = p.add_argument_group("activations layer by layer (see docs/trace.md)")
    g.add_argument("--trace", metavar="OTHER.npz", help="another engine's trace: per array max |d|, NMSE, cosine "
                   "against the reference trace, and the first layer whose output's NMSE exceeds --threshold")
    g.add_argument("--reference", metavar="TRACE.npz", help="the reference trace (default: computed now from "
                   "--model on the trace's ids)")
    g.add_argument("--threshold", type=float, default=1e-4, metavar="NMSE",
                   help="NMSE above which a layer is named (default: 1e-4, llama.cpp's 'excellent'; 1e-2 'good')")
    _model_options(p, dtype="float64")
    p.set_defaults(run="compare")

    p = sub.add_parser("plan", help="memory per actor for --tensor-parallel N, from the config alone",
                       description="Bytes each tensor-parallel actor and the driver hold (weights, and the KV "
                                   "cache at the context length), read from params.json / config.json only; "
                                   "and how many machines Llama 2 7B/13B/70B need.")
    p.add_argument("--model", required=True, metavar="DIR",
                   help="directory with params.json or config.json, or a .gguf file (its header is read)")
    p.add_argument("--tensor-parallel", type=int, default=1, metavar="N", help="actors (default: 1)")
    p.add_argument("--quantize", choices=["int8"], help="plan for weight-only int8")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"], help="compute precision")
    p.add_argument("--storage", choices=["bfloat16", "float16", "float32", "float64"],
                   help="how the weights are stored (default: config.json's torch_dtype; bfloat16 for Meta)")
    p.add_argument("--max-seq-len", type=int, metavar="N", help="context length (default: the model's)")
    p.add_argument("--machine-ram", type=float, default=24.0, metavar="GIB",
                   help="RAM of one machine, GiB, for the machines table (default: 24)")
    p.set_defaults(run="plan")

    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP endpoint (pip install llama2np[serve])",
                       description="Serve the model over HTTP with OpenAI's /v1/completions (echo, logprobs), "
                                   "/v1/chat/completions and /v1/models; log-probabilities are the engine's own. "
                                   "Listens on 127.0.0.1 unless --host says otherwise; no TLS (see docs/serve.md).")
    p.add_argument("--host", default="127.0.0.1", metavar="ADDR", help="address to listen on (default: 127.0.0.1, "
                   "this machine only; 0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, metavar="N", help="port (default: 8000; 0: a free one)")
    p.add_argument("--api-key", metavar="KEY", help="require 'Authorization: Bearer KEY' (default: $LLAMA2NP_API_KEY "
                   "if set, else no key)")
    p.add_argument("--max-queue", type=_positive_int, default=64, metavar="N",
                   help="requests that may wait; more are refused with HTTP 429 (default: 64)")
    _model_options(p)
    p.set_defaults(run="serve")

    p = sub.add_parser("quantize", help="write an int8 copy of a checkpoint that loads in seconds",
                       description="Quantize every weight matrix of a checkpoint to int8 with one float32 scale "
                                   "per row (as --quantize int8 does at every load) and write the result to a new "
                                   "directory, which later loads memory-mapped: --model OUT.")
    p.add_argument("--model", required=True, metavar="PATH", help="the checkpoint to quantize (any layout)")
    p.add_argument("--out", required=True, metavar="DIR", help="new directory to write (must not exist or be empty)")
    p.set_defaults(run="quantize")
    return parser
