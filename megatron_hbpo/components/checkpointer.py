"""When and what to checkpoint; the mechanism (dist_checkpointing, atomic directories) is megatron/checkpoint.py.

Policy: save every `checkpoint.save_interval` steps, at the last step, and at the end of a step in
which SIGTERM arrived; keep the newest `checkpoint.keep_last`; resume from `checkpoint.resume`
(auto: the newest complete one).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch.distributed as dist

from megatron_hbpo.config import CheckpointConfig
from megatron_hbpo.megatron import checkpoint as mechanism

if TYPE_CHECKING:
    from megatron_hbpo.megatron.train_step import MegatronPolicy


class CheckpointManager:
    """Collective: every rank calls `resume` and `save` together."""

    def __init__(self, cfg: CheckpointConfig, policy: MegatronPolicy, *, total_steps: int,
                 log: Callable[[str], None] = print):
        self.cfg = cfg
        self.policy = policy
        self.total_steps = total_steps
        self.log = log

    def resume(self) -> dict | None:
        """Load the checkpoint `checkpoint.resume` names into the policy; its trainer state, or None to start fresh."""
        path = mechanism.resolve_resume(self.cfg.resume, self.cfg.dir)
        if path is None:
            return None
        state = mechanism.load_training_state(self.policy, path)
        self.log(f"resumed from {path} (step {state['step']}); continuing at step {int(state['step']) + 1}")
        return state

    def should_save(self, step: int, preempted: bool) -> bool:
        return step % self.cfg.save_interval == 0 or step == self.total_steps or preempted

    def save(self, step: int, trainer_state: dict) -> float:
        """Write the checkpoint of `step` (unless it exists: SIGTERM right after a periodic save) and prune;
        returns the seconds it took."""
        start = time.perf_counter()
        target = mechanism.checkpoint_dir(self.cfg.dir, step)
        if not target.exists():
            mechanism.save_training_state(self.policy, target, trainer_state)
            if dist.get_rank() == 0:
                mechanism.prune_checkpoints(self.cfg.dir, self.cfg.keep_last)
            dist.barrier()
        return time.perf_counter() - start

    def path(self, step: int) -> Path:
        return mechanism.checkpoint_dir(self.cfg.dir, step)
