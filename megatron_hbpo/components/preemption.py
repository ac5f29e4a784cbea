"""SIGTERM (SLURM preemption, torchrun shutdown) sets a flag; the loop saves a checkpoint and stops at
the end of the step, all ranks together."""

from __future__ import annotations

import signal
from typing import Any

import torch
import torch.distributed as dist


class PreemptionFlag:
    def __init__(self) -> None:
        self.raised = False
        self._previous: Any = None

    def __enter__(self) -> PreemptionFlag:
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        signal.signal(signal.SIGTERM, self._previous)

    def _handle(self, signum: int, frame: Any) -> None:  # noqa: ARG002 (signal handler signature)
        self.raised = True

    def any_rank(self) -> bool:
        """Collective: whether any rank got SIGTERM."""
        flag = torch.tensor([float(self.raised)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
