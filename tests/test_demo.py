"""The embedded demo model in weights/demo: ships with the repository, tells a story, repeatably.

Needs nothing outside the repository (no real-weight test data, no network).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import DEMO, REPO
from llama2np.cli.commands import find_default_model

PROMPT = "Once upon a time"


def test_demo_is_a_small_meta_layout_checkpoint_with_grouped_query_attention():
    names = sorted(p.name for p in DEMO.iterdir())
    assert names == ["consolidated.00.pth", "params.json", "tokenizer.model"]
    assert sum(p.stat().st_size for p in DEMO.iterdir()) <= 8 * 2**20
    params = json.loads((DEMO / "params.json").read_text())
    assert params["n_kv_heads"] < params["n_heads"]  # exercises GQA, as 70B does
    assert params["ffn_dim_multiplier"] is not None  # and the FFN size rule with a multiplier


def test_demo_loads_with_its_own_tokenizer(demo):
    tok = demo.tokenizer
    assert tok.path == DEMO / "tokenizer.model"
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (demo.args.vocab_size, 1, 2)
    assert tok.decode(tok.encode(PROMPT, bos=True)[1:]) == PROMPT


def test_demo_is_trained_on_simple_english(demo):
    # An untrained model scores near the vocabulary size; the demo knows how such stories go.
    ppl = demo.perplexity("Once upon a time, there was a little girl named Lily. She loved to play outside "
                          "with her friends. One day, she saw a big red ball in the park.")
    assert ppl < 0.02 * demo.args.vocab_size


def test_greedy_generation_is_text_and_reproducible(demo):
    first = demo.generate(PROMPT, max_new_tokens=40, temperature=0)
    assert isinstance(first, str) and len(first.split()) >= 5
    assert first == demo.generate(PROMPT, max_new_tokens=40, temperature=0)


def test_sampling_is_deterministic_for_a_seed(demo):
    a = demo.generate(PROMPT, max_new_tokens=40, temperature=1.0, seed=7)
    assert isinstance(a, str) and a.strip()
    assert a == demo.generate(PROMPT, max_new_tokens=40, temperature=1.0, seed=7)
    others = {demo.generate(PROMPT, max_new_tokens=40, temperature=1.0, seed=s) for s in (8, 9, 10)}
    assert others - {a}, "different seeds never changed the sample"


def test_cli_generate_uses_the_demo_by_default(tmp_path):
    path, _ = find_default_model()
    if path.resolve() != DEMO.resolve():
        pytest.skip(f"weights/ holds a user checkpoint ({path}), which the CLI prefers to the demo")
    cmd = [sys.executable, "-m", "llama2np", "generate", "--prompt", PROMPT, "--max-new-tokens", "20", "--seed", "1"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    runs = [subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120) for _ in range(2)]
    for run in runs:
        assert run.returncode == 0, run.stderr
        assert run.stdout.startswith(PROMPT) and len(run.stdout.strip()) > len(PROMPT)
        assert "demo" in run.stderr
    assert runs[0].stdout == runs[1].stdout
