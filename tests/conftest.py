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


@pytest.fixture
def two_threads():
    """llama2np's own threads set to two for one test (products split over both), then set back."""
    from llama2np.model.threads import num_threads, set_num_threads

    before = num_threads()
    set_num_threads(2)
    yield
    set_num_threads(before)


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




SERVER_KEY = "test-key"  # the API key of the session's server


@pytest.fixture(scope="session")
def served_demo():
    """One llama2np server for the session: the demo model in float64, API key SERVER_KEY, an ephemeral port.

    Yields its base URL (``http://127.0.0.1:PORT``). Needs the serve extra.
    """
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    import threading
    import time

    from llama2np import Llama2
    from llama2np.server import bind, serve

    model = Llama2.from_pretrained(REPO / "weights" / "demo", dtype="float64")
    sock = bind("127.0.0.1", 0)
    servers = []
    thread = threading.Thread(target=serve, args=(model, sock), kwargs={"api_key": SERVER_KEY, "on_server": servers.append},
                              daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not (servers and servers[0].started) and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert servers and servers[0].started, "the server did not start"
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    servers[0].should_exit = True
    thread.join(timeout=10)


_register_hypothesis_profiles()
