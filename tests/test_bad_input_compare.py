"""``compare``'s .npz of another engine's logits, and its --json output: one InputError per bad file, JSON always."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from bounded import run_bounded
from llama2np import InputError
from llama2np.cli.commands import main
from llama2np.tools.compare import read_logits_npz

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "weights" / "demo"
VOCAB = 16


def good(path: Path) -> Path:
    ids = np.array([1, 5, 7], np.int64)
    np.savez(path, ids=ids, logits=np.random.default_rng(0).standard_normal((3, VOCAB)).astype(np.float32))
    return path


def npy_header_claiming(shape) -> bytes:
    out = io.BytesIO()
    np.lib.format.write_array_header_1_0(out, {"descr": "<f4", "fortran_order": False, "shape": shape})
    return out.getvalue()


def huge_header(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("ids.npy", np_bytes(np.array([1, 2], np.int64)))
        z.writestr("logits.npy", npy_header_claiming((10 ** 7, 10 ** 7)) + bytes(64))
    return path


def np_bytes(a: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, a)
    return out.getvalue()


def truncated(path: Path) -> Path:
    data = good(path).read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def corrupted(path: Path) -> Path:
    data = bytearray(good(path).read_bytes())
    for i in range(200, len(data) - 200, 37):  # inside the members: headers and array bytes
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))
    return path


def npy_named_npz(path: Path) -> Path:
    path.write_bytes(np_bytes(np.zeros((3, VOCAB), np.float32)))
    return path


def zero_d(path: Path) -> Path:
    np.savez(path, ids=np.array(3), logits=np.array(1.0), offsets=np.array(0))
    return path


def empty(path: Path) -> Path:
    path.write_bytes(b"")
    return path


BAD = {"truncated": truncated, "corrupted": corrupted, "a header claiming (1e7, 1e7)": huge_header,
       "an .npy named .npz": npy_named_npz, "an empty file": empty, "0-d arrays": zero_d}


@pytest.mark.parametrize("make", BAD.values(), ids=BAD.keys())
def test_bad_npz_is_one_input_error(tmp_path: Path, make):
    path = make(tmp_path / "other.npz")
    outcome = run_bounded(f"from llama2np.tools.compare import read_logits_npz; "
                          f"read_logits_npz({str(path)!r}, {VOCAB})", timeout=60)
    assert outcome.error == "InputError", outcome.message
    assert str(path) in outcome.message


def test_good_npz_reads(tmp_path: Path):
    ids, logits = read_logits_npz(good(tmp_path / "x.npz"), VOCAB)
    assert ids.tolist() == [1, 5, 7] and logits.shape == (3, VOCAB)
    with pytest.raises(InputError, match="columns"):
        read_logits_npz(tmp_path / "x.npz", VOCAB + 1)


def strict_json(text: str):
    def refuse(name):
        raise AssertionError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_compare_json_is_json_even_for_one_position(capsys):
    """One token: no next token to predict, so both perplexities are undefined: null, not NaN."""
    assert main(["compare", "--model", str(DEMO), "--other-quantize", "int8", "--ids", "1", "--json"]) == 0
    result = strict_json(capsys.readouterr().out)
    summary = next(iter(result["results"].values()))["summary"]
    assert summary["perplexity_ref"] is None and summary["positions"] == 1
