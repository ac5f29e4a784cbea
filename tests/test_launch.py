"""NeMo-Run launches (run in .venv-launch, made by `make launch-env`): dry runs and their validation."""

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH_PYTHON = REPO / ".venv-launch" / "bin" / "python"

pytestmark = pytest.mark.skipif(not LAUNCH_PYTHON.exists(), reason="needs `make launch-env` (make test creates it)")


def launch(*args, tmp_path):
    env = dict(os.environ, COLUMNS="4000", HOME=str(tmp_path))  # wide console: no wrapped command lines
    return subprocess.run([str(LAUNCH_PYTHON), "-m", "megatron_hbpo.launch", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def one_line(text):
    return " ".join(text.split())


def test_slurm_dryrun_70b_on_8_nodes(tmp_path):
    proc = launch("--config", "recipes/r1_distill_llama_70b.yaml", "--executor", "slurm", "--nodes", "8", "--dryrun",
                  "--account", "acct", "--partition", "batch", "--container-image", "nvcr.io/nvidia/pytorch:25.10-py3",
                  "--env", "NCCL_DEBUG=WARN", "--job-dir", str(tmp_path / "jobs"), "train.total_steps=10",
                  tmp_path=tmp_path)
    out = one_line(proc.stdout + proc.stderr)
    assert proc.returncode == 0, out[-3000:]
    assert "#SBATCH --nodes=8" in out and "#SBATCH --gpus-per-node=8" in out and "#SBATCH --account=acct" in out
    assert "--nnodes 8 --nproc-per-node 8" in out
    assert ("-m megatron_hbpo.train --config recipes/r1_distill_llama_70b.yaml --resume auto train.total_steps=10 "
            "cluster.nodes=8 cluster.gpus_per_node=8") in out
    assert "--container-image nvcr.io/nvidia/pytorch:25.10-py3" in out


def test_local_dryrun_tiny(tmp_path):
    proc = launch("--config", "recipes/tiny_cpu.yaml", "--executor", "local", "--gpus-per-node", "2", "--dryrun",
                  tmp_path=tmp_path)
    out = one_line(proc.stdout + proc.stderr)
    assert proc.returncode == 0, out[-3000:]
    assert "torchrun" in out and "megatron_hbpo.train" in out and "cluster.gpus_per_node=2" in out


@pytest.mark.parametrize("args, words", [
    (["--config", "recipes/r1_distill_llama_70b.yaml", "--executor", "slurm", "--nodes", "3", "--dryrun",
      "--account", "a", "--partition", "p"], "does not divide the world size 24"),
    (["--config", "recipes/r1_distill_qwen_7b.yaml", "--executor", "slurm", "--dryrun"], "--account and --partition"),
    (["--config", "recipes/r1_distill_qwen_32b.yaml", "--executor", "local", "--dryrun"], "local executor runs on one node"),
])
def test_bad_launches_fail_before_submitting(tmp_path, args, words):
    proc = launch(*args, tmp_path=tmp_path)
    assert proc.returncode == 2 and words in proc.stderr, proc.stderr[-2000:]
