"""scripts/bench/bench.py runs end to end on a tiny shape (its figures are printed, never asserted)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "scripts" / "bench" / "bench.py"


@pytest.mark.parametrize("extra", [[], ["--dtype", "bf16", "--quantize", "int8"]])
def test_bench_smoke_runs_on_a_tiny_shape(extra):
    proc = subprocess.run([sys.executable, str(BENCH), "--shape", "tiny", "--prompt-len", "4", "--new-tokens", "2",
                           "--runs", "1", *extra], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for line in ("load", "prefill", "decode", "bound"):
        assert any(out.startswith(line) for out in proc.stdout.splitlines()), proc.stdout


def test_bench_refuses_random_7b_weights():
    proc = subprocess.run([sys.executable, str(BENCH), "--shape", "7b"], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "make_synthetic_checkpoint" in proc.stderr
