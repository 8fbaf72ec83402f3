"""Traces (llama2np.tools.trace) and compare --trace (llama2np.tools.trace_compare).

Goldens: Hugging Face's float64 ``output_hidden_states`` (tests/golden/trace/, written by
scripts/golden/make_trace_golden.py) and Meta's formulas in float64, written here in NumPy
independently of llama2np's blocks.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, shared_path
from llama2np import InputError, Llama2
from llama2np.cli.commands import main
from llama2np.loaders import load_checkpoint
from llama2np.model.storage import to_float
from llama2np.progress import layer_callback
from llama2np.tools import trace as trace_module
from llama2np.tools.trace import STEPS
from llama2np.tools.trace_compare import compare_traces

GOLDEN = REPO / "tests" / "golden"
TRACES = json.loads((GOLDEN / "trace" / "manifest.json").read_text())
MANIFEST = json.loads((GOLDEN / "manifest.json").read_text())
# HF's float64 here is true float64 (see scripts/golden/golden_reference.py), so it is far closer than 1e-6.
HF_TOLERANCE = {"float64": 1e-9, "float32": 1e-4}
DEMO = REPO / "weights" / "demo"
IDS = [1, 17, 93, 4, 55, 8, 90, 3, 64, 11]  # inside every golden vocabulary (the smallest: 96)


def _golden_cases():
    """(checkpoint dir, trace name) for every golden checkpoint: each layouts/ copy shares its model's trace."""
    by_dir = {entry["checkpoint"]: name for name, entry in TRACES.items() if "checkpoint" in entry}
    reference_of = {MANIFEST[d]["reference"]: by_dir[d] for d in by_dir}
    return [(entry["dir"], reference_of[entry["reference"]]) for entry in MANIFEST.values()
            if entry.get("reference") in reference_of]


def _load(path, dtype="float64", **kw) -> Llama2:
    return Llama2.from_pretrained(path, dtype=dtype, **kw)


def _golden_model(name: str, dtype: str) -> Llama2:
    entry = TRACES[name]
    if "shared" in entry:
        return _load(shared_path(*entry["shared"]), dtype)
    return _load(GOLDEN / entry["checkpoint"], dtype)


# --- HF transformers' float64 hidden_states -------------------------------------------------


@pytest.mark.parametrize("dtype", sorted(HF_TOLERANCE))
@pytest.mark.parametrize("checkpoint, name", _golden_cases())
def test_hidden_states_equal_hf_output_hidden_states(checkpoint, name, dtype):
    with np.load(GOLDEN / TRACES[name]["trace"]) as z:
        hf = {k: z[k] for k in z.files}
    model = _load(GOLDEN / checkpoint, dtype)
    got = model.trace(hf["ids"], steps="all" if TRACES[name]["steps"] else "hidden")
    assert got["hidden_states"].dtype == np.dtype(dtype)
    errors = {k: float(np.abs(got[k].astype(np.float64) - hf[k]).max()) for k in hf if k != "ids"}
    print(f"\ntrace {checkpoint} {dtype}: " + ", ".join(f"{k} {e:.1e}" for k, e in errors.items()))
    assert {"hidden_states", "final_layer_output"} <= set(errors)
    bad = {k: e for k, e in errors.items() if not e <= HF_TOLERANCE[dtype]}
    assert not bad, f"{checkpoint} ({dtype}) differs from HF: {bad}"
    assert model.compare_trace(GOLDEN / TRACES[name]["trace"]).first_layer_over is None


def test_hf_golden_holds_every_step_with_q_k_reordered_from_rotate_half():
    """gqa2's HF trace has all steps: q and k came out of HF's rotate-half layout by the documented reorder."""
    entry = TRACES["gqa2"]
    with np.load(GOLDEN / entry["trace"]) as z:
        names = set(z.files)
    assert {f"layers.{i}.{s}" for i in range(entry["n_layers"]) for s in STEPS} <= names


@pytest.mark.parametrize("dtype", sorted(HF_TOLERANCE))
def test_stories260k_hidden_states_equal_hf(dtype):
    entry = TRACES["stories260K"]
    model = _golden_model("stories260K", dtype)
    with np.load(GOLDEN / entry["trace"]) as z:
        got = model.trace(z["ids"])
        for k in ("hidden_states", "final_layer_output"):
            err = float(np.abs(got[k] - z[k]).max())
            assert err <= HF_TOLERANCE[dtype], f"stories260K {k} ({dtype}) off by {err:.1e}"


