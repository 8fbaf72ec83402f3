"""The thread pool's control of the BLAS library's threads."""

from __future__ import annotations

import pytest

from llama2np.model import threads as parallel


def test_blas_threads_sets_the_blas_library_and_restores_it():
    from threadpoolctl import threadpool_info

    def blas():
        return {i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"}

    if not blas():
        pytest.skip("NumPy's BLAS is not one threadpoolctl controls")
    with parallel.blas_threads(1):
        assert blas() == {1}
    assert blas() == {parallel.num_threads()}


