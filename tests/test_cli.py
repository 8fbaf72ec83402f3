"""The command line: exit codes, one-line errors, default model, streaming output, dumps."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import shared_path
from llama2np import InputError, Llama2
from llama2np.cli.commands import find_default_model, main
from test_drafting import REPEAT
from tiny_model import tiny_args, tiny_state, train_tokenizer, write_llama2c


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory) -> tuple[Path, Path]:
    """A random llama2.c checkpoint and a matching tokenizer, no real-weight test data needed."""
    d = tmp_path_factory.mktemp("tiny")
    tok = train_tokenizer(d)
    import sentencepiece
    vocab = sentencepiece.SentencePieceProcessor(model_file=str(tok)).vocab_size()
    return write_llama2c(d / "tiny.bin", tiny_args(vocab), tiny_state(tiny_args(vocab))), tok


@pytest.fixture(scope="module")
def stories_args() -> list[str]:
    return ["--model", str(shared_path("stories260K", "stories260K.bin")),
            "--tokenizer", str(shared_path("stories260K", "tok512.model"))]


def run_cli(*argv: str, stdin: str | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llama2np", *argv], input=stdin, capture_output=True, text=True,
                          cwd=cwd, timeout=120)


class Recorder:
    """A stdout that remembers every write, to see that text arrives in pieces."""

    def __init__(self):
        self.writes: list[str] = []

    def write(self, s: str) -> int:
        self.writes.append(s)
        return len(s)

    def flush(self) -> None:
        pass


@pytest.mark.parametrize("argv, match", [
    (["generate", "--bogus"], "unrecognized arguments: --bogus"),
    (["generate", "--temperature", "warm"], "invalid float value"),
    (["frobnicate"], "invalid choice"),
    ([], "choose a command"),
    (["logits", "--out", "x.npy"], "one of the arguments --prompt --ids --prompts is required"),
])
def test_usage_errors_are_one_line_exit_2(argv, match, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and match in err and err.count("\n") == 1


def test_missing_model_is_one_line_exit_2(tmp_path):
    r = run_cli("generate", "--model", str(tmp_path / "nope"), "--prompt", "hi")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and "nope: no such file or directory" in r.stderr


def test_no_model_anywhere_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("llama2np.cli.commands.PACKAGE_ROOT", tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main(["generate", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert "no --model given" in err and err.count("\n") == 1


@pytest.mark.parametrize("command, option", [("generate", "--max-new-tokens"), ("chat", "--system"),
                                             ("perplexity", "--file"), ("logits", "--dtype")])
def test_help(command, option, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and option in out and "--model" in out and "default" in out


def test_default_model_choice(tmp_path):
    w = tmp_path / "weights"
    (w / "demo").mkdir(parents=True)
    with pytest.raises(InputError, match="no --model"):
        find_default_model([w])
    (w / "demo" / "params.json").write_text("{}")
    (w / "tokenizer.model").write_bytes(b"")
    (w / "README.md").write_text("")
    assert find_default_model([w])[0] == w / "demo"
    (w / "llama-2-7b").mkdir()
    (w / "llama-2-7b" / "consolidated.00.pth").write_bytes(b"")
    path, why = find_default_model([w])
    assert path == w / "llama-2-7b" and "llama-2-7b" in why
    (w / "stories.bin").write_bytes(b"")
    path, why = find_default_model([w])
    assert path == w / "demo" and "several checkpoints" in why


def test_default_model_is_announced_on_stderr(tiny_files, tmp_path):
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "mine.bin").symlink_to(tiny_files[0])
    r = run_cli("generate", "--tokenizer", str(tiny_files[1]), "--prompt", "once upon", "--max-new-tokens", "5",
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "using weights/mine.bin" in r.stderr and "tokens/s" in r.stderr
    assert r.stdout.startswith("once upon")


def test_generate_streams_the_text(tiny_files, monkeypatch, capsys):
    model, tok = map(str, tiny_files)
    rec = Recorder()
    monkeypatch.setattr(sys, "stdout", rec)
    assert main(["generate", "--model", model, "--tokenizer", tok, "--prompt", "the llama", "--max-new-tokens",
                 "12", "--temperature", "1", "--seed", "4"]) == 0
    expected = Llama2.from_pretrained(model, tokenizer_path=tok).generate(
        "the llama", max_new_tokens=12, temperature=1.0, seed=4)
    assert "".join(rec.writes) == "the llama" + expected + "\n"
    assert len([w for w in rec.writes if w]) > 3  # printed piece by piece
    err = capsys.readouterr().err
    assert "prompt:" in err and "generation: 12 tokens" in err and "tokens/s" in err


def test_generate_stories260k_greedy(stories_args):
    r = run_cli("generate", *stories_args, "--temperature", "0", "--max-new-tokens", "200")
    assert r.returncode == 0, r.stderr
    assert r.stdout == shared_path("reference", "stories260K_greedy_200.txt").read_text() + "\n"
    assert "generation: 200 tokens" in r.stderr


def test_context_limit_warns_and_too_long_prompt_fails(stories_args):
    r = run_cli("generate", *stories_args, "--prompt", "Once upon a time", "--max-seq-len", "9")
    assert r.returncode == 0 and "warning: generation stopped at the context length 9" in r.stderr
    r = run_cli("generate", *stories_args, "--prompt", "Once upon a time, there was", "--max-seq-len", "4")
    assert r.returncode == 2 and "context length 4" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("generate", *stories_args, "--top-p", "1.5")
    assert r.returncode == 2 and "top_p must be in (0, 1]" in r.stderr


def test_chat_session_ends_cleanly_at_eof(stories_args):
    r = run_cli("chat", *stories_args, "--system", "You tell stories.", "--max-new-tokens", "20", "--seed", "1",
                stdin="Hello!\n\nTell me about a cat.\n")
    assert r.returncode == 0 and "Traceback" not in r.stderr
    assert "> Hello!" in r.stdout and "> Tell me about a cat." in r.stdout
    assert r.stderr.count("generation:") == 2  # one answer per user message; the empty line is skipped


def test_logits_dump(tiny_files, tmp_path):
    model, tok = map(str, tiny_files)
    llama = Llama2.from_pretrained(model, tokenizer_path=tok, dtype="float64")
    assert main(["logits", "--model", model, "--tokenizer", tok, "--ids", "1 5 9", "--dtype", "float64",
                 "--out", str(tmp_path / "l.npy")]) == 0
    got = np.load(tmp_path / "l.npy")
    assert got.dtype == np.float64 and got.shape == (3, llama.args.vocab_size)
    np.testing.assert_array_equal(got, llama.logits([1, 5, 9]))
    assert main(["logits", "--model", model, "--tokenizer", tok, "--prompt", "the cat", "--out",
                 str(tmp_path / "l.npz")]) == 0
    z = np.load(tmp_path / "l.npz")
    assert z["ids"].tolist() == llama.tokenizer.encode("the cat") and z["logits"].dtype == np.float32
    assert main(["logits", "--model", model, "--ids", "1 x", "--out", str(tmp_path / "l.npy")]) == 2
    assert main(["logits", "--model", model, "--ids", "1", "--out", str(tmp_path / "l.txt")]) == 2


def test_perplexity_command(tiny_files, tmp_path, capsys):
    model, tok = map(str, tiny_files)
    text = tmp_path / "t.txt"
    text.write_text("once upon a time there was a little llama . " * 10)
    assert main(["perplexity", "--model", model, "--tokenizer", tok, "--file", str(text), "--window", "32"]) == 0
    out, err = capsys.readouterr()
    expected = Llama2.from_pretrained(model, tokenizer_path=tok).perplexity(text.read_text(), window=32)
    assert f"perplexity {expected:.4f}" in out and "tokens/s" in err
    assert main(["perplexity", "--model", model, "--file", str(tmp_path / "missing.txt")]) == 2


def test_cli_prompt_lookup_and_draft_model_print_the_same_text_and_their_counts(capsys):
    from llama2np.cli.commands import main
    bin_, tok = shared_path("stories260K", "stories260K.bin"), shared_path("stories260K", "tok512.model")
    base = ["generate", "--model", str(bin_), "--tokenizer", str(tok), "--prompt", REPEAT, "--temperature", "0",
            "--max-new-tokens", "40"]
    assert main(base) == 0
    plain_out = capsys.readouterr().out
    for extra in (["--prompt-lookup", "2", "--num-draft", "3"], ["--draft-model", str(bin_)]):
        assert main(base + extra) == 0
        out, err = capsys.readouterr()
        assert out == plain_out and "forward passes" in err and "tokens/pass" in err and "accepted" in err
    assert main(base + ["--num-draft", "2"]) == 2
    assert "num_draft needs a drafter" in capsys.readouterr().err


def test_cli_flags_reach_the_sampler(tmp_path, capsys):
    from tiny_model import tiny_args, tiny_state, write_llama2c
    path = write_llama2c(tmp_path / "m.bin", tiny_args(), tiny_state(tiny_args()))
    assert main(["generate", "--model", str(path), "--min-p", "2"]) == 2
    assert "error: min_p must be in [0, 1]" in capsys.readouterr().err
    assert main(["generate", "--model", str(path), "--repetition-penalty", "-1"]) == 2
    assert "error: repetition_penalty" in capsys.readouterr().err
    assert main(["generate", "--model", str(path), "--logit-bias", "x=1"]) == 2
    assert "--logit-bias takes TOKEN_ID=BIAS" in capsys.readouterr().err