# --- Meta's formulas, written here in float64 -------------------------------------------------


def meta_trace(path: Path, ids: list[int]) -> dict[str, np.ndarray]:
    """Every array of a trace, from Meta's ``model.py`` formulas in float64 NumPy (real-valued RoPE on
    (2j, 2j+1) pairs, key/value heads repeated, additive causal mask)."""
    ckpt = load_checkpoint(path)
    a = ckpt.args
    w = lambda name: to_float(ckpt.state[name], np.float64)  # noqa: E731
    n, hd = len(ids), a.dim // a.n_heads
    angle = np.arange(n)[:, None] * a.rope_theta ** (-np.arange(0, hd, 2) / hd)  # (n, hd/2)
    cos, sin = np.cos(angle)[:, None, :], np.sin(angle)[:, None, :]

    def norm(x, weight):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + a.norm_eps) * weight

    def rope(x):  # (n, heads, hd): pair (x[2j], x[2j+1]) times e^(i angle_j)
        re_, im = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2], out[..., 1::2] = re_ * cos - im * sin, re_ * sin + im * cos
        return out

    out = {"ids": np.array(ids)}
    h = w("tok_embeddings.weight")[ids]
    hidden = [h]
    for i in range(a.n_layers):
        p = f"layers.{i}."
        x = norm(h, w(p + "attention_norm.weight"))
        q = rope((x @ w(p + "attention.wq.weight").T).reshape(n, a.n_heads, hd))
        k = rope((x @ w(p + "attention.wk.weight").T).reshape(n, a.n_kv_heads, hd))
        v = (x @ w(p + "attention.wv.weight").T).reshape(n, a.n_kv_heads, hd)
        rep = a.n_heads // a.n_kv_heads
        kk, vv = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
        scores = np.einsum("qhd,khd->hqk", q, kk) / math.sqrt(hd) + np.triu(np.full((n, n), -np.inf), 1)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        att = np.einsum("hqk,khd->qhd", probs, vv).reshape(n, -1) @ w(p + "attention.wo.weight").T
        h = h + att
        y = norm(h, w(p + "ffn_norm.weight"))
        g = y @ w(p + "feed_forward.w1.weight").T
        ff = (g / (1 + np.exp(-g)) * (y @ w(p + "feed_forward.w3.weight").T)) @ w(p + "feed_forward.w2.weight").T
        h = h + ff
        out.update({p + "attention_norm": x, p + "q": q, p + "k": k, p + "v": v, p + "attention": att,
                    p + "ffn_norm": y, p + "feed_forward": ff})
        hidden.append(h)
    out["final_layer_output"] = h
    hidden[-1] = norm(h, w("norm.weight"))
    out["hidden_states"] = np.stack(hidden)
    out["logits"] = hidden[-1] @ w("output.weight").T
    return out


@pytest.mark.parametrize("path", [GOLDEN / "mha", GOLDEN / "gqa2", GOLDEN / "mqa_bf16", GOLDEN / "ffn_mult",
                                  GOLDEN / "layouts" / "hf_bf16", DEMO], ids=lambda p: p.name)
def test_every_array_equals_meta_formulas_in_float64(path, tmp_path):
    want = meta_trace(path, IDS)
    model = _load(path)
    got = model.trace(IDS, steps="all")
    assert set(got) == set(want)
    for name in want:
        assert got[name].shape == want[name].shape, name
        err = float(np.abs(got[name] - want[name]).max())
        assert err <= 1e-12, f"{path.name}: {name} off by {err:.1e}"
    written = model.trace(IDS, out=tmp_path / "t.npz", steps="all")  # the file holds the same arrays
    with np.load(written) as z:
        assert set(z.files) == set(got) and all(np.array_equal(z[k], got[k]) for k in got)
        assert z["ids"].dtype == np.int64 and z["logits"].dtype == np.float64


