"""The HBPO loop (../ARCHITECTURE.md "One HBPO step"), in one SPMD job.

    prompts (step's slice per DP rank) -> budgeted rollouts (vLLM) -> verify + reward -> advantage
    -> logp_old (Megatron, no grad) -> one optimizer step per mini-batch -> refit vLLM -> metrics
    -> checkpoint every N steps (and on SIGTERM)

Who does what: one rank per model-parallel group (TP rank 0, PP stage 0) holds a rollout engine,
generates and verifies its DP slice, and hands the samples to the rest of its group; every rank
computes the same rewards and advantages from them (pure functions of the samples) and runs the
Megatron step. The refit stream is collective (TP gathers, PP broadcasts); the engine holders load it.

Reproducibility: every random draw of step s (vLLM sampling uses the global torch generator on CPU;
the prompt stream is seeded separately, see data/source.py) is seeded from (seed, s, DP rank) at the
start of the step, so a checkpoint needs the step, weights, optimizer and scheduler, not a snapshot
of generator states that vLLM's start-up would disturb anyway. Resuming from step s's checkpoint
gives the uninterrupted run's metrics for every later step (tests/test_trainer.py checks it).
"""

from __future__ import annotations

import json
import math
import random
import signal
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from megatron_hbpo.algo.advantage import group_normalized_advantage, hierarchical_advantage
from megatron_hbpo.algo.mismatch import logprob_mismatch, refit_mismatch_problem
from megatron_hbpo.algo.reward import binary_reward, hbpo_reward
from megatron_hbpo.config import Recipe
from megatron_hbpo.data.source import PromptSource, TaskPrompt
from megatron_hbpo.evaluate import level_sort_key
from megatron_hbpo.megatron.batching import PolicySequence
from megatron_hbpo.rollout.engine import Sample, SamplingSettings
from megatron_hbpo.rollout.requests import budgeted_requests

REFIT_BUCKET_BYTES = 256 << 20


def seed_everything(seed: int, *parts: Any) -> None:
    """Seed python, numpy and torch from (seed, parts): the same parts give the same draws."""
    value = int.from_bytes(repr((seed, *parts)).encode(), "little") % (2**63 - 1)
    random.seed(value)
    np.random.seed(value % 2**32)
    torch.manual_seed(value)


@dataclass
class RolloutRecord:
    """One scored rollout, as the whole model-parallel group sees it."""

    prompt_ids: list[int]
    response_ids: list[int]
    logprobs: torch.Tensor
    length: int
    budget: int | None
    group_id: int
    level: str | None
    correct: bool
    format_ok: bool
    truncated: bool


def holds_rollout_engine() -> bool:
    """Whether this rank generates for its model-parallel group (its first rank: TP 0, PP stage 0)."""
    from megatron.core import parallel_state

    group = parallel_state.get_model_parallel_group()
    return dist.get_rank() == dist.get_process_group_ranks(group)[0]


class RefitMismatchError(RuntimeError):
    """The rollout engine's log-probs left the trainer's after a refit (raised on every rank together)."""


