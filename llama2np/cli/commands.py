"""The command line: ``python -m llama2np generate | chat | perplexity | logits | trace | compare | plan | quantize | serve``.

Text goes to stdout; what the program says about itself (which model, speed,
warnings, errors) goes to stderr. Errors are one line and exit with status 2.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import InputError, Llama2npError, TokenizerError
from ..generation.chat import check_content, fit_dialog
from ..generation.config import GenerationConfig
from .infill import cmd_infill
from .io import check_output_path, check_streams, check_utf8, stdin_keeps_bad_bytes, write_atomically
from .parser import PROG, build_parser
from .serve import cmd_serve

PACKAGE_ROOT = Path(__file__).resolve().parents[2]
CHECKPOINT_SUFFIXES = (".bin", ".pth", ".safetensors", ".gguf")


#: what str.splitlines() breaks a line at: inside a message (a file name, a flag's value) shown escaped
_LINE_BREAKS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"


def _say(message: str) -> None:
    """One line on stderr: a line break a message carries (from a path or a value) is shown escaped."""
    if sys.stderr is not None:  # with stderr closed (2>&-) there is nowhere to say it
        line = "".join(repr(c)[1:-1] if c in _LINE_BREAKS else c for c in message.rstrip("\n"))
        print(f"{PROG}: {line}", file=sys.stderr, flush=True)


# --- which model -----------------------------------------------------------------------


def _is_checkpoint(path: Path) -> bool:
    if path.is_file():
        return path.suffix in CHECKPOINT_SUFFIXES
    if path.is_dir():
        return any((path / name).is_file() for name in ("params.json", "config.json")) or any(
            p.suffix in CHECKPOINT_SUFFIXES for p in path.iterdir())
    return False


def find_default_model(roots: Sequence[Path] | None = None) -> tuple[Path, str]:
    """The model to use when no --model is given, and why.

    The one user checkpoint under weights/ (anything but weights/demo), else the demo model
    weights/demo. weights/ is looked for in the current directory, then beside the package.
    """
    if roots is None:
        roots = [Path("weights"), PACKAGE_ROOT / "weights"]
    looked = []
    for root in roots:
        if str(root.resolve()) in looked:
            continue
        looked.append(str(root.resolve()))
        if not root.is_dir():
            continue
        user = [p for p in sorted(root.iterdir()) if p.name != "demo" and _is_checkpoint(p)]
        demo = root / "demo"
        if len(user) == 1:
            return user[0], f"using {user[0]} (the checkpoint under {root}/; --model chooses another)"
        if _is_checkpoint(demo):
            why = (f"several checkpoints under {root}/ ({', '.join(p.name for p in user)}), so " if user else "")
            return demo, f"{why}using the demo model {demo} (--model chooses another)"
        if user:
            raise InputError(f"several checkpoints under {root}/ ({', '.join(p.name for p in user)}): "
                             "choose one with --model")
    raise InputError(f"no --model given and no checkpoint under {' or '.join(looked)}: pass --model PATH "
                     "(a Meta or Hugging Face directory, a llama2.c .bin or a .gguf); the demo model is in a "
                     "clone's weights/demo, which a non-editable install does not carry")


def load_model(args, text: bool = True, ids_flag: str | None = None):
    """The model the flags name; with ``text``, fail now (naming --tokenizer) if it has no tokenizer."""
    from ..llama import Llama2

    path = args.model
    if path is None:
        path, why = find_default_model()
        _say(why)
    model = Llama2.from_pretrained(path, dtype=args.dtype, tokenizer_path=args.tokenizer,
                                   max_seq_len=args.max_seq_len, quantize=args.quantize,
                                   tensor_parallel=args.tensor_parallel, ray_address=args.ray_address)
    if text and not model.has_tokenizer:
        where = ", ".join(str(p) for p in model.tokenizer_candidates) or "nowhere"
        raise TokenizerError(f"no tokenizer for this model (looked for {where}); pass --tokenizer PATH"
                             + (f", or give {ids_flag}" if ids_flag else ""))
    return model


# --- the commands ----------------------------------------------------------------------


def _logit_bias(specs: Sequence[str] | None) -> dict[int, float] | None:
    """--logit-bias ID=BIAS (repeatable) -> {id: bias}."""
    if not specs:
        return None
    bias = {}
    for spec in specs:
        token, sep, value = spec.partition("=")
        try:
            bias[int(token)] = float(value)
        except ValueError:
            raise InputError(f"--logit-bias takes TOKEN_ID=BIAS, e.g. 450=-2.5 or 13=-inf; got {spec!r}") from None
        if not sep:
            raise InputError(f"--logit-bias takes TOKEN_ID=BIAS, e.g. 450=-2.5 or 13=-inf; got {spec!r}")
    return bias


def _config(args, **extra) -> GenerationConfig:
    """The generation options the flags give, checked before any model is loaded (a bad flag should not
    wait for a 7B load)."""
    return GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, min_p=args.min_p,
                            repetition_penalty=args.repetition_penalty, frequency_penalty=args.frequency_penalty,
                            presence_penalty=args.presence_penalty, logit_bias=_logit_bias(args.logit_bias),
                            prompt_lookup=args.prompt_lookup, num_draft=args.num_draft, **extra)


def cmd_generate(args) -> int:
    check_utf8(args.prompt, "--prompt")
    for s in args.stop or []:
        check_utf8(s, "--stop")
    config = _config(args, stop=args.stop)
    if args.suffix is not None:
        return cmd_infill(args, config, load_model, _say)
    model = load_model(args)
    stream = model.generate(args.prompt, stream=True, config=config, draft_model=args.draft_model)
    out = sys.stdout
    out.write(args.prompt)
    out.flush()
    for piece in stream:
        out.write(piece)
        out.flush()
    out.write("\n")
    out.flush()
    _say(stream.stats.summary())
    return 0


def cmd_chat(args) -> int:
    if args.system is not None:
        check_utf8(args.system, "--system")
        check_content(args.system, "--system")  # before the model loads: it would refuse every message
    stdin_keeps_bad_bytes()
    config = _config(args)
    model = load_model(args)
    if model.source is not None and Path(model.source).parts[-2:] == ("weights", "demo"):
        _say("the demo model tells stories; it is not a chat model, so its answers will not follow the "
             "conversation (--model chooses a Llama 2 -chat checkpoint)")
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(system)
    interactive = sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        _say("chat: type a message and press Enter; Ctrl-C stops an answer, Ctrl-D ends the chat")
    while True:
        try:
            user = input("> " if interactive else "")
        except EOFError:
            if interactive:
                print()
            return 0
        if not user.strip():
            continue
        try:  # a bad message is reported and dropped; the conversation so far stays
            check_utf8(user, "the message")
            if not interactive:
                print(f"> {user}", flush=True)
            check_content(user, "the message")
            kept, _ = fit_dialog(model.tokenizer, messages + [{"role": "user", "content": user}],
                                 model.args.max_seq_len)
            stream = model.chat(kept, stream=True, config=config, draft_model=args.draft_model)
        except InputError as e:
            _say(f"{e} (message not sent; the chat goes on)")
            continue
        if len(kept) < len(messages) + 1:
            _say(f"the conversation outgrew the context length {model.args.max_seq_len}: "
                 f"the oldest {(len(messages) + 1 - len(kept)) // 2} exchange(s) are forgotten")
        messages = kept
        answer = []
        try:
            for piece in stream:
                sys.stdout.write(piece)
                sys.stdout.flush()
                answer.append(piece)
        except KeyboardInterrupt:  # stop this answer, keep what was said, go on chatting
            print(flush=True)
            _say("(answer stopped)")
        else:
            print(flush=True)
            _say(stream.stats.summary())
        messages.append({"role": "assistant", "content": "".join(answer)})


def _read_text(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read text ({e})") from None


def cmd_perplexity(args) -> int:
    from ..tools.perplexity import perplexity

    text = _read_text(args.file)
    model = load_model(args)
    result = perplexity(model.model, model.tokenizer.encode(text), args.window, args.stride, model.progress)
    print(f"perplexity {result.perplexity:.4f} over {result.tokens} tokens "
          f"({result.nll:.4f} nats/token)")
    _say(f"{result.tokens_per_s:.1f} tokens/s ({result.seconds:.2f} s)")
    return 0


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise InputError(f'--ids must be token ids separated by spaces, e.g. "1 450 4996"; got {text!r}') from None


def cmd_compare(args) -> int:
    import json

    from ..llama import Llama2
    from ..tools.compare import format_positions, format_summary, summaries

    if args.trace is not None:
        from .trace import cmd_compare_trace

        return cmd_compare_trace(args, load_model)
    if args.other is None and args.other_quantize is None and not args.logits:
        raise InputError("nothing to compare with: give --logits FILE.npz (another engine's logits), "
                         "--other PATH (a second checkpoint) and/or --other-quantize int8")
    if args.prompt is not None:
        check_utf8(args.prompt, "--prompt")
    reference = load_model(args, text=args.prompt is not None or args.text is not None, ids_flag="--ids or --logits")
    others: dict = {}
    if args.other is not None or args.other_quantize is not None:
        path = args.other or reference.source
        other = Llama2.from_pretrained(path, dtype=args.other_dtype, tokenizer_path=args.tokenizer,
                                       max_seq_len=args.max_seq_len, quantize=args.other_quantize)
        others[f"{Path(path).name} {args.other_dtype}{' int8' if args.other_quantize else ''}"] = other
    for path in args.logits or []:
        others[Path(path).name] = path
    tokens = None
    if args.ids is not None:
        tokens = _parse_ids(args.ids)
    elif args.prompt is not None or args.text is not None:
        text = args.prompt if args.prompt is not None else _read_text(args.text)
        tokens = reference.tokenizer.encode(text, bos=True)
    results = reference.compare(others, tokens=tokens, window=args.window, stride=args.stride)
    label = f"{reference.source} ({reference.model.dtype}{', int8' if args.quantize else ''})"
    if args.json:
        print(json.dumps({"reference": label, "results": summaries(results)}, indent=1))
        return 0
    if not args.summary_only:
        decode = reference.tokenizer.id_to_piece if reference.has_tokenizer else None
        for c in results.values():
            print("\n".join(format_positions(c, decode)), end="\n\n")
    print(format_summary(results, label))
    return 0


def cmd_logits(args) -> int:
    out = Path(args.out)
    check_output_path(out, "--out", (".npy", ".npz"))
    if args.prompt is not None:
        check_utf8(args.prompt, "--prompt")
    if args.prompts is not None:
        return _logits_of_many(args, out)
    ids = None
    if args.ids is not None:
        ids = _parse_ids(args.ids)
    model = load_model(args, text=ids is None, ids_flag="--ids")
    if ids is None:
        ids = model.tokenizer.encode(args.prompt, bos=True)
    logits = model.logits(ids)  # (seq, vocab)
    if out.suffix == ".npz":
        write_atomically(out, "--out", lambda f: np.savez(f, logits=logits, ids=np.asarray(ids, dtype=np.int64)))
    else:
        write_atomically(out, "--out", lambda f: np.save(f, logits))
    _say(f"wrote {out}: logits {logits.shape} {logits.dtype} for ids {ids}")
    return 0


def _logits_of_many(args, out: Path) -> int:
    from ..tools.logits_file import read_prompts, write_logits_npz

    if out.suffix != ".npz":
        raise InputError(f"--out {out}: --prompts writes one .npz (ids, offsets, logits, logprobs)")
    model = load_model(args, text=False)
    prompts = read_prompts(args.prompts, lambda text: model.tokenizer.encode(text, bos=True), model.check_ids)
    rows = []
    write_atomically(out, "--out", lambda f: rows.append(write_logits_npz(model, prompts, f)))
    _say(f"wrote {out}: {len(prompts)} prompts, {rows[0]} positions of {model.args.vocab_size} "
         f"{model.model.dtype} logits and log-probabilities")
    return 0


def cmd_plan(args) -> int:
    from ..distributed.memory_plan import GiB, human, machines_table, memory_plan, read_model_config

    if not (math.isfinite(args.machine_ram) and args.machine_ram > 0):
        raise InputError(f"--machine-ram must be a positive number of GiB, got {args.machine_ram:g}")
    types = None
    if Path(args.model).is_file():  # a GGUF: each tensor's own type, from its header
        from collections import Counter

        from ..loaders.gguf import tensor_types

        model_args, types = tensor_types(Path(args.model), args.max_seq_len)
        counts = Counter(t for n, t in types.items() if not n.endswith("norm.weight"))
        storage = "GGUF " + "/".join(t for t, _ in counts.most_common())
    else:
        model_args, storage = read_model_config(args.model, args.max_seq_len)
        storage = args.storage or storage
    p = memory_plan(model_args, args.tensor_parallel, storage, args.dtype, args.quantize, tensor_types=types)
    weights = f"{storage} weights" if not args.quantize else f"{storage} weights quantised to int8"
    print(f"{args.model}: dim {model_args.dim}, {model_args.n_layers} layers, {model_args.n_heads} heads "
          f"({model_args.n_kv_heads} key/value), context {model_args.max_seq_len}; {weights}, {args.dtype} compute")
    print(f"each of {args.tensor_parallel} actors: {human(p.actor_total)} "
          f"({human(p.actor_weights)} weights + {human(p.actor_kv_cache)} KV cache)")
    print(f"driver: {human(p.driver_weights)} (embedding, norms, output projection)")
    print(f"machines of {args.machine_ram:g} GiB for Llama 2 (bf16, context 4096; one actor per machine, "
          "the driver beside actor 0):")
    for name, label, machines, actor in machines_table(int(args.machine_ram * GiB)):
        need = f"{machines} ({human(actor)} per actor)" if machines else "does not fit"
        print(f"  {name:>4} {label:<9} {need}")
    return 0


def cmd_quantize(args) -> int:
    import time

    from ..loaders.int8_writer import quantize_checkpoint

    t0 = time.perf_counter()
    out = quantize_checkpoint(args.model, args.out, progress=None)
    _say(f"wrote {out} in {time.perf_counter() - t0:.1f} s (int8 weights + float32 row scales); "
         f"load it with --model {out}")
    return 0


def cmd_trace(args) -> int:
    from .trace import cmd_trace as run

    return run(args, load_model, _parse_ids, _say)


COMMANDS = {"generate": cmd_generate, "chat": cmd_chat, "perplexity": cmd_perplexity, "logits": cmd_logits,
            "compare": cmd_compare, "plan": cmd_plan, "quantize": cmd_quantize, "trace": cmd_trace,
            "serve": lambda args: cmd_serve(args, load_model, _say)}


def _warn_one_line(message, category, filename, lineno, file=None, line=None) -> None:
    _say(f"warning: {message}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.error("choose a command: generate, chat, perplexity, logits, trace, compare, plan, quantize or serve")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = _warn_one_line
        try:
            check_streams(stdin=args.command == "chat", stdout=args.command not in ("logits", "trace"))
            return COMMANDS[args.run](args)
        except Llama2npError as e:
            _say(f"error: {e}")
            return 2
        except KeyboardInterrupt:
            if sys.stderr is not None:
                print(file=sys.stderr)
            return 130
        except BrokenPipeError:  # e.g. piped into head: stop quietly, and let the exit not flush into the pipe
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
        except OSError as e:  # a path the OS refuses (too long, no permission ...) that no check caught
            _say(f"error: {e.filename or ''}{': ' if e.filename else ''}{e.strerror or e}")
            return 2
