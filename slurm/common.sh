#!/usr/bin/env bash
# Shared launch logic for the sbatch scripts in this folder: sourced, not run.
#
# Inputs (environment): CONFIG (recipe path, required), GPUS_PER_NODE (default 8), OVERRIDES
# (dotted overrides, optional), RDZV_PORT (default 29500), CONTAINER_IMAGE and CONTAINER_MOUNTS
# (optional: run inside a pyxis/enroot container), REPO_DIR (default: the submit directory),
# VENV (default: $REPO_DIR/.venv, used when no container is given), plus SLURM's own variables.
# Every launch passes `--resume auto`: a requeued job (preemption, node failure) continues from its
# newest complete checkpoint, and the trainer saves one on the SIGTERM that `--signal` sends.

hbpo_head_node() {
  # The first host of the allocation is the rendezvous host. HBPO_HOSTNAMES lets tests fake it.
  if [[ -n "${HBPO_HOSTNAMES:-}" ]]; then
    printf '%s\n' "${HBPO_HOSTNAMES}" | tr ' ,' '\n' | sed '/^$/d' | head -n 1
  else
    scontrol show hostnames "${SLURM_JOB_NODELIST:?not inside a SLURM allocation}" | head -n 1
  fi
}

hbpo_torchrun_command() {
  # Prints the torchrun command line every node runs (one torchrun per node, N GPUs each).
  local head port nodes gpus
  head="$(hbpo_head_node)"
  port="${RDZV_PORT:-29500}"
  nodes="${SLURM_NNODES:-${SLURM_JOB_NUM_NODES:?SLURM_NNODES is not set}}"
  gpus="${GPUS_PER_NODE:-8}"
  : "${CONFIG:?set CONFIG to a recipe, e.g. recipes/r1_distill_qwen_1p5b.yaml}"
  printf 'torchrun --nnodes %s --nproc-per-node %s --rdzv-backend c10d --rdzv-endpoint %s:%s --rdzv-id %s' \
    "${nodes}" "${gpus}" "${head}" "${port}" "${SLURM_JOB_ID:-hbpo}"
  printf ' -m megatron_hbpo.train --config %s --resume auto' "${CONFIG}"
  if [[ -n "${OVERRIDES:-}" ]]; then
    printf ' %s' "${OVERRIDES}"
  fi
  printf ' cluster.nodes=%s cluster.gpus_per_node=%s\n' "${nodes}" "${gpus}"
}

hbpo_launch() {
  local repo command container_args=()
  repo="${REPO_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}"
  command="$(hbpo_torchrun_command)"
  export PYTHONUNBUFFERED=1 TORCH_NCCL_ASYNC_ERROR_HANDLING=1 NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
  # torchrun passes the SIGTERM on to the ranks and SIGKILLs them 30 s later by default, too soon for
  # a large model to finish its step and checkpoint; leave them most of the 300 s that --signal gives.
  export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-270}"
  if [[ -n "${CONTAINER_IMAGE:-}" ]]; then
    container_args=(--container-image="${CONTAINER_IMAGE}" --container-workdir="${repo}")
    if [[ -n "${CONTAINER_MOUNTS:-}" ]]; then
      container_args+=(--container-mounts="${CONTAINER_MOUNTS}")
    fi
  else
    command="source '${VENV:-${repo}/.venv}/bin/activate' && cd '${repo}' && ${command}"
  fi
  echo "[hbpo] $(date -Is) job ${SLURM_JOB_ID:-?} restart ${SLURM_RESTART_COUNT:-0}: ${command}"
  # One task per node; each runs torchrun, which starts the node's GPU processes.
  srun --ntasks-per-node=1 --kill-on-bad-exit=1 "${container_args[@]}" bash -c "${command}"
}
