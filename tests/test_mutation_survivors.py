"""Behaviour that planted bugs once got past the suite (scripts/mutation, docs/mutation.md), checked directly.

Each test names the mutant it kills: the rule it checks had no test that could tell
the right code from the planted one.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from conftest import DEMO
from llama2np import GenerationConfig, Llama2
from llama2np.generation.drafting import DraftModel
from llama2np.generation.request import Request
from llama2np.generation.sampling import draw, filtered_probs, process_scores
from llama2np.model.linear import quantize_int8


# --- sampling ---------------------------------------------------------------------------


def test_min_p_after_top_p_where_the_order_matters():
    """min-p-before-top-p: min-p first would renormalise the tail away and let top-p cut one more."""
    logits = np.log(np.array([[0.4, 0.35, 0.25]]))
    # top_p 0.5: the masses before are 0, 0.4, 0.75, so 0.4 and 0.35 stay: 8/15, 7/15;
    # min_p 0.7 x 8/15 < 7/15 then keeps both.
    # (min-p first drops 0.25, renormalises to 8/15, 7/15, and top-p then sees 8/15 > 0.5 before the second.)
    got = filtered_probs(logits, GenerationConfig(temperature=1.0, top_p=0.5, min_p=0.7))[0]
    np.testing.assert_allclose(got, [8 / 15, 7 / 15, 0.0], rtol=1e-12)


class _Fixed:
    """A generator stand-in whose uniform draws are given."""

    def __init__(self, *values: float):
        self.values = list(values)

    def random(self) -> float:
        return self.values.pop(0)


def test_a_draw_of_exactly_zero_never_picks_a_zero_probability_token():
    """draw-can-pick-zero-probability: u = 0.0 (which Generator.random can return) must land on a kept token."""
    probs = np.array([[0.0, 0.0, 0.5, 0.5], [0.0, 1.0, 0.0, 0.0]])
    assert draw(probs, [_Fixed(0.0), _Fixed(0.0)]).tolist() == [2, 1]


# --- int8 -------------------------------------------------------------------------------


def test_an_all_zero_row_quantizes_to_zero_codes_without_a_warning():
    """int8-zero-row: a zero row's scale must not be 0 (0 / 0 would make NaN codes, cast to garbage)."""
    w = np.array([[0.0, 0.0, 0.0, 0.0], [1.0, -2.0, 0.5, 0.0]], dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # NumPy's "invalid value encountered in divide" fails the test
        q, scale = quantize_int8(w)
    assert q[0].tolist() == [0, 0, 0, 0] and scale[0] > 0
    assert q[1].tolist() == [64, -127, 32, 0]


# --- stop strings, streamed ----------------------------------------------------------------


class _Pieces:
    """A text decoder stand-in: token id -> its text (what ``StreamDecoder.push`` would return)."""

    def __init__(self, texts: dict[int, str]):
        self.texts = texts

    def push(self, token: int) -> str:
        return self.texts[token]

    def flush(self) -> str:
        return ""


def stream(texts: dict[int, str], tokens: list[int], stop) -> tuple[list[str], Request]:
    cfg = GenerationConfig(temperature=0, max_new_tokens=len(tokens) + 1, stop=stop)
    r = Request([1], cfg, np.random.default_rng(0), context_len=64, eos_id=2, decoder=_Pieces(texts))
    pieces = []
    for t in tokens:
        pieces.append(r.push(t, None))
        if r.done:
            break
    return pieces, r


TEXTS = {10: "Once", 11: " there", 12: " was ", 13: "a", 14: " cat", 15: " w", 16: "as", 17: " "}


def test_the_start_of_a_stop_string_is_held_back_up_to_its_last_character():
    """stop-hold-back-short: " was " is "was a" but for its last character: it must not be printed yet."""
    pieces, r = stream(TEXTS, [10, 11, 12, 13, 14], stop="was a")
    assert r.finish_reason == "stop" and r.completion().text == "Once there "
    assert pieces[2] == " "  # "was " held back
    assert "".join(pieces) == "Once there "


def test_a_stop_string_arriving_over_three_tokens_never_prints():
    pieces, r = stream(TEXTS, [10, 11, 15, 16, 17, 13], stop="was a")
    assert r.finish_reason == "stop" and "".join(pieces) == r.completion().text == "Once there "


def test_with_several_stop_strings_the_text_ends_before_the_first_one():
    """stop-latest-hit: " there was a cat" arrives as one piece holding both stop strings."""
    pieces, r = stream({10: "Once", 11: " there was a cat"}, [10, 11], stop=["cat", "there"])
    assert r.finish_reason == "stop" and r.completion().text == "Once " == "".join(pieces)


# --- draft model -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo64():
    return Llama2.from_pretrained(DEMO, dtype="float64")


def test_a_draft_models_penalties_count_its_own_draft_tokens(demo64):
    """draft-model-context-without-draft: q at draft position j is processed with the draft tokens before j."""
    cfg = GenerationConfig(temperature=1.0, top_p=1.0, frequency_penalty=1.5, presence_penalty=1.0,
                           repetition_penalty=1.3)
    prompt, new = [1, 365, 263, 931], [278]
    drafter = DraftModel(demo64.model)
    draft = drafter.propose(prompt + new, 4, cfg, np.random.default_rng(3), prompt, new)
    logits = demo64.logits(prompt + new + draft.ids[:-1], reuse_cache=False)[len(prompt + new) - 1:]  # (4, vocab)
    for j in range(4):
        x, e = process_scores(logits[j:j + 1], cfg, [(prompt, new + draft.ids[:j])])
        np.testing.assert_allclose(draft.q[j], filtered_probs(x, cfg, e)[0], rtol=1e-9, atol=1e-12)


def test_a_model_drafting_for_itself_with_penalties_has_every_draft_accepted(demo64):
    prompt = [1, 365, 263, 931]
    opts = dict(max_new_tokens=12, temperature=0, repetition_penalty=1.5, presence_penalty=1.0, reuse_cache=False)
    want = demo64.generate(prompt, **opts)
    assert demo64.generate(prompt, draft_model=demo64, **opts) == want
    stats = demo64.last_stats
    assert stats.drafted > 0 and stats.accepted == stats.drafted


# --- chat ----------------------------------------------------------------------------------


def test_a_dialog_that_fills_the_context_drops_its_oldest_exchange(demo):
    """chat-fit-no-room / chat-fit-drops-newest: room for the answer; the oldest exchange goes, the newest stays."""
    from llama2np.generation.chat import dialog_tokens, fit_dialog

    dialog = [{"role": "system", "content": "Be brief."},
              {"role": "user", "content": "Tell me a story."}, {"role": "assistant", "content": "A cat sat."},
              {"role": "user", "content": "Another?"}, {"role": "assistant", "content": "A dog ran."},
              {"role": "user", "content": "And now?"}]
    n = len(dialog_tokens(demo.tokenizer, dialog))
    assert fit_dialog(demo.tokenizer, dialog, n + 1) == (dialog, dialog_tokens(demo.tokenizer, dialog))
    kept, ids = fit_dialog(demo.tokenizer, dialog, n)  # n tokens fill the context: no room for one more
    assert kept == dialog[:1] + dialog[3:] and len(ids) < n


# --- block-quantized matrices ------------------------------------------------------------------


def test_a_symmetric_part_stacked_with_an_asymmetric_one_has_no_offsets():
    """block-stacked-symmetric-offsets: e.g. a Q8_0 wk beside a Q4_K wq (both blocks of 32) in one product."""
    from llama2np.model.quant_blocks import BlockLinear, BlockQuantTensor

    rng = np.random.default_rng(0)
    rows, block, blocks = 8, 32, 3

    def part(offset: bool) -> BlockQuantTensor:
        q = rng.integers(-8, 8, (blocks, block, rows)).astype(np.int8)  # (blocks, B, rows)
        scale = rng.uniform(0.01, 0.1, (blocks, rows)).astype(np.float32)
        return BlockQuantTensor(q, scale, rng.uniform(0, 0.1, (blocks, rows)).astype(np.float32) if offset else None)

    parts = [part(True), part(False)]
    x = rng.standard_normal((2, block * blocks))
    want = x @ np.concatenate([np.asarray(p) for p in parts]).T  # (2, 16), each part's s * q - o
    np.testing.assert_allclose(BlockLinear(parts, np.float64)(x), want, rtol=1e-12, atol=1e-12)
