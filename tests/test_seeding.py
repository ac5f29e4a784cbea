"""Seeds derived from (seed, parts): independent streams per step and per rollout replica."""

import torch

from megatron_hbpo.seeding import derived_seed, seed_everything


def draws(*parts):
    seed_everything(1234, *parts)
    return torch.randint(0, 2**31, (4,)).tolist()


def test_each_part_gives_its_own_stream_and_the_same_parts_the_same_one():
    assert draws("step", 1, 0) == draws("step", 1, 0)
    streams = {tuple(draws("step", step, replica)) for step in range(1, 6) for replica in range(4)}
    assert len(streams) == 20  # every (step, replica) differs, in torch's generator too
    # torch keeps 32 bits of a seed: those bits must already differ between neighbouring parts.
    low = {derived_seed(1234, "step", step, 0) % 2**32 for step in range(1000)}
    assert len(low) == 1000
