"""Data-parallel (2 gloo ranks) gradient of the token-mean loss equals the single-process gradient."""

import pytest

from conftest import run_torchrun


@pytest.mark.dist
def test_global_token_mean_under_data_parallel():
    result = run_torchrun("token_mean_dp.py", nproc=2)
    assert len(result.reports) == 2
    for report in result.reports:
        assert report["global_token_mean_err"] <= 1e-12
        # The mistake of averaging each rank's own token-mean is visible: the check can fail.
        assert report["per_rank_mean_err"] >= 1e-6
