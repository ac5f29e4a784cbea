"""Run under torchrun (gloo, 2 ranks): the HBPO loss normalised by the global token count gives the
same gradient when the mini-batch is split over data-parallel ranks as on one process.

Each rank holds an uneven share of the sequences and reports both errors as JSON.
"""

import sys

import torch
import torch.distributed as dist

from common import write_report

from megatron_hbpo.algo.loss import clipped_policy_loss


def make_batch():
    g = torch.Generator().manual_seed(0)
    B, T, H, V = 10, 7, 5, 11
    features = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    tokens = torch.randint(0, V, (B, T), generator=g)
    mask = torch.arange(T)[None, :] < torch.randint(1, T + 1, (B,), generator=g)[:, None]
    advantages = torch.randn(B, generator=g, dtype=torch.float64)
    weight = torch.randn(H, V, generator=g, dtype=torch.float64) * 0.5
    old_weight = weight + 0.2 * torch.randn(H, V, generator=g, dtype=torch.float64)
    return features, tokens, mask, advantages, weight, old_weight


def logprobs(weight, features, tokens):
    return torch.log_softmax(features @ weight, dim=-1).gather(-1, tokens[..., None]).squeeze(-1)


def loss_parts(weight, old_weight, features, tokens, mask, advantages):
    with torch.no_grad():
        logp_old = logprobs(old_weight, features, tokens)
    return clipped_policy_loss(logprobs(weight, features, tokens), logp_old, advantages, mask)


def main() -> int:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    features, tokens, mask, advantages, weight0, old_weight = make_batch()

    # Reference: the whole mini-batch on one process.
    weight = weight0.clone().requires_grad_(True)
    whole = loss_parts(weight, old_weight, features, tokens, mask, advantages)
    (whole.loss_sum / whole.num_tokens).backward()
    reference = weight.grad.clone()

    # Data parallel: uneven shares (3 sequences on rank 0, 7 on rank 1), global token count.
    cut = 3
    share = slice(0, cut) if rank == 0 else slice(cut, None)
    weight = weight0.clone().requires_grad_(True)
    part = loss_parts(weight, old_weight, features[share], tokens[share], mask[share], advantages[share])
    global_tokens = part.num_tokens.clone().to(torch.float64)
    dist.all_reduce(global_tokens)
    (part.loss_sum / global_tokens).backward()
    grad = weight.grad.clone()
    dist.all_reduce(grad)  # DDP sums gradients; the 1/global_tokens already makes it the mean

    # The mistake the spec warns about: each rank's own token-mean, averaged over ranks.
    weight = weight0.clone().requires_grad_(True)
    part = loss_parts(weight, old_weight, features[share], tokens[share], mask[share], advantages[share])
    (part.loss_sum / part.num_tokens / world).backward()
    wrong = weight.grad.clone()
    dist.all_reduce(wrong)

    err = (grad - reference).abs().max().item()
    wrong_err = (wrong - reference).abs().max().item()
    dist.destroy_process_group()
    write_report({"global_token_mean_err": err, "per_rank_mean_err": wrong_err})
    return 0


if __name__ == "__main__":
    sys.exit(main())
