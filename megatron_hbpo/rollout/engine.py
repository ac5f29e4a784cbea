"""The rollout engine protocol: budgeted requests in, sampled responses (with log-probs) out.

The trainer only talks to this protocol, so the algorithm never depends on which engine generates.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

WeightStream = Iterable[list[tuple[str, torch.Tensor]]]  # buckets of (HF name, full tensor)


@dataclass
class SamplingSettings:
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 4096
    stop_token_ids: tuple[int, ...] = ()  # besides EOS; a stop token ends the response and is kept in it


@dataclass
class Request:
    """One prompt to sample `n` responses for, all under the same budget (None: no budget prompt).

    prompt_ids already contain the chat template and the budget prefix (algo.budgets.build_prompt):
    the prefix is prompt, never response.

    mode: the prompt mode (data/chat.py) the prompt was built with, recorded as data for the reward
    and the metrics. forced_logprob: when set, the last prompt id is the response's first token,
    chosen by the sampling scheme rather than the model (AdaptThink's mode token), with this
    log-probability under that scheme: the engine continues after it, the trainer moves it into the
    response (rollout.requests.with_forced_response) and trains it.
    """

    prompt_ids: list[int]
    n: int
    budget: int | None
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    group_id: int = 0  # the prompt this request belongs to (for the advantage)
    mode: str = "natural"
    forced_logprob: float | None = None


@dataclass
class Sample:
    prompt_ids: list[int]
    response_ids: list[int]  # generated tokens, including a final eos (the model is trained to stop)
    logprobs: torch.Tensor  # [len(response_ids)] the engine's log-probs of those tokens
    finish_reason: str  # "stop" (eos / stop string) or "length" (truncated at max_tokens)
    budget: int | None
    group_id: int
    ended_with_eos: bool = False

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"

    @property
    def length(self) -> int:
        """L of the reward (docs/method.md): generated tokens, eos excluded, budget prefix never counted."""
        return len(self.response_ids) - int(self.ended_with_eos)


@runtime_checkable
class RolloutEngine(Protocol):
    def generate(self, requests: list[Request]) -> list[Sample]:
        """Samples grouped by request, in request order (n per request)."""

    def update_weights(self, stream: WeightStream) -> None:
        """Load new weights (HF names, full tensors); all-or-nothing: a bad stream raises, old weights stay."""

    def sleep(self) -> None:
        """Release accelerator memory for training (no-op where unsupported)."""

    def wake(self) -> None:
        """Take the memory back before generating."""
