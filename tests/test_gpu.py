"""GPU-only checks: Transformer Engine layers, FP8 and bf16 training steps. Skipped without CUDA (CI)."""

import pytest

from conftest import REPO, run_torchrun

pytestmark = [pytest.mark.gpu, pytest.mark.dist]


@pytest.mark.parametrize("overrides", [
    ["model.params_dtype=bf16", "model.transformer_impl=transformer_engine"],
    ["model.params_dtype=bf16", "model.transformer_impl=transformer_engine", "model.fp8=delayed",
     "model.fp8_bf16_layers=0", "model.num_layers=4", "model.make_vocab_size_divisible_by=128"],
    ["model.params_dtype=bf16", "model.transformer_impl=local"],
])
def test_train_step_on_gpu(overrides):
    # FP8 GEMMs need dimensions that are multiples of 16: the tiny model's 128/256 are.
    proc = run_torchrun(str(REPO / "tools" / "bench_train_step.py"), "--config", str(REPO / "recipes" / "tiny_cpu.yaml"),
                        "--steps", "2", *overrides, nproc=1)
    assert "tokens/s" in proc.stdout and "MFU" in proc.stdout
