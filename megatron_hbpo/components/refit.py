"""Policy weights -> the rollout engine after every update, and the check that the engine follows.

`Refitter.refit` is collective: every rank iterates the export stream (TP gathers, PP broadcasts);
the engine ranks load it. `RefitGuard` records the step-1 rollout/trainer mismatch, taken before any
refit, and stops the run when a later step's mismatch jumps (algo/mismatch.refit_mismatch_problem).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from megatron_hbpo.algo.mismatch import refit_mismatch_problem
from megatron_hbpo.config import RefitCheckConfig
from megatron_hbpo.rollout.engine import RolloutEngine

if TYPE_CHECKING:
    from transformers import PretrainedConfig

class RefitMismatchError(RuntimeError):
    """The rollout engine's log-probs left the trainer's after a refit (raised on every rank together)."""


class Refitter:
    def __init__(self, model: torch.nn.Module, hf_config: PretrainedConfig, engine: RolloutEngine | None, *,
                 bucket_bytes: int):
        self.model = model
        self.hf_config = hf_config
        self.engine = engine
        self.bucket_bytes = bucket_bytes
        self.count = 0  # refits done by this process

    def refit(self) -> None:
        from megatron_hbpo.convert.export import HFExportStream

        stream = HFExportStream(self.model, self.hf_config, bucket_bytes=self.bucket_bytes)
        if self.engine is not None:
            self.engine.update_weights(stream)  # wakes what it needs; the next generate finds it awake
        else:
            for _ in stream:
                pass
        self.count += 1


def mismatch_stats(rollout_logp: Sequence[torch.Tensor], train_logp: Sequence[torch.Tensor], *,
                   threshold: float, dp_group: Any) -> dict[str, float]:
    """|logp_rollout - logp_train| over the sampled tokens of all DP ranks: mean, max, the fraction
    above `threshold` and the token count (collective over DP: the model-parallel ranks of a DP rank
    hold the same sequences, so each token counts once)."""
    diff = (torch.cat(list(rollout_logp)).double() - torch.cat(list(train_logp)).double()).abs()
    sums = torch.tensor([float(diff.sum()), float(diff.numel()), float((diff > threshold).sum())], dtype=torch.float64)
    peak = torch.tensor([float(diff.max()) if diff.numel() else 0.0], dtype=torch.float64)
    dist.all_reduce(sums, group=dp_group)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=dp_group)
    tokens = max(float(sums[1]), 1.0)
    return {"mean_abs": float(sums[0]) / tokens, "max_abs": float(peak[0]), "frac_above": float(sums[2]) / tokens,
            "tokens": float(sums[1])}


class RefitGuard:
    """`observe(step, mean_abs, refits)` once per step, before the update, on every rank with the same value."""

    def __init__(self, cfg: RefitCheckConfig, params_dtype: str, baseline: float | None = None):
        self.cfg = cfg
        self.ceiling = cfg.ceiling_fp32 if params_dtype == "fp32" else cfg.ceiling_bf16
        self.baseline = baseline

    def observe(self, step: int, mean_abs: float, refits: int) -> None:
        if refits == 0:
            if step == 1:
                self.baseline = mean_abs
            return
        if not self.cfg.enabled:
            return
        problem = refit_mismatch_problem(mean_abs, step=step, baseline=self.baseline, ceiling=self.ceiling,
                                         factor=self.cfg.factor)
        if problem:
            raise RefitMismatchError(problem)
