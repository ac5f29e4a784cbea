"""Run Megatron-Core on CPU (gloo) for development and CI: the shims, in one place.

Megatron-Core assumes CUDA in a few places: it asks `torch.cuda.current_device()` where to put
buffers, hard-codes `device="cuda"` / `.cuda()` in the pipeline schedules and checkpointing, calls
stream/event/synchronize APIs, and asserts `Tensor.type()` names a `torch.cuda.*` type in grad
clipping and the distributed optimizer. `enable()` patches exactly those, and only when CUDA is
absent: on a GPU machine it returns False and touches nothing, so GPU code paths never see it.
Which Megatron calls need which shim is in docs/environment.md. `runtime.configure()` calls `enable()`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch

_enabled = False
_mode: _CudaToCpu | None = None


def _is_cuda(device: object) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return isinstance(device, str) and device.startswith("cuda")


class _CudaToCpu(torch.overrides.TorchFunctionMode):
    """Maps `device="cuda"`, `.cuda()` and `.to("cuda")` inside Megatron to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


class _NullStream:
    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def record_event(self, *args, **kwargs):
        return _NullEvent()


class _NullEvent:
    """Host-clock event, so that Megatron's timers still measure something on CPU."""

    def __init__(self, *args, **kwargs):
        self.time = 0.0

    def record(self, *args, **kwargs):
        self.time = time.perf_counter()

    def synchronize(self):
        pass

    def wait(self, *args, **kwargs):
        pass

    def query(self):
        return True

    def elapsed_time(self, end: _NullEvent) -> float:
        return (end.time - self.time) * 1000.0


def enable() -> bool:
    """Install the CPU shims if CUDA is absent (idempotent). Returns whether CPU mode is on."""
    global _enabled
    if _enabled:
        return True
    if torch.cuda.is_available():
        return False
    # Monkeypatching torch.cuda is the point of this module: setattr keeps the type checker out of it.
    patches = {
        "current_device": lambda: "cpu",  # rotary embedding, global memory buffer
        "synchronize": lambda *args, **kwargs: None,
        "empty_cache": lambda *args, **kwargs: None,
        "Stream": _NullStream,
        "current_stream": lambda *args, **kwargs: _NullStream(),
        "default_stream": lambda *args, **kwargs: _NullStream(),
        "stream": lambda *args, **kwargs: contextlib.nullcontext(),
        "Event": _NullEvent,
    }
    for name, value in patches.items():
        setattr(torch.cuda, name, value)
    global _mode
    _mode = _CudaToCpu()
    _mode.__enter__()  # stays on for the life of the process (this thread), but see `suspended`
    # Activation recomputation saves "the CUDA RNG state" to replay dropout; the CPU generator is
    # the only one here, and Megatron saves and restores it on its own (its CUDA-state setter is a
    # deferred call that never runs without CUDA).
    torch.cuda.random.get_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    torch.cuda.get_rng_state = torch.cuda.random.get_rng_state

    original_type = torch.Tensor.type

    def cuda_named_type(self, *args, **kwargs):
        name = original_type(self, *args, **kwargs)
        if not args and not kwargs and isinstance(name, str) and name.startswith("torch.") \
                and not name.startswith("torch.cuda."):
            return name.replace("torch.", "torch.cuda.", 1)
        return name

    # clip_grads and the distributed optimizer assert cuda types.
    torch.Tensor.type = cuda_named_type  # type: ignore[method-assign]
    _enabled = True
    return True


def is_enabled() -> bool:
    return _enabled


@contextlib.contextmanager
def suspended() -> Iterator[None]:
    """Run a block without the device mode: every torch call made under a TorchFunctionMode takes a
    trip through Python, which made vLLM's CPU decoding of the tiny model 5-10x slower inside the
    training process than alone (tools/bench_rollout.py). Only for code that never asks for cuda
    (vLLM's generation on CPU); Megatron keeps the mode."""
    stack = torch.overrides._get_current_function_mode_stack()
    if _mode is None or not stack or stack[-1] is not _mode:
        yield
        return
    _mode.__exit__(None, None, None)
    try:
        yield
    finally:
        _mode.__enter__()
