"""Run a piece of llama2np in a child process under a memory limit (RLIMIT_AS) and a time limit.

For inputs that, read wrongly, would allocate without end or never return: the
child's own address space is capped, so a runaway allocation fails there (as
MemoryError, which the test reports) instead of taking the machine down.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: address space of a child: importing numpy, gguf and llama2np takes ~1 GiB of it (mostly thread stacks
#: and reserved arenas, not memory in use), a tiny model a few MiB more
MEMORY_LIMIT = 3 << 30

_RUNNER = r"""
import json, sys, traceback
from llama2np.errors import Llama2npError
try:
    exec(sys.argv[1], {})
except Llama2npError as e:
    print(json.dumps({"error": type(e).__name__, "message": str(e)}))
except BaseException as e:
    print(json.dumps({"error": "crash", "type": type(e).__name__, "message": traceback.format_exc()}))
else:
    print(json.dumps({"error": None}))
"""


@dataclass
class Outcome:
    error: str | None  # the Llama2npError subclass raised, None for none, "crash" for anything else
    message: str
    type: str = ""


def _limit() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def run_bounded(code: str, timeout: float = 60.0) -> Outcome:
    """Run ``code`` (Python, with llama2np importable) in a child; what it raised. A timeout fails the test."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.environ.get("PYTHONPATH", ""), str(REPO)]),
               OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    try:
        done = subprocess.run([sys.executable, "-c", _RUNNER, code], capture_output=True, text=True,
                              timeout=timeout, env=env, preexec_fn=_limit)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"did not return within {timeout:g} s:\n{code}") from None
    lines = done.stdout.strip().splitlines()
    if not lines:
        return Outcome("crash", f"exit status {done.returncode}, no result; stderr:\n{done.stderr[-2000:]}")
    result = json.loads(lines[-1])
    return Outcome(result["error"], result.get("message", ""), result.get("type", ""))
