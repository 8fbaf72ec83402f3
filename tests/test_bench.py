"""scripts/bench/bench.py runs end to end on a tiny shape and on small models (its figures are printed, never asserted)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import DEMO, REPO

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


def test_speculative_bench_runs(tmp_path):
    """scripts/bench/bench.py --speculative runs end to end on small models (its figures are printed, never asserted)."""
    import subprocess
    import sys
    bench = [sys.executable, str(REPO / "scripts" / "bench" / "bench.py"), "--speculative"]
    costs = tmp_path / "costs.json"
    proc = subprocess.run(bench + ["positions", str(DEMO), "--sizes", "1,2", "--runs", "1", "--save", str(costs)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "forward over  2 positions" in proc.stdout, proc.stderr
    proc = subprocess.run(bench + ["lookup", str(DEMO), "--new-tokens", "6", "--runs", "1", "--num-draft", "2",
                                   "--costs", str(costs)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("identical") == 3 and "DIFFERENT" not in proc.stdout, proc.stdout


