"""The training loop, in one SPMD job (docs/architecture.md, "One step").

    the step's prompts -> rollouts on every rank (each replica its block; records gathered everywhere)
    -> reward, advantage (all groups) -> this DP rank's groups -> logp_old (Megatron, no grad)
    -> refit check -> one optimizer step per mini-batch -> refit -> metrics
    -> evaluation every eval.interval steps -> checkpoint every N steps (and on SIGTERM)

Each arrow is a component (megatron_hbpo/components/), the method (algo/methods.py) decides the
prompt modes, rewards, advantages and loss. The rollout layout (rollout/layout.py) is independent
of Megatron's TP/PP/DP: after the rollouts every rank holds every record of the step, computes the
same rewards and advantages (pure functions), and trains on its data-parallel rank's prompt groups.

Reproducibility: every random draw of step s is seeded from (seed, s, rollout replica) before the
rollouts (seeding.py) and the prompt stream is a function of the step (data/source.py), so resuming
from step s's checkpoint gives the uninterrupted run's metrics for every later step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from megatron_hbpo.algo.methods import Method
from megatron_hbpo.components.checkpointer import CheckpointManager
from megatron_hbpo.components.evaluator import Evaluator
from megatron_hbpo.components.metrics import MetricsLogger, step_summary
from megatron_hbpo.components.preemption import PreemptionFlag
from megatron_hbpo.components.reference import ReferencePass
from megatron_hbpo.components.refit import RefitGuard, Refitter, mismatch_stats
from megatron_hbpo.components.rollouts import RolloutRecord, RolloutWorker, policy_sequences, scored_rollouts
from megatron_hbpo.components.timer import Timer
from megatron_hbpo.data.source import PromptSource
from megatron_hbpo.megatron.batching import PolicySequence

if TYPE_CHECKING:
    from megatron_hbpo.megatron.train_step import MegatronPolicy


@dataclass
class Schedule:
    """The loop's shape (train section): prompts per step and per optimizer step, steps, seed."""

    name: str
    total_steps: int
    prompts_per_step: int
    mini_batch_prompts: int
    seed: int
    mismatch_threshold: float  # logging.mismatch_threshold: |diff| counted in mismatch/frac_above


