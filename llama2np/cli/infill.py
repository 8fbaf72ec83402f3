"""``generate --suffix``: CodeLlama's fill-in-the-middle of the prompt (the prefix) and the suffix.

``commands`` dispatches here and passes in what every command shares (``load_model``, ``say``).
"""

from __future__ import annotations

import sys

from ..generation.config import GenerationConfig
from ..generation.infill import infill_tokens
from .io import check_utf8


def cmd_infill(args, config: GenerationConfig, load_model, say) -> int:
    """Print prefix + middle + suffix; the counts and speed go to stderr."""
    check_utf8(args.suffix, "--suffix")
    model = load_model(args)
    infill_tokens(model.tokenizer)  # not a CodeLlama vocabulary: say so before generating
    middle = model.infill(args.prompt, args.suffix, config=config, draft_model=args.draft_model)
    sys.stdout.write(args.prompt + middle + args.suffix + "\n")
    sys.stdout.flush()
    say(model.last_stats.summary())
    return 0
