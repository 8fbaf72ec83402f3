#!/usr/bin/env python
"""Regenerate ``tests/golden/sampling.npz``: logits processors' outputs from Hugging Face transformers.

Random float32 logits and token histories go through HF's own processors in the
order ``GenerationMixin._get_logits_processor`` builds them: SequenceBias
(logit_bias), RepetitionPenalty, then the warpers Temperature, TopK, MinP.
HF has no frequency/presence penalty; those are OpenAI's formula written here
in torch (counts of the generated tokens only). Nothing here imports llama2np.

Each case stores: ``{name}.logits`` (batch, vocab), ``{name}.ids`` (batch, seq)
with the first ``{name}.prompt_len`` columns the prompt, ``{name}.processed``
(the logits after the processors, float32 as HF computes them) and, when a
warper is set, ``{name}.probs`` (softmax of HF's warped scores). The
parameters are in ``{name}.params`` (JSON).

Usage (needs the ``reference`` extra): python scripts/golden/make_sampling_golden.py [--out tests/golden/sampling.npz]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from transformers.generation.logits_process import (LogitsProcessorList, MinPLogitsWarper,
                                                    RepetitionPenaltyLogitsProcessor, SequenceBiasLogitsProcessor,
                                                    TemperatureLogitsWarper, TopKLogitsWarper)

VOCAB, BATCH = 64, 3
CASES = {
    "repetition": dict(repetition_penalty=1.3),
    "repetition_below_one": dict(repetition_penalty=0.7),
    "logit_bias": dict(logit_bias={5: 2.0, 17: -100.0, 3: -1.5}),
    "frequency_presence": dict(frequency_penalty=0.5, presence_penalty=0.3),
    "min_p": dict(min_p=0.05),
    "all": dict(logit_bias={5: 2.0, 9: -3.0}, repetition_penalty=1.2, frequency_penalty=0.4, presence_penalty=0.6,
                temperature=0.7, top_k=20, min_p=0.1),
}


def openai_penalties(ids: torch.Tensor, prompt_len: int, scores: torch.Tensor, frequency: float,
                     presence: float) -> torch.Tensor:
    """mu[j] -= c[j] * frequency + (c[j] > 0) * presence, c = counts among the generated tokens."""
    counts = torch.zeros_like(scores)
    counts.scatter_add_(1, ids[:, prompt_len:], torch.ones_like(ids[:, prompt_len:], dtype=scores.dtype))
    return scores - counts * frequency - (counts > 0).to(scores.dtype) * presence


def run_case(params: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
    logits = (rng.normal(size=(BATCH, VOCAB)) * 3).astype(np.float32)
    prompt_len, n_new = 6, 9
    ids = rng.integers(0, 12, size=(BATCH, prompt_len + n_new))  # small ids: many repeats
    t_ids, scores = torch.from_numpy(ids), torch.from_numpy(logits.copy())
    processors = LogitsProcessorList()
    if "logit_bias" in params:
        processors.append(SequenceBiasLogitsProcessor({(k,): v for k, v in params["logit_bias"].items()}))
    if "repetition_penalty" in params:
        processors.append(RepetitionPenaltyLogitsProcessor(params["repetition_penalty"]))
    processed = processors(t_ids, scores)
    if "frequency_penalty" in params:
        processed = openai_penalties(t_ids, prompt_len, processed, params["frequency_penalty"],
                                     params["presence_penalty"])
    out = dict(logits=logits, ids=ids, prompt_len=np.array(prompt_len), processed=processed.numpy(),
               params=np.array(json.dumps(params)))
    warpers = LogitsProcessorList()
    if params.get("temperature", 1.0) != 1.0:
        warpers.append(TemperatureLogitsWarper(params["temperature"]))
    if "top_k" in params:
        warpers.append(TopKLogitsWarper(params["top_k"]))
    if "min_p" in params:
        warpers.append(MinPLogitsWarper(params["min_p"]))
    if warpers:
        out["probs"] = torch.softmax(warpers(t_ids, processed.clone()).double(), dim=-1).numpy()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[2] / "tests/golden/sampling.npz"))
    args = parser.parse_args()
    rng = np.random.default_rng(13)
    arrays = {}
    for name, params in CASES.items():
        for key, value in run_case(params, rng).items():
            arrays[f"{name}.{key}"] = value
    np.savez_compressed(args.out, **arrays)
    print(f"wrote {args.out}: {len(CASES)} cases")


if __name__ == "__main__":
    main()