@dataclass
class Trainer:
    """Composes the components; `run()` trains from the resumed step to the last. Requires
    `megatron.parallel.initialize`."""

    schedule: Schedule
    policy: MegatronPolicy
    method: Method
    source: PromptSource
    rollouts: RolloutWorker
    refitter: Refitter
    guard: RefitGuard
    checkpoints: CheckpointManager
    evaluator: Evaluator | None
    make_logger: Callable[[int], MetricsLogger]
    temperature: float  # the rollout temperature: logp_old is taken at it
    log: Callable[[str], None] = print
    reference: ReferencePass | None = None  # the method's base-model measurement (Method.reference)

    def __post_init__(self) -> None:
        from megatron.core import parallel_state

        self.loss = self.method.loss()
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.dp_group = parallel_state.get_data_parallel_group()
        self.start_step = 1
        self.preempted = False
        self.prepared = False

    # -- the loop ----------------------------------------------------------------------------------

    def prepare(self) -> None:
        """Collective. What the method measures on the base model before its first step (AdaptThink's
        R_ref; nothing for the others): call while the engine still holds the base weights, i.e. before
        the refit that follows a resume."""
        if self.reference is not None:
            self.method.use_reference(self.reference.table())
            self.prepared = True

    def resume(self) -> bool:
        """Load the checkpoint the recipe names, if any, into the policy; whether one was loaded. The caller
        refits the engine to the resumed weights (after evaluating the base, if it wants to)."""
        state = self.checkpoints.resume()
        if state is None:
            return False
        self.start_step = int(state["step"]) + 1
        self.guard.baseline = state.get("mismatch_baseline")
        return True

    def run(self) -> list[dict]:
        """Train to the last step; returns the metrics of the steps run. Stops early (after a checkpoint)
        on SIGTERM and sets `self.preempted`."""
        if self.reference is not None and not self.prepared:
            raise RuntimeError(f"{self.method.name} measures the base model before training: call Trainer.prepare() "
                               "before Trainer.run()")
        logger = self.make_logger(self.start_step)
        history = []
        try:
            with PreemptionFlag() as preemption:
                for step in range(self.start_step, self.schedule.total_steps + 1):
                    metrics = self.step(step)
                    if self.evaluator is not None and self.evaluator.should_evaluate(step):
                        metrics.update(Evaluator.step_metrics(self.evaluator.evaluate(f"at step {step}")))
                    preempted = preemption.any_rank()
                    if self.checkpoints.should_save(step, preempted):
                        metrics["time/checkpoint"] = self.checkpoints.save(step, self.trainer_state(step))
                    logger.log(metrics)
                    history.append(metrics)
                    if preempted:
                        self.preempted = True
                        self.log(f"SIGTERM: saved the checkpoint of step {step} and stopped; resume with --resume auto")
                        break
        finally:
            logger.close()
        return history

    def step(self, step: int) -> dict:
        timer = Timer()
        with timer("step"):
            problems = self.source.batch(step - 1, self.schedule.prompts_per_step)
            records = self.rollouts.run(step, problems, timer)  # every prompt group of the step, every rank
            with timer("reward"):
                scored = scored_rollouts(records)
                rewards, advantages = self.method.rewards_and_advantages(scored)
                mine = self.my_groups()
                chosen = [i for i, x in enumerate(records) if x.group_id in mine]
                sequences = policy_sequences([records[i] for i in chosen], advantages[chosen])
            with timer("logp_old"):
                logp_old = self.policy.logprobs(sequences, temperature=self.temperature)
                for seq, logp in zip(sequences, logp_old):
                    seq.logp_old = logp
            # Rollout vs trainer log-probs over the tokens the engine sampled (a forced first token's
            # rollout log-prob is the sampling scheme's, not the engine's).
            mismatch = mismatch_stats([records[i].sampled_logprobs for i in chosen],
                                      [records[i].sampled(logp) for i, logp in zip(chosen, logp_old)],
                                      threshold=self.schedule.mismatch_threshold, dp_group=self.dp_group)
            self.guard.observe(step, mismatch["mean_abs"], self.refitter.count)
            with timer("train"):
                results = [self.policy.train_step(mini, self.loss)
                           for mini in self.mini_batches([records[i] for i in chosen], sequences)]
            with timer("refit"):
                self.refitter.refit()
        rows = [x.metric_row(rw, ad) for x, rw, ad in zip(records, rewards, advantages)]
        return {**step_summary(step, rows, mismatch, results, dict(timer.seconds)), **self.method.step_metrics(scored)}

    # -- pieces ------------------------------------------------------------------------------------

    def my_groups(self) -> range:
        """The prompt groups (indices in the step's prompts) this data-parallel rank trains on."""
        per_rank = self.schedule.prompts_per_step // self.dp_size
        return range(self.dp_rank * per_rank, (self.dp_rank + 1) * per_rank)

    def mini_batches(self, records: Sequence[RolloutRecord], sequences: Sequence[PolicySequence]
                     ) -> Iterator[list[PolicySequence]]:
        """Consecutive groups of mini_batch_prompts / DP prompts (all rollouts of a prompt stay together)."""
        per_rank = self.schedule.mini_batch_prompts // self.dp_size
        order = list(dict.fromkeys(x.group_id for x in records))
        for first in range(0, len(order), per_rank):
            chosen = set(order[first:first + per_rank])
            yield [seq for x, seq in zip(records, sequences) if x.group_id in chosen]

    def trainer_state(self, step: int) -> dict:
        s = self.schedule
        return {"step": step, "recipe": s.name, "data_cursor": step * s.prompts_per_step, "seed": s.seed,
                "mismatch_baseline": self.guard.baseline}
