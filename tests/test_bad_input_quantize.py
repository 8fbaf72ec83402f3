"""``quantize`` and llama2np's int8 checkpoints: the output is complete or absent, a failed write is one
InputError, --out is checked before the model loads, and damaged int8 files are refused by name."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from llama2np import CheckpointError, ConfigError, InputError, Llama2
from llama2np.cli.commands import main
from llama2np.loaders import int8_writer
from llama2np.loaders.int8_writer import quantize_checkpoint

GOLDEN = Path(__file__).resolve().parent / "golden"
SOURCE = GOLDEN / "gqa2"


@pytest.fixture(scope="module")
def int8_dir(tmp_path_factory) -> Path:
    return quantize_checkpoint(SOURCE, tmp_path_factory.mktemp("q") / "int8")


def test_gguf_vocabulary_is_carried_as_a_tokenizer(tmp_path: Path):
    gguf = pytest.importorskip("gguf")  # noqa: F841
    from llama2np.testing import gguf_export as ge

    tokenizer = Path(__file__).resolve().parents[1] / "weights" / "demo" / "tokenizer.model"
    h = ge.HParams(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, hidden_dim=64, vocab_size=1024, context_length=32)
    types, produce = ge.synthetic(h, "F32")
    path = ge.write_gguf(tmp_path / "m.gguf", h, types, produce, tokenizer_model=tokenizer)
    source = Llama2.from_pretrained(path)
    out = quantize_checkpoint(path, tmp_path / "int8")
    assert (out / "tokenizer.model").is_file()
    again = Llama2.from_pretrained(out)
    text = "once upon a time"
    assert again.tokenizer.encode(text) == source.tokenizer.encode(text)


def test_interrupted_quantize_leaves_nothing(tmp_path: Path, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("safetensors.numpy.save_file", interrupt)
    with pytest.raises(KeyboardInterrupt):
        quantize_checkpoint(SOURCE, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    assert quantize_checkpoint(SOURCE, tmp_path / "out").is_dir()  # a rerun is not refused


@pytest.mark.parametrize("failure", ["disk full", "write error"])
def test_failed_write_is_one_input_error_and_leaves_nothing(tmp_path: Path, monkeypatch, failure):
    from safetensors import SafetensorError

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half")
        if failure == "disk full":
            raise SafetensorError("Error while serializing: IoError(No space left on device (os error 28))")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("safetensors.numpy.save_file", full)
    assert main(["quantize", "--model", str(SOURCE), "--out", str(tmp_path / "out")]) == 2
    assert list(tmp_path.iterdir()) == []


def test_out_under_a_file_is_refused_before_loading(tmp_path: Path, monkeypatch, capsys):
    (tmp_path / "file").write_text("x")
    monkeypatch.setattr(int8_writer, "load_checkpoint", lambda *a, **k: pytest.fail("the model was loaded"))
    assert main(["quantize", "--model", str(SOURCE), "--out", str(tmp_path / "file" / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a file, not a directory" in err[0]


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_unwritable_out_is_refused_before_loading(tmp_path: Path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    monkeypatch.setattr(int8_writer, "load_checkpoint", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(InputError, match="no permission to write"):
        quantize_checkpoint(SOURCE, locked / "out")


def test_requantizing_an_int8_checkpoint_copies_it(int8_dir: Path, tmp_path: Path):
    again = quantize_checkpoint(int8_dir, tmp_path / "again")
    ids = [1, 17, 93, 4, 56]
    np.testing.assert_array_equal(Llama2.from_pretrained(again).logits(ids), Llama2.from_pretrained(int8_dir).logits(ids))


# --- damaged int8 checkpoints -------------------------------------------------------------------


def rewrite(src: Path, out: Path, change) -> Path:
    """A copy of int8 checkpoint ``src`` whose tensors are ``change(dict of arrays)``."""
    from safetensors.numpy import save_file

    from llama2np.loaders.safetensors_file import open_safetensors

    out.mkdir()
    (out / "llama2np.json").write_text((src / "llama2np.json").read_text())
    tensors = {n: np.array(f()) for n, f in open_safetensors(src / "model.int8.safetensors").items()}
    save_file({n: np.ascontiguousarray(a) for n, a in change(tensors).items()}, str(out / "model.int8.safetensors"))
    return out


NAME = "layers.0.attention.wq.weight"
DAMAGE = {
    "int8 scales": (lambda t: {**t, NAME + ".scale": t[NAME + ".scale"].astype(np.int8)}, CheckpointError,
                    "scales must be float"),
    "a NaN scale": (lambda t: {**t, NAME + ".scale": np.where(np.arange(len(t[NAME + ".scale"])) == 2, np.nan,
                                                               t[NAME + ".scale"]).astype(np.float32)},
                    CheckpointError, "NaN, infinite or negative (the first at row 2)"),
    "a stray bogus.scale": (lambda t: {**t, "bogus.scale": np.ones(3, np.float32)}, ConfigError,
                            "unused: bogus.scale"),
    "an int8 embedding with scales": (lambda t: {**t, "tok_embeddings.weight": t[NAME][:0].copy(),
                                                  "tok_embeddings.weight.scale": np.ones(0, np.float32)},
                                      CheckpointError, "only weight matrices are quantized"),
}


@pytest.mark.parametrize("change, error, phrase", DAMAGE.values(), ids=DAMAGE.keys())
def test_damaged_int8_checkpoint(int8_dir: Path, tmp_path: Path, change, error, phrase):
    bad = rewrite(int8_dir, tmp_path / "bad", change)
    with pytest.raises(error, match=str(bad)) as e:
        Llama2.from_pretrained(bad).logits([1, 2, 3])
    assert phrase in str(e.value)


def test_int8_embedding_without_scales(int8_dir: Path, tmp_path: Path):
    bad = rewrite(int8_dir, tmp_path / "bad",
                  lambda t: {**t, "tok_embeddings.weight": np.clip(t["tok_embeddings.weight"], -1, 1).astype(np.int8)})
    with pytest.raises(CheckpointError, match=rf"{bad}.*tok_embeddings.weight.*int8"):
        Llama2.from_pretrained(bad).logits([1, 2, 3])


def test_int8_config_params_of_numpy_ints_round_trip(int8_dir: Path):
    params = json.loads((int8_dir / "llama2np.json").read_text())["params"]
    assert all(type(v) in (int, float, type(None)) for v in params.values())
