"""The training job with rank 1 raising in the middle of its first update (after its engine, its
Megatron groups and vLLM's shared memory exist): the job must end with an error and leave nothing.

    python crashing_rank_train.py --config R.yaml [overrides]     (the arguments of megatron_hbpo.train)
"""

from __future__ import annotations

import sys

import torch.distributed as dist

from megatron_hbpo.megatron import train_step as policy


def crash_on_rank_1(train_step):
    def wrapped(self, *args, **kwargs):
        if dist.get_rank() == 1:
            raise RuntimeError("injected crash on rank 1")
        return train_step(self, *args, **kwargs)
    return wrapped


if __name__ == "__main__":
    policy.MegatronPolicy.train_step = crash_on_rank_1(policy.MegatronPolicy.train_step)
    from megatron_hbpo.train import main

    sys.exit(main(sys.argv[1:]))
