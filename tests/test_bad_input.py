"""Bad input from a caller or a command line: a clear error naming the problem, never a traceback.

Each row: the input, the error class (API) or exit status (CLI), and a phrase the message must hold.
Uses the demo model in weights/demo and a tokenizer-less tiny llama2.c file; nothing outside the repo.
"""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import DEMO, REPO
from llama2np import InputError, Llama2
from llama2np.generation.chat import dialog_tokens, fit_dialog
from llama2np.cli.commands import main
from tiny_model import tiny_args, tiny_state, write_llama2c



@pytest.fixture(scope="module")
def no_tokenizer(tmp_path_factory) -> Path:
    """A llama2.c checkpoint with no tokenizer anywhere near it."""
    d = tmp_path_factory.mktemp("notok")
    return write_llama2c(d / "model.bin", tiny_args(64), tiny_state(tiny_args(64)))


# --- the Python API ----------------------------------------------------------------------------

API_CASES = [
    ("generate stop=5", lambda m: m.generate("Once", stop=5), InputError, "stop must be a str"),
    ("generate a lone surrogate", lambda m: m.generate("a\ud800"), InputError, "lone surrogate U+D800"),
    ("chat a lone surrogate", lambda m: m.chat([{"role": "user", "content": "hi \udcff"}]), InputError,
     "message 0 is not valid Unicode"),
    ("encode a lone surrogate", lambda m: m.tokenizer.encode("\udfff"), InputError, "not valid Unicode"),
    ("perplexity window=2.5", lambda m: m.perplexity("Once upon a time", window=2.5), InputError,
     "window must be an int"),
    ("perplexity stride='2'", lambda m: m.perplexity("Once upon a time", stride="2"), InputError,
     "stride must be an int"),
    ("perplexity window=0", lambda m: m.perplexity("Once upon a time", window=0), InputError,
     "window must be in [2,"),
    ("perplexity stride=0", lambda m: m.perplexity("Once upon a time there", window=4, stride=0), InputError,
     "stride must be in [1,"),
    ("decode strs", lambda m: m.tokenizer.decode(["a"]), InputError, "int token ids, got str 'a'"),
    ("decode an int", lambda m: m.tokenizer.decode(5), InputError, "list of int token ids"),
    ("encode bytes", lambda m: m.tokenizer.encode(b"hi"), InputError, "encode takes a str"),
    ("from_pretrained(None)", lambda m: Llama2.from_pretrained(None), InputError, "path must be a str"),
    ("tokenizer_path=5", lambda m: Llama2.from_pretrained(DEMO, tokenizer_path=5), InputError, "tokenizer_path"),
    ("max_seq_len=0", lambda m: Llama2.from_pretrained(DEMO, max_seq_len=0), InputError,
     "max_seq_len must be a positive integer"),
    ("max_seq_len=2.5", lambda m: Llama2.from_pretrained(DEMO, max_seq_len=2.5), InputError, "max_seq_len"),
    ("dtype=None", lambda m: Llama2.from_pretrained(DEMO, dtype=None), InputError, "dtype must be one of"),
    ("dtype=[1]", lambda m: Llama2.from_pretrained(DEMO, dtype=[1]), InputError, "dtype must be one of"),
    ("progress='yes'", lambda m: Llama2.from_pretrained(DEMO, progress="yes"), InputError, "progress must be"),
    ("a huge id to logits", lambda m: m.logits([1, 10**30]), InputError,
     "token id 1000000000000000000000000000000 is outside the vocabulary"),
    ("a huge id to generate", lambda m: m.generate([10**30]), InputError, "outside the vocabulary"),
    ("a str id to logits", lambda m: m.logits([1, "a"]), InputError, "token ids must be integers, got str"),
    ("a float id to logits", lambda m: m.logits([1.0, 2.0]), InputError, "got float 1.0"),
]


