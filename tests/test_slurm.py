"""The sbatch scripts: syntax, shellcheck, and the torchrun/srun lines the helper builds under a faked SLURM."""

import os
import shutil
import signal
import subprocess
import time

import pytest
from conftest import REPO

SCRIPTS = sorted((REPO / "slurm").glob("*.sbatch"))


def test_scripts_parse():
    assert len(SCRIPTS) >= 4
    for script in [REPO / "slurm" / "common.sh", *SCRIPTS]:
        subprocess.run(["bash", "-n", str(script)], check=True)


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed (make test installs it as root)")
def test_shellcheck():
    proc = subprocess.run(["shellcheck", "-x", "slurm/common.sh", *[str(s.relative_to(REPO)) for s in SCRIPTS]],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def fake_slurm(tmp_path, **env):
    """A PATH with srun/scancel/scontrol stubs that log their arguments, and a SLURM-like environment."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool, body in {"srun": 'echo "srun $*" >> "$FAKE_LOG"; sleep "${FAKE_SRUN_SECONDS:-0}"',
                       "scancel": 'echo "scancel $*" >> "$FAKE_LOG"',
                       "scontrol": 'echo "scontrol $*" >> "$FAKE_LOG"'}.items():
        (bin_dir / tool).write_text(f"#!/usr/bin/env bash\n{body}\n")
        (bin_dir / tool).chmod(0o755)
    base = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_LOG": str(tmp_path / "log"), "SLURM_JOB_ID": "4242",
            "SLURM_NNODES": "8", "SLURM_SUBMIT_DIR": str(REPO), "HBPO_HOSTNAMES": "gpu-a17,gpu-a18,gpu-a19"}
    return {**os.environ, **base, **env}


def test_helper_builds_the_torchrun_line(tmp_path):
    env = fake_slurm(tmp_path, CONFIG="recipes/r1_distill_llama_70b.yaml", GPUS_PER_NODE="8",
                     OVERRIDES="train.total_steps=10")
    out = subprocess.run(["bash", "-c", "source slurm/common.sh && hbpo_torchrun_command"], cwd=REPO, env=env,
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == ("torchrun --nnodes 8 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint gpu-a17:29500 "
                   "--rdzv-id 4242 -m megatron_hbpo.train --config recipes/r1_distill_llama_70b.yaml --resume auto "
                   "train.total_steps=10 cluster.nodes=8 cluster.gpus_per_node=8")


def test_launch_with_a_container(tmp_path):
    env = fake_slurm(tmp_path, CONFIG="recipes/r1_distill_qwen_7b.yaml", SLURM_NNODES="1",
                     CONTAINER_IMAGE="nvcr.io#nvidia/pytorch:25.10-py3", CONTAINER_MOUNTS="/data:/data")
    subprocess.run(["bash", "-c", "source slurm/common.sh && hbpo_launch"], cwd=REPO, env=env, check=True,
                   capture_output=True)
    line = (tmp_path / "log").read_text()
    assert line.startswith("srun --ntasks-per-node=1 --kill-on-bad-exit=1 --container-image=nvcr.io#nvidia/pytorch")
    assert "--container-mounts=/data:/data" in line and "--nnodes 1 --nproc-per-node 8" in line


def test_sigterm_checkpoints_then_requeues(tmp_path):
    env = fake_slurm(tmp_path, FAKE_SRUN_SECONDS="2")
    proc = subprocess.Popen(["bash", str(REPO / "slurm" / "hbpo_1p5b.sbatch")], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(0.7)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=20)
    log = (tmp_path / "log").read_text().splitlines()
    assert proc.returncode == 0, out
    assert log[0].startswith("srun ") and "--config recipes/r1_distill_qwen_1p5b.yaml --resume auto" in log[0]
    # Forward the signal to the step, wait for it to finish (its checkpoint), then requeue.
    assert log[1:] == ["scancel --signal=TERM 4242.0", "scontrol requeue 4242"]