def test_stories260k_every_array_equals_meta_formulas():
    path = shared_path("stories260K", "stories260K.bin")
    ids = [1, 403, 407, 261, 378, 410, 268]
    want, got = meta_trace(path, ids), _load(path).trace(ids, steps="all")
    for name in want:
        assert float(np.abs(got[name] - want[name]).max()) <= 1e-12, name


def test_steps_hidden_holds_the_residual_stream_only_and_float32_on_request():
    model = _load(GOLDEN / "gqa2")
    t = model.trace(IDS, dtype="float32")
    assert sorted(t) == ["final_layer_output", "hidden_states", "ids", "logits"]
    assert t["hidden_states"].dtype == np.float32 and t["hidden_states"].shape == (3, len(IDS), 48)
    np.testing.assert_array_equal(t["logits"], model.logits(IDS).astype(np.float32))


def test_the_file_grows_layer_by_layer(tmp_path, monkeypatch):
    """Each layer's arrays reach the file while the forward pass goes on (memory holds one layer)."""
    model = _load(DEMO)
    sizes = []
    with open(tmp_path / "t.npz", "wb") as f:
        monkeypatch.setattr(trace_module, "layer_callback", lambda *a: lambda i: sizes.append(f.tell()))
        trace_module.write_trace(model.model, np.array(IDS), f, steps="all")
    assert len(sizes) == model.args.n_layers and all(b > a for a, b in zip(sizes, sizes[1:]))
    assert sizes[0] > 7 * len(IDS) * model.args.dim * 8 * 0.5  # layer 0's steps are in before layer 1 runs


def test_progress_bar_counts_layers(capsys, monkeypatch):
    model = Llama2.from_pretrained(DEMO, dtype="float64", progress=True)
    capsys.readouterr()
    ticks = []

    def counting(*args):
        tick = layer_callback(*args)
        return lambda i: (ticks.append(i), tick(i))

    monkeypatch.setattr(trace_module, "layer_callback", counting)
    model.trace(IDS)
    assert ticks == list(range(model.args.n_layers))
    assert f"0/{model.args.n_layers}" in capsys.readouterr().err  # the bar, over layers


def test_the_observers_are_gone_after_a_trace():
    model = _load(GOLDEN / "gqa2")
    model.trace(IDS, steps="all")
    t = model.model
    assert t.observer is None and all(l.observer is None and l.attention.observer is None for l in t.layers)


# --- the report names the layer ---------------------------------------------------------------


def perturbed(trace: dict, layer: int, scale: float = 0.1) -> dict:
    """A copy of ``trace`` as an engine whose layer ``layer`` feed-forward is off by noise of ``scale`` times
    the residual stream's RMS (an NMSE of about scale^2 on the layer's output)."""
    t = {k: v.copy() for k, v in trace.items()}
    rng = np.random.default_rng(layer)
    ff = t[f"layers.{layer}.feed_forward"]
    delta = scale * np.sqrt(np.mean(t["hidden_states"][layer + 1] ** 2)) * rng.standard_normal(ff.shape)
    t[f"layers.{layer}.feed_forward"] = ff + delta
    n_layers = t["hidden_states"].shape[0] - 1
    if layer < n_layers - 1:
        t["hidden_states"][layer + 1] += delta
    t["final_layer_output"] += delta  # what follows carries the error on
    return t


@pytest.mark.parametrize("layer", range(4))
def test_perturbing_one_layer_names_it(layer):
    model = _load(DEMO)
    ref = model.trace(IDS, steps="all")
    c = compare_traces(ref, perturbed(ref, layer))
    assert c.first_layer_over == f"layers.{layer}"
    assert c.first_step_over.name == f"layers.{layer}.feed_forward"
    assert c.verdict().startswith(f"first layer over NMSE 1e-04: layers.{layer} ")
    before = c.rows[:c.rows.index(c.first_step_over)]  # the embeddings and every earlier step are untouched
    assert before and all(r.nmse == 0 for r in before)
    # below the threshold nothing is named; a lower threshold names it again
    small = compare_traces(ref, perturbed(ref, layer, 1e-3))
    assert small.first_layer_over is None and small.verdict().startswith("no layer over NMSE 1e-04")
    assert compare_traces(ref, perturbed(ref, layer, 1e-3), threshold=1e-8).first_layer_over == f"layers.{layer}"


