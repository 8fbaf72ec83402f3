"""``trace`` (reference activations layer by layer) and ``compare --trace`` (where another engine departs).

``commands`` dispatches here and passes in what every command shares (``load_model``, ``parse_ids``, ``say``).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import InputError
from .io import check_output_path, check_utf8, write_atomically


def cmd_trace(args, load_model, parse_ids, say) -> int:
    from ..tools.trace import write_trace

    out = Path(args.out)
    check_output_path(out, "--out", (".npz",))
    if args.prompt is not None:
        check_utf8(args.prompt, "--prompt")
    ids = parse_ids(args.ids) if args.ids is not None else None
    model = load_model(args, text=ids is None, ids_flag="--ids")
    if ids is None:
        ids = model.tokenizer.encode(args.prompt, bos=True)
    ids = model.check_ids(ids)
    if ids.ndim != 1:
        raise InputError("--ids: one sequence of token ids")
    names = []
    write_atomically(out, "--out", lambda f: names.extend(write_trace(model.model, ids, f, args.steps,
                                                                      progress=model.progress)))
    steps = sum(1 for n in names if n.startswith("layers."))
    say(f"wrote {out}: {len(ids)} tokens, hidden_states ({model.args.n_layers + 1}, {len(ids)}, {model.args.dim}) "
         f"{model.model.dtype}, final_layer_output, logits" + (f" and {steps} per-layer steps" if steps else ""))
    return 0


def cmd_compare_trace(args, load_model) -> int:
    from ..tools.trace_compare import compare_traces

    if args.logits or args.other is not None or args.other_quantize is not None:
        raise InputError("--trace compares activations; --logits, --other and --other-quantize compare logits: "
                         "run them as two commands")
    if args.ids is not None or args.prompt is not None or args.text is not None:
        raise InputError("--trace compares the tokens the trace holds (its ids): drop --ids, --prompt and --text")
    if args.reference is not None:
        if args.model is not None:
            raise InputError("--reference and --model: give the reference trace, or the model to compute it from")
        result = compare_traces(args.reference, args.trace, args.threshold)
    else:
        model = load_model(args, text=False)
        result = model.compare_trace(args.trace, threshold=args.threshold)
    print(json.dumps(result.to_dict(), indent=1) if args.json else result.format())
    return 0
