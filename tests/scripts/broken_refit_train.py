"""The training job with a refit that loads nothing (the engine keeps the weights it started with):
the refit check must stop it at step 2, before training on those rollouts.

    python broken_refit_train.py --config R.yaml [overrides]     (the arguments of megatron_hbpo.train)
"""

from __future__ import annotations

import sys

from megatron_hbpo.rollout import vllm_engine


def update_nothing(self, stream, **kwargs) -> None:  # noqa: ARG001
    for _ in stream:  # the export stream is collective: every rank still walks it
        pass


if __name__ == "__main__":
    vllm_engine.VLLMEngine.update_weights = update_nothing
    from megatron_hbpo.train import main

    sys.exit(main(sys.argv[1:]))
