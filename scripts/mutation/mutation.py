#!/usr/bin/env python
"""Mutation testing: plant each mutant of a maintained list, run the tests that should catch it, report survivors.

    python scripts/mutation/mutation.py                    # every mutant, 2 workers
    python scripts/mutation/mutation.py --module sampling  # mutants whose file path contains "sampling"
    python scripts/mutation/mutation.py --id rope-angle-float32 -v

A mutant (``scripts/mutation/mutants.toml``) is a small, plausible bug: an exact piece of a file's text
(``find``, which must occur exactly once) and what to put instead (``replace``). Each runs in its own copy
of the repository's tracked files (``git ls-files``, with ``../shared`` linked beside the copy as the tests
expect), against the tests listed for its file (or its own ``tests``), stopping at the first failure.
A mutant is *killed* when those tests fail (or time out), *survives* when they pass, and is *stale* when
its ``find`` text no longer occurs once (the code moved on: update the list). A mutant marked
``equivalent = "why"`` changes no observable output; it is run and reported, but not counted.

Score = killed / (mutants not marked equivalent). Exit status 0 when no unexplained mutant survives and
none is stale, 1 otherwise. Not part of the default test run (it runs the suite many times).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LIST = Path(__file__).with_name("mutants.toml")


@dataclass
class Mutant:
    id: str
    file: str
    find: str
    replace: str
    tests: list[str]
    why: str = ""
    equivalent: str = ""
    outcome: str = ""  # killed | survived | stale | timeout
    seconds: float = 0.0
    detail: str = field(default="", repr=False)


def read_mutants(path: Path) -> list[Mutant]:
    data = tomllib.loads(path.read_text())
    file_tests = {f: spec["tests"] for f, spec in data.get("files", {}).items()}
    mutants, seen = [], set()
    for m in data["mutant"]:
        if m["id"] in seen:
            raise SystemExit(f"{path}: mutant id {m['id']!r} appears twice")
        seen.add(m["id"])
        tests = m.get("tests") or file_tests.get(m["file"])
        if not tests:
            raise SystemExit(f"{path}: mutant {m['id']!r}: no tests for {m['file']} (add [files.\"{m['file']}\"])")
        mutants.append(Mutant(m["id"], m["file"], m["find"], m["replace"], list(tests), m.get("why", ""),
                              m.get("equivalent", "")))
    return mutants


def make_copy(root: Path) -> Path:
    """The tracked files of the repository under ``root/repo``, with ``root/shared`` -> the real ../shared."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, check=True, capture_output=True).stdout
    copy = root / "repo"
    for name in filter(None, files.decode().split("\0")):
        src, dst = REPO / name, copy / name
        if src.is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    shared = REPO.parent / "shared"
    if shared.exists():
        (root / "shared").symlink_to(shared.resolve())
    return copy


def run_tests(copy: Path, tests: list[str], timeout: float) -> tuple[str, str]:
    env = dict(os.environ, PYTHONPATH=str(copy), PYTHONDONTWRITEBYTECODE="1")
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    try:
        r = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", ""
    last = (r.stdout.strip().splitlines() or [""])[-1]
    if r.returncode == 0:
        return "passed", last
    if r.returncode == 5:
        return "no tests", last
    return "failed", last


def run_mutant(m: Mutant, copy: Path, timeout: float) -> None:
    path = copy / m.file
    original = path.read_text() if path.exists() else None
    if original is None or original.count(m.find) != 1:
        m.outcome = "stale"
        m.detail = "file missing" if original is None else f"find text occurs {original.count(m.find)} times"
        return
    path.write_text(original.replace(m.find, m.replace))
    start = time.perf_counter()
    try:
        result, m.detail = run_tests(copy, m.tests, timeout)
    finally:
        path.write_text(original)
        m.seconds = time.perf_counter() - start
    m.outcome = {"passed": "survived", "failed": "killed", "timeout": "timeout"}.get(result, "stale")
    if result == "no tests":
        m.detail = "its tests select nothing: " + " ".join(m.tests)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--list", type=Path, default=LIST, help="mutant list (TOML)")
    p.add_argument("--module", action="append", default=[], help="only mutants whose file contains this")
    p.add_argument("--id", action="append", default=[], help="only these mutant ids")
    p.add_argument("-j", "--jobs", type=int, default=2, help="mutants run at once (each in its own copy)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per mutant before it counts as killed")
    p.add_argument("--no-baseline", action="store_true", help="skip checking that the selected tests pass unmutated")
    p.add_argument("-v", "--verbose", action="store_true")
    a = p.parse_args(argv)
    mutants = read_mutants(a.list)
    if a.module:
        mutants = [m for m in mutants if any(s in m.file for s in a.module)]
    if a.id:
        mutants = [m for m in mutants if m.id in a.id]
    if not mutants:
        print("no mutant selected", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="llama2np-mutation-") as tmp:
        copies = [make_copy(Path(tmp) / f"w{i}") for i in range(max(1, a.jobs))]
        start = time.perf_counter()
        if not a.no_baseline:
            tests = sorted({t for m in mutants for t in m.tests})
            result, detail = run_tests(copies[0], tests, a.timeout * 4)
            if result != "passed":
                print(f"the selected tests do not pass unmutated ({result}: {detail}); fix that first", file=sys.stderr)
                return 1
            print(f"baseline: {len(tests)} test files pass ({detail})", flush=True)
        free = list(copies)

        def work(m: Mutant) -> Mutant:
            copy = free.pop()
            try:
                run_mutant(m, copy, a.timeout)
            finally:
                free.append(copy)
            mark = {"killed": "killed  ", "timeout": "timeout ", "survived": "SURVIVED", "stale": "STALE   "}[m.outcome]
            note = f"  (equivalent: {m.equivalent})" if m.equivalent and m.outcome == "survived" else ""
            print(f"{mark} {m.id:34s} {m.file}  {m.seconds:5.1f}s{note}" + (f"  [{m.detail}]" if a.verbose or
                                                                              m.outcome == "stale" else ""),
                  flush=True)
            return m

        with ThreadPoolExecutor(len(copies)) as pool:
            done = list(pool.map(work, mutants))
        elapsed = time.perf_counter() - start
    counted = [m for m in done if not m.equivalent]
    killed = [m for m in counted if m.outcome in ("killed", "timeout")]
    survivors = [m for m in counted if m.outcome == "survived"]
    stale = [m for m in done if m.outcome == "stale"]
    explained = [m for m in done if m.equivalent and m.outcome == "survived"]
    print(f"\n{len(done)} mutants in {elapsed:.0f} s: {len(killed)} killed, {len(survivors)} survived, "
          f"{len(stale)} stale, {len(explained)} equivalent survivors (explained in docs/mutation.md)")
    for m in survivors:
        print(f"  survivor {m.id}: {m.why or m.file}")
    score = len(killed) / max(1, len(counted) - len([m for m in stale if not m.equivalent]))
    print(f"score: {100 * score:.1f} % of {len(counted) - len([m for m in stale if not m.equivalent])} "
          "mutants that count")
    return 0 if not survivors and not stale else 1


if __name__ == "__main__":
    raise SystemExit(main())
