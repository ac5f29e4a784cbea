"""Process groups: torch.distributed + Megatron parallel_state, on GPU (NCCL) or CPU (gloo)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from megatron_hbpo.config import ParallelConfig
from megatron_hbpo.megatron import cpu


def initialize(parallel: ParallelConfig, seed: int) -> None:
    """Start the default group (torchrun's env:// or a world of one) and Megatron's model-parallel groups.

    Call after the recipe has been validated (this is where the process group starts) and after
    `runtime.configure()` (which installs the CPU shims where there is no CUDA).
    """
    from megatron.core import parallel_state

    on_cpu = not torch.cuda.is_available()
    if on_cpu and not cpu.is_enabled():
        raise RuntimeError("Megatron on CPU needs the CPU shims: call megatron_hbpo.runtime.configure() at the "
                           "start of the program, before parallel.initialize")
    if not dist.is_initialized():
        if not on_cpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "gloo" if on_cpu else "nccl"
        if "RANK" in os.environ:  # torchrun's env://
            dist.init_process_group(backend=backend)
        else:  # plain `python`: a world of one. Not through os.environ: a child process (a tool, a
            # torchrun) would inherit RANK and this process's MASTER_PORT and fail to bind it.
            dist.init_process_group(backend=backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0,
                                    world_size=1)
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        context_parallel_size=parallel.context_parallel_size,
    )
    seed_model_init(seed)


def seed_model_init(seed: int) -> None:
    """Seed torch and Megatron's model-parallel RNG: a model built next initialises from `seed` alone."""
    from megatron.core import tensor_parallel

    on_cpu = not torch.cuda.is_available()
    torch.manual_seed(seed)
    # On CPU there is no CUDA RNG to fork per TP rank: Megatron's inference tracker makes the
    # tracker a no-op (dropout is 0 in these models anyway).
    tensor_parallel.model_parallel_cuda_manual_seed(seed, inference_rng_tracker=on_cpu, force_reset_rng=on_cpu)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