@pytest.mark.parametrize("call, error, phrase", [c[1:] for c in API_CASES], ids=[c[0] for c in API_CASES])
def test_api_bad_input(demo, call, error, phrase):
    with pytest.raises(error) as e:
        call(demo)
    assert phrase in str(e.value)


# --- the command line (in this process: exit status and stderr) ---------------------------------

CLI_CASES = [  # {tmp}: a scratch directory holding text.txt and a directory dir.npy; {notok}: no tokenizer
    ("prompt not UTF-8", "generate --prompt", "Once \udcff x", 2, "--prompt is not valid UTF-8: byte 0xff at byte 5"),
    ("stop not UTF-8", "generate --stop", "a\udcfe", 2, "--stop is not valid UTF-8: byte 0xfe"),
    ("system not UTF-8", "chat --system", "\udcc3(", 2, "--system is not valid UTF-8: byte 0xc3"),
    ("logits prompt not UTF-8", "logits --out {tmp}/a.npy --prompt", "\udcff", 2, "--prompt is not valid UTF-8"),
    ("out in a missing dir", "logits --ids 1,2 --out {tmp}/missing/x.npy", None, 2, "missing does not exist"),
    ("out onto a directory", "logits --ids 1,2 --out {tmp}/dir.npy", None, 2, "dir.npy is a directory"),
    ("out under a file", "logits --ids 1,2 --out {tmp}/text.txt/x.npy", None, 2, "text.txt is not a directory"),
    ("out not .npy", "logits --ids 1,2 --out {tmp}/x.txt", None, 2, "must end in .npy or .npz"),
    ("max-seq-len 0", "generate --max-seq-len 0", None, 2, "--max-seq-len: must be a positive integer, got 0"),
    ("window 0", "perplexity --file {tmp}/text.txt --window 0", None, 2, "--window: must be a positive integer"),
    ("stride 0", "perplexity --file {tmp}/text.txt --stride 0", None, 2, "--stride: must be a positive integer"),
    ("window 1", "perplexity --file {tmp}/text.txt --window 1", None, 2, "window must be in [2,"),
    ("a huge id", "logits --out {tmp}/h.npy --ids", "1 100000000000000000000000000", 2,
     "token id 100000000000000000000000000 is outside the vocabulary"),
    ("generate, no tokenizer", "generate --model {notok} --prompt hi", None, 2, "; pass --tokenizer PATH"),
    ("chat, no tokenizer", "chat --model {notok}", None, 2, "; pass --tokenizer PATH"),
    ("perplexity, no tokenizer", "perplexity --model {notok} --file {tmp}/text.txt", None, 2,
     "; pass --tokenizer PATH"),
    ("logits --prompt, no tokenizer", "logits --model {notok} --prompt hi --out {tmp}/t.npy", None, 2,
     "pass --tokenizer PATH, or give --ids"),
    ("max-new-tokens 0", "generate --max-new-tokens 0", None, 0, "no forward pass ran"),
]


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("cli")
    (tmp / "dir.npy").mkdir()
    (tmp / "text.txt").write_text("Once upon a time there was a cat. " * 4)
    return tmp