def test_cli_trace_then_compare_names_the_perturbed_layer(tmp_path, capsys):
    ref, other = tmp_path / "ref.npz", tmp_path / "other.npz"
    ids = " ".join(map(str, IDS))
    assert main(["trace", "--model", str(DEMO), "--ids", ids, "--out", str(ref), "--steps", "all",
                 "--dtype", "float64"]) == 0
    assert "wrote" in capsys.readouterr().err
    with np.load(ref) as z:
        np.savez(other, **perturbed({k: z[k] for k in z.files}, 2))
    assert main(["compare", "--reference", str(ref), "--trace", str(other)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert re.match(r"first layer over NMSE 1e-04: layers\.2 \(NMSE [\d.e+-]+, first step over: "
                    r"layers\.2\.feed_forward", lines[-1])
    assert any(l.startswith("layers.1.q ") for l in lines) and any(l.startswith("logits ") for l in lines)
    # computed on the spot from --model (float64 by default), and as JSON
    assert main(["compare", "--model", str(DEMO), "--trace", str(other), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["first_layer_over"] == "layers.2" and out["first_step_over"] == "layers.2.feed_forward"
    assert {r["name"] for r in out["rows"]} >= {"tok_embeddings", "layers.0.q", "layers.3", "norm", "logits"}
    assert main(["compare", "--model", str(DEMO), "--trace", str(ref)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("no layer over NMSE 1e-04")


def test_a_nan_in_the_other_trace_counts_as_over():
    model = _load(DEMO)
    ref = model.trace(IDS)
    other = {k: v.copy() for k, v in ref.items()}
    other["hidden_states"][2, 3, 5] = np.nan
    c = compare_traces(ref, other)
    assert c.first_layer_over == "layers.1"
    assert json.loads(json.dumps(c.to_dict()))["rows"][2]["nmse"] is None  # JSON without NaN / Infinity


def test_without_final_layer_output_the_last_layer_is_judged_after_the_norm():
    """An HF-made trace (hidden_states only) still gets every layer judged."""
    model = _load(DEMO)
    ref = model.trace(IDS)
    hf_like = {"ids": ref["ids"], "hidden_states": ref["hidden_states"].copy()}
    hf_like["hidden_states"][-1] *= 1.1
    c = compare_traces(ref, hf_like)
    assert c.first_layer_over == "layers.3" and c.rows[-1].source == "hidden_states[4]"
    assert "only in reference: final_layer_output, logits" in c.format()


# --- bad input --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_trace():
    return _load(DEMO).trace(IDS, steps="all")


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.update({"layers.1.q": t["layers.1.q"][:, :4]}), r"array layers\.1\.q has shape \(10, 4, 16\)"),
    (lambda t: t.update({"logits": t["logits"][:, :10]}), r"array logits has shape"),
    (lambda t: t.update({"layers.0.k": t["layers.0.k"].reshape(10, 2, 32)}),
     r"array layers\.0\.k has shape \(10, 2, 32\), the reference's \(10, 4, 16\)"),
    (lambda t: t.update({"layers.0.qq": t["layers.0.q"]}), r"unknown array 'layers\.0\.qq'"),
    (lambda t: t.update({"layers.9.q": t["layers.0.q"]}), r"array layers\.9\.q is beyond the 4 layers"),
    (lambda t: t.update({"hidden_states": t["hidden_states"][:3]}), r"array hidden_states has shape \(3, 10, 128\)"),
    (lambda t: t.update({"hidden_states": t["hidden_states"][:, :5]}), r"hidden_states must be \(n_layers \+ 1, n, dim\)"),
    (lambda t: t.update({"ids": t["ids"] + 1}), r"array ids differs from the reference's at position 0"),
    (lambda t: t.pop("hidden_states"), r"missing array\(s\) hidden_states"),
    (lambda t: t.update({"layers.2.v": t["layers.2.v"].astype(np.int32)}), r"array layers\.2\.v must be floating"),
    (lambda t: t.update({"final_layer_output": t["final_layer_output"][None]}), r"array final_layer_output has shape"),
])
def test_mismatched_arrays_are_input_errors_naming_the_array(demo_trace, edit, message):
    other = dict(demo_trace)
    edit(other)
    with pytest.raises(InputError, match=message):
        compare_traces(demo_trace, other)


def test_cli_errors_are_one_line_and_status_2(tmp_path, capsys, demo_trace):
    bad = tmp_path / "bad.npz"
    np.savez(bad, **{**demo_trace, "layers.0.k": demo_trace["layers.0.k"][:, :1]})
    ref = tmp_path / "ref.npz"
    np.savez(ref, **demo_trace)
    cases = [["compare", "--reference", str(ref), "--trace", str(bad)],
             ["compare", "--reference", str(ref), "--trace", str(tmp_path / "missing.npz")],
             ["compare", "--reference", str(ref), "--trace", str(ref), "--threshold", "-1"],
             ["compare", "--reference", str(ref), "--trace", str(ref), "--logits", str(ref)],
             ["compare", "--reference", str(ref), "--trace", str(ref), "--model", str(DEMO)],
             ["compare", "--model", str(DEMO), "--trace", str(ref), "--ids", "1 2"],
             ["trace", "--model", str(DEMO), "--ids", "1 5000", "--out", str(tmp_path / "t.npz")],
             ["trace", "--model", str(DEMO), "--ids", "1 2", "--out", str(tmp_path / "t.npy")]]
    for argv in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("llama2np: error: "), err
    assert "layers.0.k" in main_err(["compare", "--reference", str(ref), "--trace", str(bad)], capsys)
    assert not (tmp_path / "t.npz").exists() and not list(tmp_path.glob(".t.npz*"))


def main_err(argv, capsys) -> str:
    main(argv)
    return capsys.readouterr().err


def test_api_argument_errors():
    model = _load(DEMO)
    with pytest.raises(InputError, match="steps must be"):
        model.trace(IDS, steps="some")
    with pytest.raises(InputError, match="dtype must be"):
        model.trace(IDS, dtype="int8")
    with pytest.raises(InputError, match="one sequence"):
        model.trace([IDS, IDS])
    with pytest.raises(InputError, match="threshold must be a positive number"):
        model.compare_trace({"ids": np.array(IDS)}, threshold=float("nan"))
    with pytest.raises(InputError, match=r"other: array ids: token id 5000 is outside"):
        model.compare_trace({"ids": np.array([1, 5000]), "hidden_states": np.zeros((5, 2, 128))})


def test_a_truncated_trace_file_is_an_input_error(tmp_path, demo_trace):
    path = tmp_path / "t.npz"
    np.savez(path, **demo_trace)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=str(path)):
        compare_traces(demo_trace, path)
    with zipfile.ZipFile(tmp_path / "odd.npz", "w") as zf:
        zf.writestr("ids.npy", b"not an npy")
        zf.writestr("hidden_states.npy", b"")
    with pytest.raises(InputError, match=r"odd\.npz: array ids must be a non-empty 1-D integer array"):
        compare_traces(demo_trace, tmp_path / "odd.npz")


def test_trace_runs_as_a_module_from_the_shell(tmp_path):
    out = tmp_path / "t.npz"
    r = subprocess.run([sys.executable, "-m", "llama2np", "trace", "--model", str(DEMO), "--prompt", "Once upon",
                        "--out", str(out)], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr
    with np.load(out) as z:
        assert z["ids"][0] == 1 and z["hidden_states"].shape[0] == 5


# --- tensor parallelism ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_running():
    """Ray for the tensor-parallel tests: the session's cluster when test_distributed started one, else a
    local one of two nodes for this module (shut down after it)."""
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        yield
        return
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    cluster.add_node(num_cpus=2)
    ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
    cluster.wait_for_nodes()
    yield
    ray.shutdown()
    cluster.shutdown()


def test_tensor_parallel_driver_assembles_the_hidden_trace_and_refuses_steps(ray_running, tmp_path):
    path = GOLDEN / "layouts" / "meta_2shard_fp32"
    tp = Llama2.from_pretrained(path, dtype="float64", tensor_parallel=2)
    try:
        got, want = tp.trace(IDS), _load(path).trace(IDS)
        assert set(got) == set(want)
        for name in want:
            assert float(np.abs(got[name] - want[name]).max()) <= 1e-12, name
        assert tp.compare_trace(tp.trace(IDS, out=tmp_path / "t.npz")).first_layer_over is None
        with pytest.raises(InputError, match=r'steps="all" needs q, k and v, which tensor-parallel actors'):
            tp.trace(IDS, out=tmp_path / "u.npz", steps="all")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["t.npz"]  # nothing half-written left
    finally:
        tp.model.close()


# --- docs/trace.md's worked example runs as written ------------------------------------------


def test_docs_worked_example_finds_the_rope_bug_at_layer_0_q(monkeypatch, capsys):
    doc = (REPO / "docs" / "trace.md").read_text(encoding="utf-8")
    section = doc[doc.index("## Worked example"):]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 2 and "weights/demo" in blocks[0]
    monkeypatch.chdir(REPO)
    namespace: dict = {}
    for block in blocks:  # one session, as a reader would type them
        exec(compile(block, "docs/trace.md", "exec"), namespace)
    good, bad = namespace["good"], namespace["bad"]
    assert good.first_layer_over is None
    assert bad.first_layer_over == "layers.0" and bad.first_step_over.name == "layers.0.q"
    rows = {r.name: r for r in bad.rows}
    assert rows["layers.0.attention_norm"].nmse < 1e-20 and rows["layers.0.v"].nmse < 1e-20
    printed = capsys.readouterr().out.splitlines()
    assert printed == [good.verdict(), bad.verdict()]
    assert bad.verdict().split(" (NMSE")[0] in section  # the doc shows the verdict it gets
    for line in bad.format().splitlines()[5:8]:  # and the first rows of the table
        assert line in section, line
    # the "correct" engine really is Meta's forward pass: its logits are llama2np's
    np.testing.assert_allclose(namespace["engine"](namespace["ids"])["logits"],
                               namespace["reference"].logits(namespace["ids"]), rtol=0, atol=1e-12)


def test_docs_reorder_formulas_invert_each_other_and_match_the_hf_golden():
    """docs/trace.md's rotate-half <-> interleaved formulas, applied to gqa2's HF-derived q (stored in
    Meta's layout by the golden script), round-trip, and rotating the HF layout by halves gives it."""
    with np.load(GOLDEN / TRACES["gqa2"]["trace"]) as z:
        meta_q = z["layers.1.q"]
    n, heads, head_dim = meta_q.shape
    hf = meta_q.reshape(n, heads, head_dim // 2, 2).swapaxes(2, 3).reshape(n, heads, head_dim)
    back = hf.reshape(n, heads, 2, head_dim // 2).swapaxes(2, 3).reshape(n, heads, head_dim)
    np.testing.assert_array_equal(back, meta_q)
    np.testing.assert_array_equal(hf[..., :head_dim // 2], meta_q[..., 0::2])  # real parts first
    doc = (REPO / "docs" / "trace.md").read_text(encoding="utf-8")
    assert "hf.reshape(n, heads, 2, head_dim // 2).swapaxes(2, 3).reshape(n, heads, head_dim)" in doc
    assert "meta.reshape(n, heads, head_dim // 2, 2).swapaxes(2, 3).reshape(n, heads, head_dim)" in doc


def test_an_array_whose_header_promises_more_than_the_file_holds_is_refused_before_allocating(tmp_path, demo_trace):
    path = tmp_path / "huge.npz"
    header = {"descr": "<f8", "fortran_order": False, "shape": (5, 10**9, 10**6)}
    with zipfile.ZipFile(path, "w") as zf:
        with zf.open("ids.npy", "w") as f:
            np.lib.format.write_array(f, demo_trace["ids"])
        with zf.open("hidden_states.npy", "w") as f:
            np.lib.format.write_array_header_1_0(f, header)
            f.write(b"\0" * 64)
    with pytest.raises(InputError, match=r"array hidden_states is truncated: its header says \(5, 1000000000"):
        compare_traces(demo_trace, path)


def test_bench_trace_runs_on_the_demo_model():
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "bench" / "bench_trace.py"), "--model", str(DEMO),
                           "--tokens", "8"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    modes = [line.split()[0] for line in proc.stdout.splitlines()[1:]]
    assert modes == ["logits", "file", "memory"] and "peak RSS" in proc.stdout and "MiB" in proc.stdout
