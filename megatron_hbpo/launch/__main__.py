"""Launch the HBPO trainer with NeMo-Run.

    .venv-launch/bin/python -m megatron_hbpo.launch --config recipes/X.yaml --executor local|slurm \\
        [--nodes N] [--gpus-per-node G] [--dryrun] [--account A --partition P --time HH:MM:SS] \\
        [--container-image IMG] [--container-mounts SRC:DST,...] [--env KEY=VALUE ...] [--job-dir DIR] \\
        [dotted.overrides ...]

The recipe is validated for the launch's world size before anything is submitted. The job runs
`torchrun ... -m megatron_hbpo.train --config X --resume auto [overrides]` on every node. `--dryrun`
prints what would be submitted (for SLURM, the sbatch script) without running it.
"""

from __future__ import annotations

import argparse
import sys

from megatron_hbpo.config import ConfigError, load_recipe


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Launch the HBPO trainer with NeMo-Run.")
    parser.add_argument("--config", required=True)
    parser.add_argument("--executor", choices=["local", "slurm"], default="local")
    parser.add_argument("--nodes", type=int, help="default: the recipe's cluster.nodes")
    parser.add_argument("--gpus-per-node", type=int, help="default: the recipe's cluster.gpus_per_node")
    parser.add_argument("--dryrun", action="store_true")
    parser.add_argument("--name", help="experiment name (default: the recipe's name)")
    parser.add_argument("--account")
    parser.add_argument("--partition")
    parser.add_argument("--time", default="04:00:00")
    parser.add_argument("--container-image")
    parser.add_argument("--container-mounts", default="", help="comma-separated SRC:DST pairs")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--job-dir", default="nemo_run_jobs", help="where NeMo-Run keeps job files and logs")
    parser.add_argument("overrides", nargs="*")
    return parser.parse_args(argv)


def build(args: argparse.Namespace):
    """(task, executor, name) for nemo_run.run, after validating the recipe for this launch."""
    import nemo_run as run

    base = load_recipe(args.config, args.overrides)
    nodes = args.nodes or base.cluster.nodes
    gpus = args.gpus_per_node or base.cluster.gpus_per_node
    cluster = [f"cluster.nodes={nodes}", f"cluster.gpus_per_node={gpus}"]
    recipe = load_recipe(args.config, [*args.overrides, *cluster], world_size=nodes * gpus)
    env = {"PYTHONUNBUFFERED": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
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
        executor = run.LocalExecutor(ntasks_per_node=gpus, launcher="torchrun", env_vars=env)
    else:
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

    run.run(task, executor=executor, name=name, dryrun=args.dryrun, tail_logs=not args.dryrun)
    return 0


if __name__ == "__main__":
    sys.exit(main())