class PreemptionFlag:
    """SIGTERM (SLURM preemption, torchrun shutdown) sets a flag; the loop saves and exits at the
    end of the step, all ranks together."""

    def __init__(self) -> None:
        self.raised = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:  # noqa: ARG002 (signal handler signature)
        self.raised = True

    def any_rank(self) -> bool:
        flag = torch.tensor([float(self.raised)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self) -> None:
        signal.signal(signal.SIGTERM, self._previous)


class Trainer:
    """Owns the policy (Megatron), the rollout engine (on generator ranks), the verifier and the logs.

    Requires `megatron.parallel.initialize`. `run()` trains from `start_step` to train.total_steps.
    """

    def __init__(self, recipe: Recipe, policy: Any, hf_config: Any, tokenizer: Any, engine: Any | None,
                 verifier: Any | None, run_dir: Path, *, source: PromptSource | None = None,
                 log: Callable[[str], None] = print):
        from megatron.core import parallel_state

        self.recipe, self.policy, self.hf_config, self.tokenizer = recipe, policy, hf_config, tokenizer
        self.engine, self.verifier, self.run_dir, self.log = engine, verifier, Path(run_dir), log
        self.source = source or PromptSource(recipe, log=log)
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.mp_group = parallel_state.get_model_parallel_group()
        self.mp_src = dist.get_process_group_ranks(self.mp_group)[0]
        self.is_generator = holds_rollout_engine()
        if self.is_generator and (engine is None or verifier is None):
            raise ValueError("the first rank of each model-parallel group needs a rollout engine and a verifier")
        self.rank0 = dist.get_rank() == 0
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.tb = None
        self.start_step = 1
        self.refits = 0  # refits done by this process; the step-1 mismatch is measured before the first
        self.mismatch_baseline: float | None = None

    # -- rollouts ----------------------------------------------------------------------------------

    def _my_prompts(self, step: int) -> tuple[list[TaskPrompt], int]:
        t = self.recipe.train
        batch = self.source.batch(step - 1, t.prompts_per_step)
        per_rank = t.prompts_per_step // self.dp_size
        first = self.dp_rank * per_rank
        return batch[first:first + per_rank], first

    def rollouts(self, step: int) -> tuple[list[RolloutRecord], float, float]:
        """This DP rank's scored rollouts, identical on every rank of its model-parallel group.
        Returns (records, seconds generating, seconds verifying)."""
        records, gen_s, verify_s = None, 0.0, 0.0
        if self.is_generator:
            prompts, first = self._my_prompts(step)
            r = self.recipe.rollout
            sampling = SamplingSettings(temperature=r.temperature, top_p=r.top_p, max_tokens=r.max_response_length)
            requests = budgeted_requests(self.tokenizer, [p.problem for p in prompts], n_rollouts=r.n_rollouts,
                                         algo=self.recipe.algo, data=self.recipe.data, sampling=sampling,
                                         first_group_id=first)
            for request in requests:
                if len(request.prompt_ids) > r.max_prompt_length:
                    prompt = prompts[request.group_id - first]
                    raise ValueError(f"a prompt has {len(request.prompt_ids)} tokens, more than "
                                     f"rollout.max_prompt_length={r.max_prompt_length}: {prompt.problem[:80]!r}")
            start = time.perf_counter()
            self.engine.wake()
            samples: list[Sample] = self.engine.generate(requests)
            self.engine.sleep()
            gen_s = time.perf_counter() - start
            start = time.perf_counter()
            texts = self.tokenizer.batch_decode([s.response_ids for s in samples], skip_special_tokens=True)
            golds = [prompts[s.group_id - first].answer for s in samples]
            verdicts = self.verifier.score(texts, golds, think_close=self.recipe.algo.think_close)
            verify_s = time.perf_counter() - start
            records = [RolloutRecord(prompt_ids=s.prompt_ids, response_ids=s.response_ids, logprobs=s.logprobs,
                                     length=s.length, budget=s.budget, group_id=s.group_id,
                                     level=prompts[s.group_id - first].level, correct=v.correct,
                                     # A truncated response is a format error (HBPO_SPEC.md s2).
                                     format_ok=v.format_ok and not s.truncated, truncated=s.truncated)
                       for s, v in zip(samples, verdicts)]
        if dist.get_world_size(self.mp_group) > 1:
            box = [records]
            dist.broadcast_object_list(box, src=self.mp_src, group=self.mp_group)
            records = box[0]
        return records, gen_s, verify_s

    # -- reward and advantage ----------------------------------------------------------------------

    def rewards_and_advantages(self, records: list[RolloutRecord]) -> tuple[torch.Tensor, torch.Tensor]:
        a, r = self.recipe.algo, self.recipe.rollout
        lengths = torch.tensor([x.length for x in records], dtype=torch.float64)
        correct = torch.tensor([x.correct for x in records])
        format_ok = torch.tensor([x.format_ok for x in records])
        groups = torch.tensor([x.group_id for x in records])
        if a.name == "grpo":
            rewards = binary_reward(correct, format_ok, format_error_reward=a.format_error_reward,
                                    dtype=torch.float64)
            return rewards, group_normalized_advantage(rewards, groups, eps=a.adv_eps)
        budgets = torch.tensor([x.budget for x in records], dtype=torch.float64)
        rewards = hbpo_reward(lengths, budgets, correct, format_ok, l_max=r.max_response_length, alpha=a.alpha,
                              beta=a.beta, format_error_reward=a.format_error_reward)
        advantages = hierarchical_advantage(rewards, budgets, groups, l_max=r.max_response_length, beta=a.beta,
                                            w_intra=a.w_intra, eps=a.adv_eps, center_intra=a.center_intra)
        return rewards, advantages

    # -- one step ----------------------------------------------------------------------------------

    def step(self, step: int) -> dict:
        t0 = time.perf_counter()
        seed_everything(self.recipe.train.seed, "step", step, self.dp_rank)
        records, gen_s, verify_s = self.rollouts(step)
        t1 = time.perf_counter()
        rewards, advantages = self.rewards_and_advantages(records)
        sequences = [PolicySequence(tokens=x.prompt_ids + x.response_ids, prompt_length=len(x.prompt_ids),
                                    advantage=float(adv), logp_rollout=x.logprobs)
                     for x, adv in zip(records, advantages)]
        t2 = time.perf_counter()
        logp_old = self.policy.logprobs(sequences)
        for seq, logp in zip(sequences, logp_old):
            seq.logp_old = logp
        self._check_refit(step, records, logp_old)
        t3 = time.perf_counter()
        train_metrics = []
        for mini in self._mini_batches(records, sequences):
            train_metrics.append(self.policy.train_step(mini))
        t4 = time.perf_counter()
        self.refit()
        t5 = time.perf_counter()
        mismatch = logprob_mismatch(torch.cat([x.logprobs for x in records]), torch.cat(logp_old),
                                    threshold=self.recipe.logging.mismatch_threshold)
        times = {"rollout": gen_s, "reward": verify_s + (t2 - t1), "logp_old": t3 - t2, "train": t4 - t3,
                 "refit": t5 - t4, "step": t5 - t0}
        return self._step_metrics(step, records, rewards, advantages, train_metrics, mismatch, times)

    def _check_refit(self, step: int, records: list[RolloutRecord], logp_old: list[torch.Tensor]) -> None:
        """Record the step-1 mismatch before any refit; after a refit, stop (on every rank at once) if the
        mismatch jumped: the engine then generates with other weights than the policy's."""
        from megatron.core import parallel_state

        diff = (torch.cat([x.logprobs for x in records]).double() - torch.cat(logp_old).double()).abs()
        # The model-parallel ranks of a DP rank hold the same records: reduce over DP only.
        totals = torch.tensor([float(diff.sum()), float(diff.numel())], dtype=torch.float64)
        dist.all_reduce(totals, group=parallel_state.get_data_parallel_group())
        mean_abs = float(totals[0] / max(float(totals[1]), 1.0))
        if self.refits == 0:
            if step == 1:
                self.mismatch_baseline = mean_abs
            return
        check = self.recipe.rollout.refit_check
        if not check.enabled:
            return
        ceiling = check.ceiling_fp32 if self.recipe.model.params_dtype == "fp32" else check.ceiling_bf16
        problem = refit_mismatch_problem(mean_abs, step=step, baseline=self.mismatch_baseline, ceiling=ceiling,
                                         factor=check.factor)
        if problem:
            raise RefitMismatchError(problem)

    def _mini_batches(self, records: list[RolloutRecord], sequences: list[PolicySequence]):
        """Consecutive groups of train.mini_batch_prompts / DP prompts (all rollouts of a prompt stay together)."""
        per_rank = self.recipe.train.mini_batch_prompts // self.dp_size
        order = list(dict.fromkeys(x.group_id for x in records))
        for first in range(0, len(order), per_rank):
            chosen = set(order[first:first + per_rank])
            yield [seq for x, seq in zip(records, sequences) if x.group_id in chosen]

    def refit(self) -> None:
        """Megatron weights -> the rollout engines (collective: every rank iterates the stream)."""
        from megatron_hbpo.convert.export import HFExportStream

        stream = HFExportStream(self.policy.model[0], self.hf_config, bucket_bytes=REFIT_BUCKET_BYTES)
        if self.is_generator:
            self.engine.wake()  # vLLM loads weights into awake memory; the next generate finds it awake
            self.engine.update_weights(stream)
        else:
            for _ in stream:
                pass
        self.refits += 1

    # -- metrics -----------------------------------------------------------------------------------

    def _step_metrics(self, step, records, rewards, advantages, train_metrics, mismatch, times) -> dict:
        rows = [{"budget": x.budget, "level": x.level, "length": x.length, "correct": x.correct,
                 "format_ok": x.format_ok, "truncated": x.truncated, "reward": float(rw), "advantage": float(ad)}
                for x, rw, ad in zip(records, rewards, advantages)]
        mismatch_rows = [mismatch] if self.is_generator else []
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (rows if self.is_generator else [], mismatch_rows))
        rows = [row for part, _ in gathered for row in part]
        mismatches = [m for _, part in gathered for m in part]

        def summary(subset: list[dict]) -> dict:
            n = max(len(subset), 1)
            return {"reward": sum(r["reward"] for r in subset) / n, "accuracy": sum(r["correct"] for r in subset) / n,
                    "length": sum(r["length"] for r in subset) / n}

        metrics: dict[str, Any] = {"step": step}
        metrics.update({f"rollout/{k}": v for k, v in summary(rows).items()})
        metrics["rollout/format_error_rate"] = sum(not r["format_ok"] for r in rows) / len(rows)
        metrics["rollout/truncation_rate"] = sum(r["truncated"] for r in rows) / len(rows)
        for key, name in (("budget", "budget"), ("level", "level")):
            by = defaultdict(list)
            for r in rows:
                if r[key] is not None:
                    by[r[key]].append(r)
            for value in sorted(by, key=level_sort_key):
                metrics.update({f"{name}_{value}/{k}": v for k, v in summary(by[value]).items()})
        adv = torch.tensor([r["advantage"] for r in rows], dtype=torch.float64)
        metrics.update({"advantage/mean": float(adv.mean()), "advantage/std": float(adv.std()) if len(adv) > 1 else 0.0,
                        "advantage/min": float(adv.min()), "advantage/max": float(adv.max())})
        tokens = sum(m.response_tokens for m in train_metrics)
        for field in ("loss", "clip_fraction", "dual_clip_fraction", "kl", "entropy"):
            # Token-weighted over the mini-batches: the rollout batch's token-mean.
            weighted = sum(getattr(m, field) * m.response_tokens for m in train_metrics)
            metrics[f"train/{field}"] = weighted / max(tokens, 1)
        metrics["train/grad_norm"] = sum(m.grad_norm for m in train_metrics) / len(train_metrics)
        metrics["train/lr"] = train_metrics[-1].lr
        metrics["train/optimizer_steps"] = len(train_metrics)
        metrics["train/padding_fraction"] = sum(m.padding_fraction for m in train_metrics) / len(train_metrics)
        metrics["mismatch/mean_abs"] = sum(m["mean_abs"] * m["tokens"] for m in mismatches) / max(
            sum(m["tokens"] for m in mismatches), 1)
        metrics["mismatch/max_abs"] = max(m["max_abs"] for m in mismatches)
        metrics["mismatch/frac_above"] = sum(m["frac_above"] * m["tokens"] for m in mismatches) / max(
            sum(m["tokens"] for m in mismatches), 1)
        metrics["rollout/response_tokens"] = sum(r["length"] for r in rows)
        metrics["rollout/samples"] = len(rows)
        metrics.update({f"time/{k}": v for k, v in times.items()})
        metrics["time/tokens_per_s"] = metrics["rollout/response_tokens"] / max(times["step"], 1e-9)
        return metrics

    def write_metrics(self, metrics: dict) -> None:
        if not self.rank0:
            return
        lg = self.recipe.logging
        if lg.jsonl:
            with self.metrics_path.open("a") as handle:
                handle.write(json.dumps(metrics) + "\n")
        if self.tb is not None:
            for key, value in metrics.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.tb.add_scalar(key, value, metrics["step"])
            self.tb.flush()

    def _open_logs(self) -> None:
        """Metrics of steps after the resumed checkpoint are dropped: the run re-does those steps."""
        if not self.rank0:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.metrics_path.exists():
            kept = [line for line in self.metrics_path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] < self.start_step]
            tmp = self.metrics_path.with_name(".metrics.jsonl.tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            tmp.replace(self.metrics_path)
        if self.recipe.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=self.start_step)

    # -- checkpoints -------------------------------------------------------------------------------

    def resume(self) -> None:
        from megatron_hbpo.megatron.checkpoint import load_training_state, resolve_resume

        ck = self.recipe.checkpoint
        path = resolve_resume(ck.resume, ck.dir)
        if path is None:
            return
        state = load_training_state(self.policy, path)
        self.start_step = int(state["step"]) + 1
        self.mismatch_baseline = state.get("mismatch_baseline")
        self.log(f"resumed from {path} (step {state['step']}); continuing at step {self.start_step}")

    def save(self, step: int) -> None:
        from megatron_hbpo.megatron.checkpoint import checkpoint_dir, prune_checkpoints, save_training_state

        ck = self.recipe.checkpoint
        target = checkpoint_dir(ck.dir, step)
        if target.exists():  # already saved at this step (SIGTERM right after a periodic save)
            return
        save_training_state(self.policy, target, {"step": step, "recipe": self.recipe.name,
                                                  "data_cursor": step * self.recipe.train.prompts_per_step,
                                                  "seed": self.recipe.train.seed,
                                                  "mismatch_baseline": self.mismatch_baseline})
        if self.rank0:
            prune_checkpoints(ck.dir, ck.keep_last)
        dist.barrier()

    # -- the loop ----------------------------------------------------------------------------------

    def run(self, *, on_step: Callable[[int, dict], None] | None = None) -> list[dict]:
        """Train to train.total_steps; returns the metrics of the steps run. Stops early (after a
        checkpoint) on SIGTERM and sets `self.preempted`."""
        self._open_logs()
        total = self.recipe.train.total_steps
        ck = self.recipe.checkpoint
        flag = PreemptionFlag()
        self.preempted = False
        history = []
        bar = None
        if self.rank0 and self.recipe.logging.progress_bar:
            from tqdm import tqdm

            bar = tqdm(total=total, initial=self.start_step - 1, desc=self.recipe.name, unit="step", dynamic_ncols=True)
        try:
            for step in range(self.start_step, total + 1):
                metrics = self.step(step)
                if on_step is not None:
                    on_step(step, metrics)
                preempt = flag.any_rank()
                if step % ck.save_interval == 0 or step == total or preempt:
                    start = time.perf_counter()
                    self.save(step)
                    metrics["time/checkpoint"] = time.perf_counter() - start
                self.write_metrics(metrics)
                history.append(metrics)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix_str(self._postfix(metrics))
                if preempt:
                    self.preempted = True
                    self.log(f"SIGTERM: saved the checkpoint of step {step} and stopped; resume with --resume auto")
                    break
        finally:
            flag.restore()
            if bar is not None:
                bar.close()
            if self.tb is not None:
                self.tb.close()
        return history

    def _postfix(self, m: dict) -> str:
        per_budget = " ".join(f"{k.split('/')[0][7:]}:{v:.0f}" for k, v in m.items()
                              if k.startswith("budget_") and k.endswith("/length"))
        return (f"{m['time/tokens_per_s']:.0f} tok/s reward {m['rollout/reward']:.2f} "
                f"acc {m['rollout/accuracy']:.2f} len {per_budget or round(m['rollout/length'], 1)}")


def deterministic_metrics(metrics: dict) -> dict:
    """The metrics that a resumed run must reproduce exactly (everything but timings)."""
    return {k: v for k, v in metrics.items() if not k.startswith("time/")}
