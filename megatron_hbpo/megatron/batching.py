"""Rollout sequences -> micro-batches bounded by a token budget (dynamic batching).

HBPO's rollouts differ wildly in length (a 512-budget answer next to a 2560-budget one). Padding
them all to the longest wastes compute, so sequences are sorted by length and cut greedily into
micro-batches whose padded size (sequences x longest member) stays within `max_tokens`; each
micro-batch is padded only to its own longest sequence. We chose this over THD sequence packing
because it works with every Megatron layer spec (the local spec has no packed-sequence attention)
and under pipeline parallelism (with `variable_seq_lengths`); the padding it leaves is measured and
reported as `padding_fraction`.

Tree rows (AnytimeReasoner, docs/anytime.md "Integration"): a sequence may carry `branches`, spans
after its trunk (prompt + thinking) that each see only a prefix of the trunk and themselves. Its
micro-batch then gets a per-row [b, 1, s, s] mask and per-row position ids (attention.branch_mask),
which the sdpa and unfused attention backends apply (docs/attention.md); per-token advantages and a
per-token `trainable` mask replace the scalar advantage and the plain response mask.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class PolicySequence:
    """One rollout as the trainer sees it.

    tokens: prompt (incl. the budget prefix) + response ids; prompt_length: how many of them are
    prompt. The model scores position t's next token tokens[t + 1]; response positions are
    prompt_length - 1 .. len - 2. advantage: the sequence's scalar advantage. logp_old /
    logp_ref / logp_rollout: per response token (len - prompt_length values) when known.
    """

    tokens: list[int]
    prompt_length: int
    advantage: float = 0.0
    logp_old: torch.Tensor | None = None
    logp_ref: torch.Tensor | None = None
    logp_rollout: torch.Tensor | None = None  # the rollout engine's, for truncated importance sampling
    # A tree row: [(context, span)] in tokens, the spans laid out after the trunk in order; a span sees
    # tokens[:context] and itself, at positions context, context + 1, ... (attention.branch_mask).
    branches: list[tuple[int, int]] | None = None
    token_advantages: torch.Tensor | None = None  # [response_length], replaces `advantage`
    trainable: torch.Tensor | None = None  # [response_length] bool, the response tokens in the loss (all if None)

    def __post_init__(self) -> None:
        if not 1 <= self.prompt_length < len(self.tokens):
            raise ValueError(f"a sequence needs >= 1 prompt and >= 1 response token; got prompt_length "
                             f"{self.prompt_length} of {len(self.tokens)} tokens")
        for name in ("token_advantages", "trainable"):
            value = getattr(self, name)
            if value is not None and value.shape != (self.response_length,):
                raise ValueError(f"{name} must have one value per response token ({self.response_length}), got "
                                 f"{tuple(value.shape)}")
        if self.branches is not None:
            trunk = len(self.tokens) - sum(span for _, span in self.branches)
            if trunk < self.prompt_length or any(not self.prompt_length <= c <= trunk for c, _ in self.branches):
                raise ValueError(f"branches {self.branches} do not fit a trunk of {trunk} tokens after a prompt of "
                                 f"{self.prompt_length}")

    @property
    def trunk_length(self) -> int:
        """Tokens before the first branch (all of them for a plain sequence)."""
        return len(self.tokens) - sum(span for _, span in self.branches or ())

    @property
    def response_length(self) -> int:
        return len(self.tokens) - self.prompt_length


def plan_microbatches(lengths: list[int], max_tokens: int, *, pad_multiple: int = 1) -> list[list[int]]:
    """Indices of the sequences in each micro-batch, longest first; padded size <= max_tokens.

    pad_multiple: sequence lengths are padded up to a multiple of this (e.g. 2 x CP for context
    parallelism, 8 for tensor-core friendly shapes).
    """
    def padded(n: int) -> int:
        return -(-n // pad_multiple) * pad_multiple

    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    for index in order:
        if padded(lengths[index]) > max_tokens:
            raise ValueError(f"sequence {index} has {lengths[index]} tokens, more than the micro-batch budget "
                             f"of {max_tokens} (train.micro_batch_tokens)")
        # Sorted longest first, so the batch's first member sets its padded length.
        if batches and (len(batches[-1]) + 1) * padded(lengths[batches[-1][0]]) <= max_tokens:
            batches[-1].append(index)
        else:
            batches.append([index])
    return batches


def padding_fraction(lengths: list[int], batches: list[list[int]], *, pad_multiple: int = 1) -> float:
    """Share of the computed token slots that are padding."""
    real = sum(lengths[i] for batch in batches for i in batch)
    slots = sum(len(batch) * (-(-max(lengths[i] for i in batch) // pad_multiple) * pad_multiple) for batch in batches)
    return 1.0 - real / slots if slots else 0.0


@dataclass
class MicroBatch:
    """Right-padded tensors of one micro-batch; label-position tensors are aligned with `tokens`."""

    indices: list[int]  # positions of these sequences in the caller's list
    tokens: torch.Tensor  # [b, s] int64
    position_ids: torch.Tensor  # [b, s]
    attention_mask: torch.Tensor  # [1, 1, s, s] bool, True = masked (causal); [b, 1, s, s] with tree rows
    labels: torch.Tensor  # [b, s] next token; 0 where there is none
    response_mask: torch.Tensor  # [b, s] bool, True where the label is a response token
    advantages: torch.Tensor  # [b] fp32, or [b, s] per token when a sequence has token_advantages
    logp_old: torch.Tensor | None  # [b, s] fp32, 0 off the response
    logp_ref: torch.Tensor | None
    logp_rollout: torch.Tensor | None
    rows: torch.Tensor | None = None  # [b] ones: the sequences of the micro-batch (a row-count normaliser sums it)

    def to(self, device: torch.device | str) -> MicroBatch:
        moved: dict[str, Any] = {name: value.to(device) for name, value in self.__dict__.items()
                                 if isinstance(value, torch.Tensor)}
        return dataclasses.replace(self, **moved)


def _scatter_response(sequences: list[PolicySequence], attr: str, shape: tuple[int, int]) -> torch.Tensor | None:
    values = [getattr(seq, attr) for seq in sequences]
    if all(v is None for v in values):
        return None
    if any(v is None for v in values):
        raise ValueError(f"{attr} is set on some sequences of a micro-batch but not on others")
    out = torch.zeros(shape, dtype=torch.float32)
    for row, (seq, value) in enumerate(zip(sequences, values)):
        if value.numel() != seq.response_length:
            raise ValueError(f"{attr} has {value.numel()} values for {seq.response_length} response tokens")
        out[row, seq.prompt_length - 1: len(seq.tokens) - 1] = value.float()
    return out


def collate(sequences: list[PolicySequence], indices: list[int], *, pad_multiple: int = 1,
            pad_token_id: int = 0) -> MicroBatch:
    chosen = [sequences[i] for i in indices]
    length = max(len(seq.tokens) for seq in chosen)
    length = -(-length // pad_multiple) * pad_multiple
    b = len(chosen)
    tokens = torch.full((b, length), pad_token_id, dtype=torch.long)
    labels = torch.zeros((b, length), dtype=torch.long)
    response_mask = torch.zeros((b, length), dtype=torch.bool)
    for row, seq in enumerate(chosen):
        n = len(seq.tokens)
        ids = torch.tensor(seq.tokens, dtype=torch.long)
        tokens[row, :n] = ids
        # In a tree row the label after a segment's last token is the next span's first token, which that
        # position never predicts; a span's first token is inserted context (untrained), so it is masked.
        labels[row, : n - 1] = ids[1:]
        response_mask[row, seq.prompt_length - 1: n - 1] = True if seq.trainable is None else seq.trainable
    trees = any(seq.branches is not None for seq in chosen)
    if trees:
        from megatron_hbpo.megatron.attention import branch_mask  # Megatron-Core only for tree rows

        masks, positions = zip(*(branch_mask(seq.trunk_length, seq.branches or [], length) for seq in chosen))
        attention_mask = torch.stack(masks).unsqueeze(1)
        position_ids = torch.stack(positions)
    else:
        position_ids = torch.arange(length).unsqueeze(0).expand(b, length).contiguous()
        # Right padding: a causal mask keeps real tokens from ever seeing the padding.
        attention_mask = torch.triu(torch.ones(1, 1, length, length, dtype=torch.bool), diagonal=1)
    if any(seq.token_advantages is not None for seq in chosen):
        advantages = torch.zeros((b, length), dtype=torch.float32)
        for row, seq in enumerate(chosen):
            values = seq.token_advantages if seq.token_advantages is not None else \
                torch.full((seq.response_length,), seq.advantage)
            advantages[row, seq.prompt_length - 1: len(seq.tokens) - 1] = values.float()
    else:
        advantages = torch.tensor([seq.advantage for seq in chosen], dtype=torch.float32)
    return MicroBatch(
        indices=list(indices),
        tokens=tokens,
        position_ids=position_ids,
        attention_mask=attention_mask,
        labels=labels,
        response_mask=response_mask,
        advantages=advantages,
        logp_old=_scatter_response(chosen, "logp_old", (b, length)),
        logp_ref=_scatter_response(chosen, "logp_ref", (b, length)),
        logp_rollout=_scatter_response(chosen, "logp_rollout", (b, length)),
        rows=torch.tensor([1.0] * b),
    )


def gather_response(values: torch.Tensor, batch: MicroBatch, sequences: list[PolicySequence]) -> list[torch.Tensor]:
    """Per-sequence response-token slices of a [b, s] tensor, in the micro-batch's row order."""
    out = []
    for row, index in enumerate(batch.indices):
        seq = sequences[index]
        out.append(values[row, seq.prompt_length - 1: len(seq.tokens) - 1])
    return out
