"""``compare``: another side's logits against a reference's, checked against statistics computed here."""

from __future__ import annotations

import json

import numpy as np
import pytest

from llama2np import InputError, Llama2, Transformer
from llama2np.cli.commands import main
from llama2np.tools.compare import read_logits_npz
from tiny_model import tiny_args, tiny_state, write_llama2c

ARGS = tiny_args(vocab_size=96, max_seq_len=64)
IDS = np.random.default_rng(7).integers(0, ARGS.vocab_size, 40)


@pytest.fixture(scope="module")
def reference() -> Llama2:
    return Llama2(Transformer(ARGS, tiny_state(ARGS), "float64"))


@pytest.fixture(scope="module")
def perturbed() -> Llama2:
    state = tiny_state(ARGS)
    rng = np.random.default_rng(1)
    for name in ("output.weight", "layers.1.feed_forward.w2.weight"):
        state[name] = (state[name] * (1 + 0.05 * rng.standard_normal(state[name].shape))).astype(np.float32)
    return Llama2(Transformer(ARGS, state, "float32"))


def kl_here(ref: np.ndarray, other: np.ndarray) -> np.ndarray:
    """KL(softmax(ref) || softmax(other)) per row, written out in float64."""
    ref, other = ref.astype(np.float64), other.astype(np.float64)
    p = np.exp(ref - ref.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    q = np.exp(other - other.max(-1, keepdims=True))
    q /= q.sum(-1, keepdims=True)
    return (p * np.log(p / q)).sum(-1)


def perplexity_here(logits: np.ndarray, ids: np.ndarray) -> float:
    z = logits.astype(np.float64)[:-1]
    logp = z - z.max(-1, keepdims=True) - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True))
    return float(np.exp(-logp[np.arange(len(ids) - 1), ids[1:]].mean()))


def test_identical_models_agree_exactly(reference: Llama2):
    c = reference.compare(reference, tokens=IDS)
    s = c.summary
    assert s["positions"] == len(IDS) and s["kl_max"] == 0 and s["max_abs_dlogit"] == 0
    assert s["top1_agreement"] == 100.0 and s["perplexity_ref"] == s["perplexity_other"]


def test_perturbed_model_kl_as_computed_here(reference: Llama2, perturbed: Llama2):
    c = reference.compare(perturbed, tokens=IDS)
    ref, other = reference.logits(IDS), perturbed.logits(IDS)
    kl = kl_here(ref, other)
    assert kl.min() > 1e-6, "the perturbation should show"
    np.testing.assert_allclose(c.kl, kl, rtol=1e-6, atol=1e-12)
    s = c.summary
    assert s["kl_mean"] == pytest.approx(kl.mean(), rel=1e-6)
    assert s["kl_p90"] == pytest.approx(np.percentile(kl, 90), rel=1e-6)
    assert s["kl_max"] == pytest.approx(kl.max(), rel=1e-6)
    assert s["max_abs_dlogit"] == pytest.approx(np.abs(ref - other).max(), rel=1e-6)
    assert s["top1_agreement"] == pytest.approx(100 * np.mean(ref.argmax(-1) == other.argmax(-1)))
    assert 0 < s["top1_agreement"] < 100  # the perturbation moves some argmaxes (not none, not all)
    assert s["perplexity_ref"] == pytest.approx(perplexity_here(ref, IDS), rel=1e-9)
    assert s["perplexity_other"] == pytest.approx(perplexity_here(other, IDS), rel=1e-6)
    assert s["perplexity_ref"] == pytest.approx(np.exp(np.mean(c.nll_ref)), rel=1e-12)  # per-position NLLs agree
    # same numbers as the perplexity command's formula:
    from llama2np.tools.perplexity import perplexity
    assert s["perplexity_ref"] == pytest.approx(perplexity(reference.model, IDS).perplexity, rel=1e-12)


