"""Per-token log-probs (and entropy) from vocab-parallel logits, without gathering the vocabulary.

Under tensor parallelism each rank holds logits for a contiguous slice of the (padded) vocabulary.
log p(target) comes from Megatron's vocab-parallel cross-entropy (all-reduced max, sum-exp and
target logit, with its own backward); the entropy is the same kind of all-reduce, computed without
grad as a metric. Vocabulary padding (ids >= the tokenizer's vocab size) is masked out first, so it
takes no probability mass.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _mask_vocab_padding(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Logits of padded vocabulary ids on this rank's slice set to -inf (a new tensor)."""
    from megatron.core import parallel_state

    partition = logits.size(-1)
    start = parallel_state.get_tensor_model_parallel_rank() * partition
    valid = torch.arange(start, start + partition, device=logits.device) < vocab_size
    if bool(valid.all()):
        return logits.float()
    return logits.float().masked_fill(~valid, float("-inf"))


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, *, vocab_size: int, temperature: float = 1.0,
                   with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(targets) under softmax(logits / temperature), and optionally the entropy of that softmax.

    Args:
        logits: [..., V_pad / TP] this rank's vocabulary slice (any dtype; computed in fp32).
        targets: [...] token ids in [0, vocab_size).
        vocab_size: the real vocabulary size (ids at or above it are padding).
        temperature: the rollout engine's sampling temperature, so that the two engines' log-probs
            describe the same distribution.
    Returns: (logp [...] fp32 with grad, entropy [...] fp32 without grad or None).
    """
    from megatron.core import tensor_parallel

    if temperature != 1.0:
        logits = logits / temperature
    logits = _mask_vocab_padding(logits, vocab_size)
    entropy = _entropy(logits.detach()) if with_entropy else None
    # Megatron's cross-entropy subtracts the max in place: hand it a tensor nobody else reads.
    logp = -tensor_parallel.vocab_parallel_cross_entropy(logits.clone() if with_entropy else logits, targets)
    return logp, entropy


@torch.no_grad()
def _entropy(logits: torch.Tensor) -> torch.Tensor:
    """H = log Z - sum_v p_v * logit_v, with Z and the sum all-reduced over the TP group."""
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    logits_max = logits.max(dim=-1).values
    dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
    shifted = logits - logits_max.unsqueeze(-1)
    exp = shifted.exp()
    sum_exp = exp.sum(dim=-1)
    # exp is 0 on masked padding, whose logit is -inf: 0 * -inf would be NaN, so drop those terms.
    weighted = torch.where(exp > 0, exp * shifted, torch.zeros_like(exp)).sum(dim=-1)
    dist.all_reduce(sum_exp, group=group)
    dist.all_reduce(weighted, group=group)
    return sum_exp.log() - weighted / sum_exp
