"""Launch the HBPO trainer with NeMo-Run.

    .venv-launch/bin/python -m megatron_hbpo.launch --config recipes/X.yaml --executor local|slurm \\
        [--nodes N] [--gpus-per-node G] [--dryrun] [--python PATH] \\
        [--account A --partition P --time HH:MM:SS] [--container-image IMG] [--container-mounts SRC:DST,...] \\
        [--env KEY=VALUE ...] [--job-dir DIR] [dotted.overrides ...]

The recipe is validated for the launch's world size before anything is submitted. The job runs
`torchrun ... -m megatron_hbpo.train --config X --resume auto [overrides]` on every node. `--dryrun`
prints what would be submitted (for SLURM, the sbatch script) without running it. Otherwise the
launcher waits for the job, streams its log, and exits 0 when it succeeded, 1 when it did not.

The launcher's own environment has no torch, so a local launch runs the `torchrun` of the training
environment given by `--python` (default: `.venv/bin/python` of this checkout when it exists):
that interpreter's directory goes first on the job's PATH, and its `torchrun` starts the ranks
with that same interpreter. On SLURM the container (or the nodes' PATH) provides torchrun.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from megatron_hbpo.config import ConfigError, load_recipe

# The checkout this package runs from (installed editable into both environments by the Makefile).
REPO = Path(__file__).resolve().parents[2]
DEFAULT_TRAIN_PYTHON = REPO / ".venv" / "bin" / "python"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Launch the HBPO trainer with NeMo-Run.")
    parser.add_argument("--config", required=True)
    parser.add_argument("--executor", choices=["local", "slurm"], default="local")
    parser.add_argument("--nodes", type=int, help="default: the recipe's cluster.nodes")
    parser.add_argument("--gpus-per-node", type=int, help="default: the recipe's cluster.gpus_per_node")
    parser.add_argument("--dryrun", action="store_true")
    parser.add_argument("--name", help="experiment name (default: the recipe's name)")
    parser.add_argument("--python", help="local executor only: the training environment's interpreter, with "
                                         "torchrun beside it (default: .venv/bin/python of this checkout when it "
                                         "exists, else the torchrun on PATH)")
    parser.add_argument("--account")
    parser.add_argument("--partition")
    parser.add_argument("--time", default="04:00:00")
    parser.add_argument("--container-image")
    parser.add_argument("--container-mounts", default="", help="comma-separated SRC:DST pairs")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--job-dir", default="nemo_run_jobs",
                        help="where NeMo-Run keeps experiment metadata, job files and logs")
    parser.add_argument("overrides", nargs="*")
    return parser.parse_args(argv)


def training_bin_dir(python: str | None, *, dryrun: bool) -> Path | None:
    """The bin directory whose torchrun (and so whose interpreter) a local launch uses.

    None means "whatever torchrun is on PATH". The path is made absolute but not resolved: a venv's
    bin/python is a symlink to the base interpreter, and resolving it would lose the venv.
    """
    if python is None:
        if DEFAULT_TRAIN_PYTHON.exists():
            python = str(DEFAULT_TRAIN_PYTHON)
        elif shutil.which("torchrun") or dryrun:  # a dry run only shows the command: fine without torch
            return None
        else:
            raise ConfigError(f"no torchrun on PATH and no {DEFAULT_TRAIN_PYTHON}: run `make setup`, or pass "
                              "--python PATH/TO/bin/python of an environment with torch and megatron_hbpo")
    bin_dir = Path(python).expanduser().absolute().parent
    if not (bin_dir / "torchrun").is_file():
        raise ConfigError(f"--python {python}: no torchrun in {bin_dir} (expected the bin/python of a training "
                          "environment, such as .venv/bin/python)")
    return bin_dir


def build(args: argparse.Namespace) -> tuple[Any, Any, str]:
    """(task, executor, name) for a NeMo-Run experiment, after validating the recipe for this launch."""
    import nemo_run as run

    base = load_recipe(args.config, args.overrides)
    nodes = args.nodes or base.cluster.nodes
    gpus = args.gpus_per_node or base.cluster.gpus_per_node
    cluster = [f"cluster.nodes={nodes}", f"cluster.gpus_per_node={gpus}"]
    recipe = load_recipe(args.config, [*args.overrides, *cluster], world_size=nodes * gpus)
    # TORCH_ELASTIC_SHUTDOWN_TIMEOUT: on SIGTERM torchrun gives the ranks this long to save their
    # checkpoint before SIGKILL (its default, 30 s, is too short for large models).
    env = {"PYTHONUNBUFFERED": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "270"}
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--env {item!r}: expected KEY=VALUE")
        env[key] = value
    task = run.Script(path="megatron_hbpo.train", m=True, entrypoint="python",
                      args=["--config", args.config, "--resume", "auto", *args.overrides, *cluster])
    if args.executor == "local":
        if nodes != 1:
            raise ConfigError(f"cluster.nodes: the local executor runs on one node, the launch asks for {nodes}")
        bin_dir = training_bin_dir(args.python, dryrun=args.dryrun)
        if bin_dir is not None:
            # NeMo-Run's torchrun component hard-codes the entrypoint `torchrun`, looked up on the
            # job's PATH; torchx's local scheduler prepends a role's PATH to the inherited one, so
            # this picks the training environment's torchrun, which starts the ranks with its own
            # interpreter (sys.executable).
            env["PATH"] = str(bin_dir)
            env["VIRTUAL_ENV"] = str(bin_dir.parent)
        executor = run.LocalExecutor(ntasks_per_node=gpus, launcher="torchrun", env_vars=env)
    else:
        if args.python:
            # An sbatch script sets PATH outright (no prepending), and the nodes' environment is the
            # container's; a host interpreter path would not mean anything there.
            raise ConfigError("--python: only for --executor local (on SLURM the container provides torchrun)")
        missing = [flag for flag, value in (("--account", args.account), ("--partition", args.partition)) if not value]
        if missing:
            raise ConfigError(f"{' and '.join(missing)}: required for --executor slurm")
        executor = run.SlurmExecutor(
            account=args.account, partition=args.partition, nodes=nodes, ntasks_per_node=gpus, gpus_per_node=gpus,
            time=args.time, container_image=args.container_image,
            container_mounts=[m for m in args.container_mounts.split(",") if m], env_vars=env, exclusive=True,
            mem="0", launcher="torchrun", tunnel=run.LocalTunnel(job_dir=args.job_dir),
            # Ships the committed code (git archive of HEAD) into the job directory the step runs in.
            packager=run.GitArchivePackager(),
        )
    return task, executor, args.name or recipe.name


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        task, executor, name = build(args)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    import nemo_run as run
    from torchx.specs import AppState

    # An explicit Experiment rather than run.run: run.run returns nothing, and the launcher must
    # report the job's final state. Its metadata and logs go under --job-dir, not ~/.nemo_run; the
    # goodbye message would point `Experiment.from_id` at ~/.nemo_run, so ours says where to look.
    job_dir = os.path.abspath(args.job_dir)
    with run.Experiment(name, executor=executor, base_dir=job_dir, enable_goodbye_message=False) as exp:
        exp.add(task, name=name, tail_logs=not args.dryrun)
        if args.dryrun:
            exp.dryrun()
            return 0
        exp.run(tail_logs=True)
    # Leaving the `with` waited for the job (the local executor cannot detach; SLURM is not asked
    # to) and recorded its final state on each job.
    ok = all(job.state == AppState.SUCCEEDED for job in exp.jobs)
    for job in exp.jobs:
        print(f"{job.id}: {job.state.name}; logs under {job.executor.job_dir}; later: NEMORUN_HOME={job_dir} "
              f"nemo experiment logs {job.executor.experiment_id} 0", flush=True)
    print("launch succeeded" if ok else "launch FAILED", file=sys.stdout if ok else sys.stderr, flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