def test_windows_score_every_position_once(reference: Llama2, perturbed: Llama2):
    c = reference.compare({"p": perturbed}, tokens=IDS, window=16, stride=5)["p"]
    assert len(c.kl) == len(IDS) and len(c.nll_ref) == len(IDS) - 1
    from llama2np.tools.perplexity import perplexity
    assert c.summary["perplexity_ref"] == pytest.approx(perplexity(reference.model, IDS, 16, 5).perplexity, rel=1e-12)
    assert reference.compare(reference, tokens=IDS, window=16, stride=5).summary["kl_max"] == 0
    long_ids = np.resize(IDS, 150)  # longer than the context length: windows make it work
    assert len(reference.compare(perturbed, tokens=long_ids, window=64).kl) == 150


def test_npz_from_another_engine(reference: Llama2, perturbed: Llama2, tmp_path):
    path = tmp_path / "engine.npz"
    other = perturbed.logits(IDS)
    np.savez(path, ids=IDS, logits=other)
    c = reference.compare(path)  # the ids come from the file
    np.testing.assert_allclose(c.kl, kl_here(reference.logits(IDS), other), rtol=1e-6, atol=1e-12)
    both = reference.compare({"model": perturbed, "npz": path})
    np.testing.assert_allclose(both["model"].kl, both["npz"].kl, rtol=1e-12)


@pytest.mark.parametrize("arrays, match", [
    ({"logits": np.zeros((40, 96))}, "missing array.*ids"),
    ({"ids": IDS, "logits": np.zeros((39, 96))}, r"logits must be \(n, vocab\)"),
    ({"ids": IDS, "logits": np.zeros((40, 95))}, "95 columns.*96 tokens"),
    ({"ids": IDS, "logits": np.zeros(40 * 96)}, r"logits must be \(n, vocab\)"),
    ({"ids": IDS.astype(float), "logits": np.zeros((40, 96))}, "integer"),
    ({"ids": IDS, "logits": np.where(np.eye(40, 96) > 0, np.nan, 0.0)}, "NaN/inf.*position 0"),
    ({"ids": IDS + 96, "logits": np.zeros((40, 96))}, "outside the vocabulary"),
])
def test_bad_npz(reference: Llama2, tmp_path, arrays, match):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(InputError, match=match):
        reference.compare(path)


def test_bad_inputs(reference: Llama2, tmp_path):
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip")
    with pytest.raises(InputError, match="not a readable .npz"):
        read_logits_npz(junk, 96)
    path = tmp_path / "ok.npz"
    np.savez(path, ids=IDS, logits=np.zeros((40, 96)))
    with pytest.raises(InputError, match="ids differ"):
        reference.compare(path, tokens=IDS[:-1])
    with pytest.raises(InputError, match="needs token ids"):
        reference.compare(reference)
    with pytest.raises(InputError, match="outside the vocabulary"):
        reference.compare(reference, tokens=[1, 500])
    with pytest.raises(InputError, match="vocabulary of 50"):
        small = tiny_args(vocab_size=50, max_seq_len=64)
        reference.compare(Llama2(Transformer(small, tiny_state(small))), tokens=[1, 2])


def test_cli_compare(tmp_path, capsys):
    model = write_llama2c(tmp_path / "m.bin", ARGS, tiny_state(ARGS))
    logits = tmp_path / "engine.npz"
    np.savez(logits, ids=IDS, logits=Llama2.from_pretrained(model).logits(IDS))
    assert main(["compare", "--model", str(model), "--logits", str(logits), "--other-quantize", "int8",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert "float64" in out["reference"]
    summary = out["results"]["engine.npz"]["summary"]
    assert summary["top1_agreement"] == 100 and summary["kl_max"] < 1e-9  # float32 vs float64
    int8 = next(v for k, v in out["results"].items() if "int8" in k)
    assert 0 < int8["summary"]["kl_mean"] < 1e-2 and len(int8["positions"]) == len(IDS)
    assert main(["compare", "--model", str(model), "--logits", str(logits), "--window", "16"]) == 0
    text = capsys.readouterr().out
    assert "KL p99" in text and "per position" in text
    assert main(["compare", "--model", str(model)]) == 2
    assert "nothing to compare" in capsys.readouterr().err
