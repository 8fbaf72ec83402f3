"""``logits --prompts``: many prompts into one .npz (ids, offsets, logits, logprobs), streamed to disk."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from llama2np import InputError, Llama2
from llama2np.cli.commands import main
from llama2np.tools.logits_file import read_prompts, write_logits_npz
from tiny_model import tiny_args, tiny_state, train_tokenizer, write_llama2c


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("many")
    tok = train_tokenizer(d)
    import sentencepiece
    vocab = sentencepiece.SentencePieceProcessor(model_file=str(tok)).vocab_size()
    args = tiny_args(vocab)
    return write_llama2c(d / "tiny.bin", args, tiny_state(args)), tok


def write_lines(path: Path, items: list) -> Path:
    path.write_text("\n".join(json.dumps(i) if not isinstance(i, str) or not i.startswith("RAW:") else i[4:]
                              for i in items) + "\n")
    return path


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_many_prompts_one_file(files, tmp_path, dtype, capsys):
    model_path, tok = files
    prompts = write_lines(tmp_path / "p.jsonl", ["once upon a time", {"text": "the llama sang"}, "RAW:",
                                                 {"ids": [1, 5, 9, 33]}, [1, 2, 3], "a"])
    out = tmp_path / "refs.npz"
    assert main(["logits", "--model", str(model_path), "--tokenizer", str(tok), "--prompts", str(prompts),
                 "--out", str(out), "--dtype", dtype]) == 0
    assert "5 prompts" in capsys.readouterr().err
    model = Llama2.from_pretrained(model_path, tokenizer_path=tok, dtype=dtype)
    expected = [model.tokenizer.encode("once upon a time"), model.tokenizer.encode("the llama sang"),
                [1, 5, 9, 33], [1, 2, 3], model.tokenizer.encode("a")]
    with np.load(out) as z:
        assert sorted(z.files) == ["ids", "logits", "logprobs", "offsets"]
        offsets, ids, logits, logprobs = z["offsets"], z["ids"], z["logits"], z["logprobs"]
    assert offsets.tolist() == np.concatenate([[0], np.cumsum([len(e) for e in expected])]).tolist()
    assert logits.dtype == np.dtype(dtype) and logits.shape == (offsets[-1], model.args.vocab_size)
    for p, want in enumerate(expected):
        rows = slice(offsets[p], offsets[p + 1])
        assert ids[rows].tolist() == want
        np.testing.assert_array_equal(logits[rows], model.logits(want))
    z = logits.astype(np.float64)
    here = z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)) - z.max(-1, keepdims=True)
    np.testing.assert_allclose(logprobs, here, atol=1e-5 if dtype == "float32" else 1e-12)


def test_rows_are_streamed(files, tmp_path, monkeypatch):
    """Each prompt's rows reach the file before the next prompt runs (nothing is kept for the end)."""
    model = Llama2.from_pretrained(files[0])
    seen = []
    real = model.logits

    def logits(ids):
        seen.append(Path(tmp_dir[0]).joinpath("logits.npy").stat().st_size if tmp_dir else 0)
        return real(ids)

    import tempfile
    tmp_dir = []
    real_tmp = tempfile.TemporaryDirectory

    class Recording(real_tmp):
        def __enter__(self):
            tmp_dir.append(super().__enter__())
            return tmp_dir[0]

    monkeypatch.setattr(tempfile, "TemporaryDirectory", Recording)
    monkeypatch.setattr(model, "logits", logits)
    prompts = [np.array([1, 2, 3]), np.array([1, 4]), np.array([1, 5, 6, 7])]
    with open(tmp_path / "x.npz", "wb") as f:
        assert write_logits_npz(model, prompts, f) == 9
    row = model.args.vocab_size * 4
    header = seen[0]
    assert [s - header for s in seen] == [0, 3 * row, 5 * row]


@pytest.mark.parametrize("line, match", [
    ("RAW:{not json", "line 1: not JSON"),
    ({"prompt": "x"}, "line 1: expected"),
    ([], "line 1: a prompt is"),
    ([1, True], "line 1: a prompt is"),
    (3, "line 1: a prompt is"),
    ([1, 10 ** 6], "line 1: token id 1000000 is outside"),
])
def test_bad_lines(files, tmp_path, line, match):
    model = Llama2.from_pretrained(files[0], tokenizer_path=files[1])
    path = write_lines(tmp_path / "p.jsonl", [line])
    with pytest.raises(InputError, match=match):
        read_prompts(path, model.tokenizer.encode, model.check_ids)


def test_cli_errors(files, tmp_path, capsys):
    model_path, _ = files
    prompts = write_lines(tmp_path / "p.jsonl", [[1, 2]])
    assert main(["logits", "--model", str(model_path), "--prompts", str(prompts), "--out", str(tmp_path / "x.npy")]) == 2
    assert "one .npz" in capsys.readouterr().err
    empty = write_lines(tmp_path / "e.jsonl", ["RAW:"])
    assert main(["logits", "--model", str(model_path), "--prompts", str(empty), "--out", str(tmp_path / "x.npz")]) == 2
    assert "no prompts" in capsys.readouterr().err
    text = write_lines(tmp_path / "t.jsonl", ["hello"])
    alone = tmp_path / "alone.bin"  # no tokenizer beside this copy
    alone.write_bytes(model_path.read_bytes())
    assert main(["logits", "--model", str(alone), "--prompts", str(text), "--out", str(tmp_path / "x.npz")]) == 2
    assert "line 1: a text prompt needs a tokenizer" in capsys.readouterr().err
    assert not (tmp_path / "x.npz").exists()


def test_compare_refuses_a_many_prompt_file(files, tmp_path):
    model = Llama2.from_pretrained(files[0])
    with open(tmp_path / "m.npz", "wb") as f:
        write_logits_npz(model, [np.array([1, 2]), np.array([1, 3])], f)
    with pytest.raises(InputError, match="holds 2 prompts"):
        model.compare(tmp_path / "m.npz")
