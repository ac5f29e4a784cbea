"""The rollout layout: which ranks generate together, and which prompts each group generates.

Every rank of the job runs a vLLM worker. `rollout.tensor_parallel_size` (T) consecutive ranks form
one rollout replica (vLLM's tensor-parallel group, formed from the job's ranks by its external
launcher), so there are world / T replicas, independent of Megatron's TP / PP / DP. A step's prompts
are split over the replicas in contiguous blocks of whole prompt groups; the scored samples are then
handed to the training data-parallel ranks that train on them (components/rollouts.py).

This one function is what the trainer builds, what the fit planner sizes and what `explain` shows.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RolloutLayout:
    world_size: int
    tensor_parallel_size: int  # T: ranks per replica
    prompts_per_step: int

    @property
    def replicas(self) -> int:
        return self.world_size // self.tensor_parallel_size

    @property
    def prompts_per_replica(self) -> int:
        return self.prompts_per_step // self.replicas

    def replica_of(self, rank: int) -> int:
        return rank // self.tensor_parallel_size

    def leader_of(self, replica: int) -> int:
        """The replica's first rank: it decodes and verifies the replica's samples."""
        return replica * self.tensor_parallel_size

    def is_leader(self, rank: int) -> bool:
        return rank % self.tensor_parallel_size == 0

    def prompt_range(self, replica: int) -> range:
        """Indices, within the step's prompts, of the prompts this replica generates for."""
        first = replica * self.prompts_per_replica
        return range(first, first + self.prompts_per_replica)

    def describe(self) -> str:
        return (f"{self.replicas} rollout replica(s) of vLLM TP {self.tensor_parallel_size}, "
                f"{self.prompts_per_replica} prompts each per step")


def rollout_layout(world_size: int, tensor_parallel_size: int, prompts_per_step: int, *,
                   gpus_per_node: int | None = None) -> RolloutLayout:
    """The layout, or ValueError naming the field when the numbers do not fit together.

    T must divide the GPUs of a node (a replica never spans nodes: its all-reduces would cross the
    network every token) and the world; the replicas must share the step's prompts evenly.
    """
    t = tensor_parallel_size
    if t < 1:
        raise ValueError(f"rollout.tensor_parallel_size: must be >= 1, got {t}")
    if gpus_per_node is not None and gpus_per_node % t:
        raise ValueError(f"rollout.tensor_parallel_size: {t} does not divide cluster.gpus_per_node={gpus_per_node} "
                         "(a rollout replica must stay within a node); pick a divisor")
    if world_size % t:
        raise ValueError(f"rollout.tensor_parallel_size: {t} does not divide the world size {world_size}")
    replicas = world_size // t
    if prompts_per_step % replicas:
        raise ValueError(f"train.prompts_per_step: {prompts_per_step} prompts cannot be shared evenly by {replicas} "
                         f"rollout replicas (world {world_size} / rollout.tensor_parallel_size {t}); use a multiple "
                         f"of {replicas}")
    return RolloutLayout(world_size, t, prompts_per_step)