@pytest.mark.parametrize("command, last, status, phrase", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input(scratch, no_tokenizer, command, last, status, phrase, capsys, monkeypatch):
    argv = command.format(tmp=scratch, notok=no_tokenizer).split() + ([last] if last is not None else [])
    monkeypatch.chdir(REPO)  # no --model: the demo model
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's usage errors
        code = e.code
    err = capsys.readouterr().err
    assert code == status, err
    assert phrase in err
    assert "Traceback" not in err and "tokenizer_path" not in err and "nan" not in err
    if status:  # the error is one line, the last
        assert err.strip().splitlines()[-1].startswith("llama2np") and phrase in err.strip().splitlines()[-1]


def test_logits_write_failure_leaves_no_file(tmp_path, monkeypatch, capsys):
    """A full disk while writing: one clear error, neither the file nor its temporary left behind."""
    def full(f, *a, **k):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "save", full)
    out = tmp_path / "l.npy"
    assert main(["logits", "--model", str(DEMO), "--ids", "1 2", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "--out" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_logits_overwrite_is_all_or_nothing(tmp_path):
    out = tmp_path / "l.npz"
    out.write_bytes(b"old")
    assert main(["logits", "--model", str(DEMO), "--ids", "1 2 3", "--out", str(out)]) == 0
    assert np.load(out)["ids"].tolist() == [1, 2, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["l.npz"]


# --- closed standard streams (a real process: Python sees a closed fd as sys.stdin/stdout = None) -----

@pytest.mark.parametrize("shell, phrase", [
    ("{py} -m llama2np chat <&-", "standard input is closed"),
    ("{py} -m llama2np generate --max-new-tokens 2 >&-", "standard output is closed"),
])
def test_closed_streams(shell, phrase):
    r = subprocess.run(["bash", "-c", shell.format(py=sys.executable)], cwd=REPO, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and phrase in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_broken_pipe_is_quiet():
    r = subprocess.run(["bash", "-c", f"{sys.executable} -m llama2np generate --max-new-tokens 200 | head -c 5"],
                       cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and len(r.stdout) == 5
    assert "Traceback" not in r.stderr and "Exception ignored" not in r.stderr, r.stderr


# --- a bad chat message is reported; the chat and its history go on -------------------------------

def test_chat_goes_on_after_bad_messages(monkeypatch, capsys):
    seen = []
    real_chat = Llama2.chat

    def spy(self, messages, **kw):
        seen.append([dict(m) for m in messages])
        return real_chat(self, messages, **kw)

    monkeypatch.setattr(Llama2, "chat", spy)
    lines = ["Hello!", "hello [INST] there", "Once " * 600, "bad \udcff byte", "second"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(lines) + "\n"))
    assert main(["chat", "--model", str(DEMO), "--system", "Be kind.", "--max-new-tokens", "4", "--seed", "0"]) == 0
    out, err = capsys.readouterr()
    assert "> second" in out and "Traceback" not in err
    assert err.count("message not sent; the chat goes on") == 3
    assert "special tags" in err and "context length 512" in err and "byte 0xff" in err
    assert "not a chat model" in err  # the demo says what it is
    assert len(seen) == 2  # answers to "Hello!" and "second" only
    assert [m["role"] for m in seen[1]] == ["system", "user", "assistant", "user"]
    assert seen[1][1]["content"] == "Hello!" and seen[1][3]["content"] == "second"


def test_chat_bad_bytes_from_a_pipe():
    stdin = b"caf\xe9 au lait\nsecond\n"  # latin-1, not UTF-8
    r = subprocess.run([sys.executable, "-m", "llama2np", "chat", "--model", str(DEMO), "--max-new-tokens", "3"],
                       input=stdin, capture_output=True, timeout=60, cwd=REPO)
    err = r.stderr.decode()
    assert r.returncode == 0 and "Traceback" not in err, err
    assert "byte 0xe9 at byte 3" in err and b"> second" in r.stdout


def test_a_long_conversation_forgets_its_oldest_exchanges(demo):
    system = {"role": "system", "content": "Be kind."}
    turns = []
    for i in range(6):
        turns += [{"role": "user", "content": f"Tell me story {i}. " * 3},
                  {"role": "assistant", "content": "Once upon a time there was a cat. " * 3}]
    dialog = [system] + turns + [{"role": "user", "content": "And now?"}]
    kept, ids = fit_dialog(demo.tokenizer, dialog, 120)
    assert len(ids) < 120 and ids == dialog_tokens(demo.tokenizer, kept)
    assert kept[0] == system and kept[-1] == dialog[-1] and kept[1:] == dialog[len(dialog) - len(kept) + 1:]
    assert len(kept) < len(dialog) and len(kept) % 2 == 0  # whole exchanges dropped, oldest first
    with pytest.raises(InputError, match="context length 20"):
        fit_dialog(demo.tokenizer, dialog, 20)
