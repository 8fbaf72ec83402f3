"""Read-ahead of memory-mapped weights: every page of the maps is resident before the first forward."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from llama2np.loaders.readahead import read_ahead
from llama2np.model.mapped import mapped_pages

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")


def resident_bytes(a: np.ndarray) -> int:
    """Rss of the mapping that holds ``a``, from /proc/self/smaps."""
    base, offset, _ = mapped_pages(a)
    start = np.frombuffer(base, dtype=np.uint8).ctypes.data
    current = None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                current = lo <= start < hi
            elif current and head == "Rss:":
                return int(line.split()[1]) * 1024
    raise AssertionError("mapping not found")


@pytest.fixture
def mapped(tmp_path):
    path = tmp_path / "w.bin"
    np.arange(3 << 20, dtype=np.float32).tofile(path)  # 12 MiB
    return np.memmap(path, dtype=np.float32, mode="r", shape=(3 << 10, 1 << 10))


@linux
def test_read_ahead_makes_the_map_resident(mapped):
    assert resident_bytes(mapped) < mapped.nbytes // 2  # a fresh map: nothing (or little) mapped yet
    assert read_ahead([mapped, mapped]) == mapped.nbytes  # the same map once
    assert resident_bytes(mapped) >= mapped.nbytes


def test_arrays_in_memory_are_skipped():
    assert read_ahead([np.ones((4, 4), np.float32)]) == 0


def test_too_big_for_memory_is_not_read(mapped, monkeypatch):
    import llama2np.loaders.readahead as readahead

    monkeypatch.setattr(readahead, "_physical_memory", lambda: mapped.nbytes)
    assert read_ahead([mapped]) == 0
