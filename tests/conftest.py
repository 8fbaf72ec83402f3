"""Shared test helpers. Real-weight data lives in ../shared (beside the repo), never in the repo."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def shared_path(*parts: str) -> Path:
    """A path under ../shared/data, or skip the test with the reason when it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"../shared/data/{'/'.join(parts)} not found: tests that need the shared real-weight "
                    "data are skipped in a clone without ../shared")
    return path


DEMO = REPO / "weights" / "demo"  # the small model trained by scripts/demo/, committed with the repository


@pytest.fixture(scope="module")
def demo():
    """The demo model, loaded once per test module."""
    from llama2np import Llama2

    return Llama2.from_pretrained(DEMO)


@pytest.fixture(scope="module")
def stories():
    """stories260K (llama2.c's smallest model) with its tokenizer, loaded once per test module."""
    from llama2np import Llama2

    return Llama2.from_pretrained(shared_path("stories260K", "stories260K.bin"),
                                  tokenizer_path=shared_path("stories260K", "tok512.model"))
