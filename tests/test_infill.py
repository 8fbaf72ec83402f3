"""CodeLlama's fill-in-the-middle: Meta's prompt layout token for token, the stop at <EOT>, the CLI.

The tokenizer is Llama 2's (../shared) with 16 pieces appended, as CodeLlama's has 32016:
the four infilling pieces at CodeLlama's ids 32007-32010, the others placeholders. The
model is the CodeLlama-shaped random model of tests/golden/rope (vocab 32016, rope_theta 1e6).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import shared_path

from llama2np import GenerationConfig, Llama2
from llama2np.errors import InputError
from llama2np.generation.infill import decode_infilling, encode_infilling, infill_tokens, infilling_prompt
from llama2np.model.args import ModelArgs
from llama2np.testing.synthetic import seeded_source, write_hf
from llama2np.tokenizer import Tokenizer

FIM = {32007: "▁<PRE>", 32008: "▁<SUF>", 32009: "▁<MID>", 32010: "▁<EOT>"}
ROOT = Path(__file__).resolve().parents[1]


def codellama_tokenizer(path: Path) -> Path:
    """Llama 2's tokenizer.model grown to 32016 pieces with the infilling pieces at CodeLlama's ids."""
    pb = pytest.importorskip("sentencepiece.sentencepiece_model_pb2")
    model = pb.ModelProto()
    model.ParseFromString(shared_path("llama2-tokenizer", "tokenizer.model").read_bytes())
    assert len(model.pieces) == 32000
    for i in range(32000, 32016):
        model.pieces.add(piece=FIM.get(i, f"<codellama_unused_{i}>"), score=0.0,
                         type=pb.ModelProto.SentencePiece.USER_DEFINED)
    path.write_bytes(model.SerializeToString())
    return path


@pytest.fixture(scope="module")
def codellama(tmp_path_factory) -> Path:
    """The CodeLlama-shaped model (HF layout) with its tokenizer.model beside it."""
    root = tmp_path_factory.mktemp("codellama")
    import numpy as np

    data = np.load(ROOT / "tests" / "golden" / "rope" / "codellama.npz")
    meta = json.loads(str(data["meta"]))
    write_hf(root, ModelArgs(**meta["args"]), seeded_source(meta["seed"]), "float32")
    (root / "config.json").write_text(json.dumps(meta["config_json"]))
    codellama_tokenizer(root / "tokenizer.model")
    return root


@pytest.fixture(scope="module")
def tok(codellama) -> Tokenizer:
    return Tokenizer(codellama / "tokenizer.model")


def test_infilling_tokens_at_codellamas_ids(tok):
    t = infill_tokens(tok)
    assert (tok.vocab_size, t.prefix, t.suffix, t.middle, t.end) == (32016, 32007, 32008, 32009, 32010)


def test_prompt_is_metas_layout(tok):
    """Meta's rule, written down: BOS <PRE> encode(prefix) <SUF> encode_infilling(suffix) <MID>.
    encode puts sentencepiece's leading space on the prefix ("▁def"); encode_infilling leaves it off the
    suffix ("return", not "▁return"). suffix_first: BOS <PRE> <SUF> suffix <MID> prefix."""
    prefix, suffix = "def add(a, b):\n    ", "return a + b\n"
    pre = ["▁def", "▁add", "(", "a", ",", "▁b", "):", "<0x0A>", "▁▁▁▁"]
    suf = ["return", "▁a", "▁+", "▁b", "<0x0A>"]
    ids = [tok.sp.PieceToId(p) for p in pre], [tok.sp.PieceToId(p) for p in suf]
    assert ids == ([822, 788, 29898, 29874, 29892, 289, 1125, 13, 268], [2457, 263, 718, 289, 13])
    assert infilling_prompt(tok, prefix, suffix) == [1, 32007] + ids[0] + [32008] + ids[1] + [32009]
    assert infilling_prompt(tok, prefix, suffix, suffix_first=True) == [1, 32007, 32008] + ids[1] + [32009] + ids[0]
    assert encode_infilling(tok, suffix) == ids[1] != tok.encode(suffix, bos=False)
    # an empty suffix, a suffix starting with spaces: still what "☺" + text encodes to, less its two ids
    assert encode_infilling(tok, "") == []
    assert [tok.sp.IdToPiece(i) for i in encode_infilling(tok, "  x")] == ["▁", "▁x"]


def test_middle_keeps_its_leading_space(tok):
    ids = [tok.sp.PieceToId("▁return"), tok.sp.PieceToId("▁a")]
    assert decode_infilling(tok, ids) == " return a"
    assert tok.decode(ids) == "return a"  # what plain decoding would give


def test_infill_generates_until_eot(codellama, tok):
    model = Llama2.from_pretrained(codellama)
    prefix, suffix = "def add(a, b):\n    ", "return a + b\n"
    prompt = infilling_prompt(tok, prefix, suffix)
    expected = model.generate(prompt, max_new_tokens=12, temperature=0, reuse_cache=False)
    assert model.infill(prefix, suffix, max_new_tokens=12, temperature=0) == decode_infilling(tok, expected)
    # <EOT> ends the middle; EOS does not (as in Meta's text_infilling)
    assert model.infill(prefix, suffix, max_new_tokens=12, temperature=0, logit_bias={32010: 100.0}) == ""
    assert model.last_stats.new_tokens <= 1
    model.infill(prefix, suffix, max_new_tokens=5, temperature=0, logit_bias={2: 100.0})
    assert model.last_stats.new_tokens == 5
    greedy = model.generate(prompt + [2], max_new_tokens=4, temperature=0, logit_bias={2: 100.0})
    assert greedy == []  # plain generation does stop at EOS


def test_infill_options(codellama):
    """A config and logprobs give the same middle; echo (the prompt first) is not for infilling."""
    model = Llama2.from_pretrained(codellama)
    prefix, suffix = "def add(a, b):\n    ", "return a + b\n"
    middle = model.infill(prefix, suffix, max_new_tokens=6, temperature=0)
    config = GenerationConfig(max_new_tokens=6, temperature=0, logprobs=True)
    assert model.infill(prefix, suffix, config=config) == middle
    with pytest.raises(InputError, match="echo=True"):
        model.infill(prefix, suffix, echo=True)


def test_a_vocabulary_without_infilling_tokens(tmp_path):
    model = Llama2.from_pretrained(shared_path("stories260K", "stories260K.bin"),
                                   tokenizer_path=shared_path("stories260K", "tok512.model"))
    with pytest.raises(InputError, match="no infilling token.*▁<PRE>, ▁<SUF>, ▁<MID>, ▁<EOT>"):
        model.infill("def f(", "):")
    run = subprocess.run([sys.executable, "-m", "llama2np", "generate", "--model",
                          str(shared_path("stories260K", "stories260K.bin")), "--tokenizer",
                          str(shared_path("stories260K", "tok512.model")), "--prompt", "a", "--suffix", "b"],
                         capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.count("\n") == 1 and "no infilling token" in run.stderr


def test_cli_generate_suffix(codellama, capsys):
    from llama2np.cli import main

    assert main(["generate", "--model", str(codellama), "--prompt", "def add(a, b):\n    ", "--suffix",
                 "return a + b\n", "--temperature", "0", "--max-new-tokens", "6"]) == 0
    model = Llama2.from_pretrained(codellama)
    middle = model.infill("def add(a, b):\n    ", "return a + b\n", max_new_tokens=6, temperature=0)
    assert capsys.readouterr().out == "def add(a, b):\n    " + middle + "return a + b\n\n"



def test_every_layout_infills_alike(codellama, tok, tmp_path):
    """The same CodeLlama-shaped model as a Meta directory (tokenizer.model beside it) and as a GGUF whose
    vocabulary is embedded: the same prompt ids and the same middle as the HF directory."""
    from test_rope_scaling import write_layout

    meta_dir = write_layout("meta", "codellama", tmp_path / "meta")
    (meta_dir / "tokenizer.model").symlink_to(codellama / "tokenizer.model")
    gguf_file = write_layout("gguf", "codellama", tmp_path / "gguf", tokenizer_model=codellama / "tokenizer.model")
    prefix, suffix = "def add(a, b):\n    ", "return a + b\n"
    want = Llama2.from_pretrained(codellama).infill(prefix, suffix, max_new_tokens=8, temperature=0)
    for path in (meta_dir, gguf_file):
        model = Llama2.from_pretrained(path)
        assert infilling_prompt(model.tokenizer, prefix, suffix) == infilling_prompt(tok, prefix, suffix)
        assert model.infill(prefix, suffix, max_new_tokens=8, temperature=0) == want
