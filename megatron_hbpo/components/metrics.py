"""Per-step metrics: a pure summary of the step (`step_summary`) and its writers (`MetricsLogger`).

Keys: rollout/* (reward, accuracy, length, format-error and truncation rates, samples, tokens),
budget_<b>/* and level_<l>/* (reward, accuracy, length), advantage/* (mean, std, min, max),
train/* (loss, clip and dual-clip fractions, KL, entropy: token-weighted over the mini-batches;
grad norm, LR, optimizer steps, padding), mismatch/* (rollout vs trainer log-probs), time/*.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from megatron_hbpo import atomic
from megatron_hbpo.config import LoggingConfig
from megatron_hbpo.evaluation.metrics import level_sort_key

TRAIN_MEANS = ("loss", "clip_fraction", "dual_clip_fraction", "kl", "entropy")


def _reward_accuracy_length(rows: Sequence[dict]) -> dict[str, float]:
    n = max(len(rows), 1)
    return {"reward": sum(r["reward"] for r in rows) / n, "accuracy": sum(r["correct"] for r in rows) / n,
            "length": sum(r["length"] for r in rows) / n}


def step_summary(step: int, rows: Sequence[dict], mismatch: dict[str, float], train_results: Sequence[Any],
                 times: dict[str, float]) -> dict[str, Any]:
    """The metrics of one step from the step's rollout rows ({budget, level, length, correct, format_ok,
    truncated, reward, advantage}), the rollout/trainer mismatch over all DP ranks
    (components/refit.mismatch_stats), this rank's mini-batch TrainStepResults and the phase timings."""
    metrics: dict[str, Any] = {"step": step}
    metrics.update({f"rollout/{k}": v for k, v in _reward_accuracy_length(rows).items()})
    metrics["rollout/format_error_rate"] = sum(not r["format_ok"] for r in rows) / len(rows)
    metrics["rollout/truncation_rate"] = sum(r["truncated"] for r in rows) / len(rows)
    for key in ("budget", "level"):
        by: dict[Any, list[dict]] = defaultdict(list)
        for r in rows:
            if r[key] is not None:
                by[r[key]].append(r)
        for value in sorted(by, key=level_sort_key):
            metrics.update({f"{key}_{value}/{k}": v for k, v in _reward_accuracy_length(by[value]).items()})
    adv = torch.tensor([r["advantage"] for r in rows], dtype=torch.float64)
    metrics.update({"advantage/mean": float(adv.mean()), "advantage/std": float(adv.std()) if len(adv) > 1 else 0.0,
                    "advantage/min": float(adv.min()), "advantage/max": float(adv.max())})
    tokens = sum(r.response_tokens for r in train_results)
    normalizer = sum(r.normalizer for r in train_results)
    extra = [name for name in train_results[0].metrics if name not in TRAIN_MEANS]
    for name in (*TRAIN_MEANS, *extra):
        # Weighted over the mini-batches by what each averages over (the entropy: tokens; the loss and
        # its metrics: the loss's normaliser, tokens for a token-mean loss): the rollout batch's mean.
        per_token = name == "entropy"
        weighted = sum((r.loss if name == "loss" else r.metrics.get(name, 0.0))
                       * (r.response_tokens if per_token else r.normalizer) for r in train_results)
        metrics[f"train/{name}"] = weighted / max(tokens if per_token else normalizer, 1)
    if "clipped_tokens" in train_results[0].metrics:  # a loss whose normaliser is not the token count
        clipped = sum(r.metrics["clipped_tokens"] * r.normalizer for r in train_results)
        metrics["train/clip_fraction"] = clipped / max(tokens, 1)
    metrics["train/grad_norm"] = sum(r.grad_norm for r in train_results) / len(train_results)
    metrics["train/lr"] = train_results[-1].lr
    metrics["train/optimizer_steps"] = len(train_results)
    metrics["train/padding_fraction"] = sum(r.padding_fraction for r in train_results) / len(train_results)
    metrics.update({f"mismatch/{k}": mismatch[k] for k in ("mean_abs", "max_abs", "frac_above")})
    metrics["rollout/response_tokens"] = sum(r["length"] for r in rows)
    metrics["rollout/samples"] = len(rows)
    metrics.update({f"time/{k}": v for k, v in times.items()})
    metrics["time/tokens_per_s"] = metrics["rollout/response_tokens"] / max(times["step"], 1e-9)
    return metrics


def deterministic_metrics(metrics: dict) -> dict:
    """The metrics that a resumed run must reproduce exactly (everything but timings)."""
    return {k: v for k, v in metrics.items() if not k.startswith("time/")}


class MetricsLogger:
    """Rank 0 writes each step's metrics to `<dir>/metrics.jsonl` and TensorBoard and shows a progress
    bar; other ranks write nothing. Opening it after a resume drops the lines of steps at or after
    `start_step` (the run re-does them), so the files never hold a step twice."""

    def __init__(self, cfg: LoggingConfig, run_dir: Path, *, name: str, start_step: int, total_steps: int,
                 enabled: bool):
        self.cfg = cfg
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tb: Any = None
        self.bar: Any = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] < start_step]
            atomic.write_text(self.path, "".join(line + "\n" for line in kept))
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.path.parent / "tensorboard"), purge_step=start_step)
        if cfg.progress_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step - 1, desc=name, unit="step", dynamic_ncols=True)

    def log(self, metrics: dict) -> None:
        if not self.enabled:
            return
        if self.cfg.jsonl:
            with self.path.open("a") as handle:
                handle.write(json.dumps(metrics) + "\n")
        if self.tb is not None:
            for key, value in metrics.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.tb.add_scalar(key, value, metrics["step"])
            self.tb.flush()
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(progress_text(metrics))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()


def progress_text(m: dict) -> str:
    per_budget = " ".join(f"{k.split('/')[0][7:]}:{v:.0f}" for k, v in m.items()
                          if k.startswith("budget_") and k.endswith("/length"))
    return (f"{m['time/tokens_per_s']:.0f} tok/s reward {m['rollout/reward']:.2f} "
            f"acc {m['rollout/accuracy']:.2f} len {per_budget or round(m['rollout/length'], 1)}")
