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
def _register_hypothesis_profiles() -> None:
    """CI runs a small, derandomized profile; HYPOTHESIS_PROFILE=long explores more locally."""
    try:
        from hypothesis import HealthCheck, settings
    except ImportError:  # hypothesis is in the test extra; without it the property tests skip
        return
    common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    settings.register_profile("ci", max_examples=25, derandomize=True, print_blob=True, **common)
    settings.register_profile("long", max_examples=500, **common)
    import os
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


_register_hypothesis_profiles()
