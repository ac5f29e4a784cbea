"""Data-parallel (2 gloo ranks) gradient of the token-mean loss equals the single-process gradient."""

import pytest

from conftest import run_torchrun


@pytest.mark.dist
def test_global_token_mean_under_data_parallel():
    proc = run_torchrun("token_mean_dp.py", nproc=2)
    assert proc.stdout.count("global token-mean max |grad diff|") == 2
