"""Fuzzing: every reader of outside bytes, and every command with bad flag values.

Readers (``fuzz_targets.py``): each runs in its own child process under a memory limit,
its generated inputs (truncations, byte flips, type swaps, huge counts, deep nesting)
either read or raise a Llama2npError, each within a time limit. Commands: ``main()``
with one flag given a generated bad value exits 0 or 2, never with a traceback; with 2,
the error is exactly one line on stderr (after any notes such as which model it used).

Deterministic by default (the ``fuzz-ci`` profile: derandomized, bounded examples);
``HYPOTHESIS_PROFILE=long`` runs many more, with fresh randomness.
"""

from __future__ import annotations

import contextlib
import io
import os
import resource
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytest.importorskip("hypothesis", reason='fuzzing needs hypothesis (the "test" extra)')
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import fuzz_targets  # noqa: E402
from llama2np.cli.commands import main  # noqa: E402

HERE = Path(__file__).resolve().parent
DEMO = str(HERE.parent / "weights" / "demo")
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
#: address space of a fuzzing child: its imports take ~0.2 GiB, a tiny model a few MiB
MEMORY_LIMIT = 2 << 30
#: seconds one reader's whole run may take (the ci profile needs a few)
TARGET_SECONDS = 600 if PROFILE == "long" else 120
fuzz_targets.register_profiles()  # replaces, never fails, when registered already


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


@pytest.mark.parametrize("target", sorted(fuzz_targets.TARGETS))
def test_reader_raises_only_llama2np_errors(target: str):
    env = dict(os.environ, HYPOTHESIS_PROFILE=PROFILE, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([os.environ.get("PYTHONPATH", ""), str(HERE.parent)]))
    try:
        done = subprocess.run([sys.executable, str(HERE / "fuzz_targets.py"), target], capture_output=True,
                              text=True, timeout=TARGET_SECONDS, env=env, cwd=HERE, preexec_fn=_limit_memory)
    except subprocess.TimeoutExpired:
        pytest.fail(f"fuzzing {target} did not finish within {TARGET_SECONDS} s")
    report = (done.stdout + done.stderr)[-4000:]
    assert done.returncode == 0, report
    print(done.stdout.strip().splitlines()[-1])


# --- the command line --------------------------------------------------------------------------

BAD_VALUES = st.one_of(
    st.sampled_from(["nan", "inf", "-inf", "-1", "0", "-0", "1e308", "-1e308", "1e-320", str(2 ** 63),
                     str(-2 ** 63 - 1), str(10 ** 30), "", " ", "abc", "1.5", "0x10", "\udcff", "a\udc80",
                     "1=2", "=", "5=nan", "1=inf", "99999", "[INST]", "a" * 300, "1 2 x", "-5"]),
    st.text(max_size=6))

SAMPLING = ["--max-new-tokens", "--temperature", "--top-p", "--top-k", "--seed", "--min-p", "--repetition-penalty",
            "--frequency-penalty", "--presence-penalty", "--logit-bias", "--prompt-lookup", "--num-draft",
            "--max-seq-len", "--dtype", "--quantize", "--tokenizer", "--model", "--draft-model"]
COMMANDS = {
    "generate": (["--model", DEMO, "--prompt", "Once", "--max-new-tokens", "2"], SAMPLING + ["--stop", "--prompt"]),
    "chat": (["--model", DEMO, "--max-new-tokens", "2"], SAMPLING + ["--system"]),
    "perplexity": (["--model", DEMO, "--file", "text.txt"], ["--window", "--stride", "--file", "--max-seq-len"]),
    "logits": (["--model", DEMO, "--ids", "1 2 3", "--out", "out.npy"], ["--ids", "--out", "--max-seq-len"]),
    "compare": (["--model", DEMO, "--ids", "1 2 3", "--other-quantize", "int8"],
                ["--window", "--stride", "--ids", "--logits", "--other", "--other-dtype"]),
    "plan": (["--model", DEMO], ["--tensor-parallel", "--max-seq-len", "--machine-ram", "--storage", "--model"]),
    "quantize": (["--model", DEMO, "--out", "new"], ["--model", "--out"]),
}
CASES = st.sampled_from(sorted(COMMANDS)).flatmap(
    lambda c: st.tuples(st.just(c), st.sampled_from(COMMANDS[c][1]), BAD_VALUES))


class _Hang(BaseException):
    pass


def _alarm(signum, frame):
    raise _Hang


def run_main(argv: list[str], stdin: str = "") -> tuple[int, str]:
    """(exit status, stderr) of ``main(argv)`` run in this process."""
    err, out = io.StringIO(), io.StringIO()
    old_stdin = sys.stdin
    sys.stdin = io.TextIOWrapper(io.BytesIO(stdin.encode()), encoding="utf-8")
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(60)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            try:
                status = main(argv)
            except SystemExit as e:  # argparse's usage errors
                status = e.code
    except _Hang:
        raise AssertionError(f"{argv} did not finish within 60 s") from None
    finally:
        signal.alarm(0)
        sys.stdin = old_stdin
    return status, err.getvalue()


@settings(settings.get_profile(f"fuzz-{PROFILE}"), max_examples=300 if PROFILE == "long" else 80)
@given(CASES)
def test_commands_with_bad_flag_values_exit_0_or_2_with_one_line(case):
    command, flag, value = case
    base, _ = COMMANDS[command]
    argv = [command, *base]
    if flag in argv:
        argv[argv.index(flag) + 1] = value
    else:
        argv += [flag, value]
    with tempfile.TemporaryDirectory(prefix="llama2np-cli-fuzz-") as tmp, contextlib.chdir(tmp):
        Path("text.txt").write_text("Once upon a time there was a little llama.\n")
        status, err = run_main(argv, stdin="Hello\n")
    lines = err.strip().splitlines()
    assert "Traceback" not in err, err
    assert status in (0, 2), (argv, status, err)
    assert all(line.startswith("llama2np") for line in lines), (argv, lines)  # notes, warnings, the error
    if status == 2:  # the error is one line, the last
        assert sum(": error: " in line for line in lines) == 1 and ": error: " in lines[-1], (argv, lines)
