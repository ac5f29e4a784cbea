"""The policy update as a Megatron training step, with the loss handed in.

`MegatronPolicy` owns the model chunks (Megatron DDP around a GPTModel stage), the Megatron
optimizer (distributed optimizer by default, fp32 master weights for bf16 params) and its LR
schedule. Per rollout batch the trainer calls:

    logprobs(sequences, temperature=T)   forward only, no grad: logp_old (and the mismatch metric)
    train_step(mini_batch, loss_fn)      forward_backward_func over dynamic micro-batches + optimizer step

`loss_fn` is an `algo.loss.PolicyLoss` (HBPO/GRPO's clipped loss, the warm-up's SFT loss, ...). It
hands Megatron (loss sum, normaliser) per micro-batch; with `calculate_per_token_loss` Megatron
all-reduces the normaliser over micro-batches, pipeline stages and data-parallel ranks and divides
the gradients by it (for a token-mean loss: the global token count). Before the optimizer sees the
gradients, every rank checks loss and gradients for NaN/inf and all ranks stop together with an
error that names the micro-batch or parameter.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from megatron_hbpo.algo.loss import PolicyLoss
from megatron_hbpo.config import ConfigError, ModelConfig, OptimizerConfig, ParallelConfig
from megatron_hbpo.megatron.batching import (
    MicroBatch,
    PolicySequence,
    collate,
    gather_response,
    padding_fraction,
    plan_microbatches,
)
from megatron_hbpo.megatron.logprobs import token_logprobs
from megatron_hbpo.megatron.model import build_gpt_model
from megatron_hbpo.megatron.state import load_full_state, unwrap

if TYPE_CHECKING:
    from transformers import PretrainedConfig


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


class NonFiniteError(FloatingPointError):
    """A NaN/inf loss or gradient; raised on every rank before the optimizer step."""


@dataclass
class TrainStepResult:
    """One optimizer step's statistics, over all ranks of the mini-batch."""

    loss: float  # sum of the loss over the mini-batch / its normaliser
    response_tokens: int  # trained tokens (the response mask)
    metrics: dict[str, float]  # the loss's metric sums per normaliser unit, and the entropy per trained token
    grad_norm: float
    lr: float
    padding_fraction: float  # this rank's padded share of computed token slots
    micro_batches: int
    seconds: float
    normalizer: float  # the loss's normaliser over the mini-batch (tokens, or sequences for a sequence mean)


class MegatronPolicy:
    """The policy's Megatron side. Requires `megatron.parallel.initialize` to have run."""

    def __init__(self, hf_config: PretrainedConfig, model: ModelConfig, parallel: ParallelConfig,
                 optimizer: OptimizerConfig, *, micro_batch_tokens: int, optimizer_steps: int,
                 tree_rows: bool = False):
        from megatron.core import parallel_state
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
        from megatron.core.optimizer import get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
        from megatron.core.transformer.module import Float16Module

        if parallel.context_parallel_size > 1:
            raise ConfigError("parallel.context_parallel_size: the training step does not split sequences "
                              "over context-parallel ranks yet; set it to 1")
        self.micro_batch_tokens = micro_batch_tokens
        self.vocab_size = hf_config.vocab_size
        self.pad_token_id = int(getattr(hf_config, "pad_token_id", None) or 0)
        self.pipeline_parallel = parallel.pipeline_model_parallel_size > 1
        self.is_last_stage = parallel_state.is_pipeline_last_stage()
        gpt = build_gpt_model(hf_config, model, parallel,
                              pre_process=parallel_state.is_pipeline_first_stage(), post_process=self.is_last_stage,
                              variable_seq_lengths=self.pipeline_parallel, tree_rows=tree_rows)
        config = gpt.config
        self.config = config
        module = Float16Module(config, gpt) if config.bf16 else gpt
        opt = optimizer
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=False,
            use_distributed_optimizer=opt.use_distributed_optimizer,
            check_for_nan_in_grad=False,  # checked below, with parameter names and on all ranks at once
        )
        self.model = [DistributedDataParallel(config=config, ddp_config=ddp_config, module=module)]
        self.optimizer = get_megatron_optimizer(
            MegatronOptimizerConfig(optimizer="adam", lr=opt.lr, min_lr=opt.min_lr, weight_decay=opt.weight_decay,
                                    adam_beta1=opt.adam_beta1, adam_beta2=opt.adam_beta2, adam_eps=opt.adam_eps,
                                    clip_grad=opt.clip_grad, bf16=config.bf16, params_dtype=config.params_dtype,
                                    use_distributed_optimizer=opt.use_distributed_optimizer),
            self.model,
        )
        total = optimizer_steps
        warmup = opt.lr_warmup_steps if opt.lr_schedule != "constant" else 0
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0 if warmup else opt.lr, max_lr=opt.lr, min_lr=opt.min_lr,
            lr_warmup_steps=warmup, lr_decay_steps=max(total, warmup + 1),
            lr_decay_style="cosine" if opt.lr_schedule == "cosine" else "constant",
            start_wd=opt.weight_decay, end_wd=opt.weight_decay, wd_incr_steps=max(total, 1), wd_incr_style="constant",
        )
        config.grad_scale_func = self.optimizer.scale_loss
        config.finalize_model_grads_func = self._check_and_finalize_grads
        self._bad_micro_batches: list[str] = []

    # -- parameters ------------------------------------------------------------------------------

    def load_full_state(self, get_full: Callable[[str], torch.Tensor]) -> None:
        """Load full tensors by global GPTModel name (any TP/PP layout) and refresh the optimizer's
        fp32 main copies of them."""
        load_full_state(self.model[0], get_full)
        self.optimizer.reload_model_params()

    # -- forward passes ----------------------------------------------------------------------------

    def _micro_batches(self, sequences: list[PolicySequence]) -> tuple[list[MicroBatch], float]:
        lengths = [len(seq.tokens) for seq in sequences]
        plan = plan_microbatches(lengths, self.micro_batch_tokens)
        batches = [collate(sequences, indices, pad_token_id=self.pad_token_id).to(_device()) for indices in plan]
        return batches, padding_fraction(lengths, plan)

    def _run(self, batches: list[MicroBatch], loss_func, *, forward_only: bool) -> list[dict]:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        def forward_step(data_iterator, model):
            batch = next(data_iterator)
            output = model(batch.tokens, batch.position_ids, batch.attention_mask)
            return output, partial(loss_func, batch)

        return get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(batches), model=self.model,
            num_microbatches=len(batches), seq_length=max(b.tokens.size(1) for b in batches),
            micro_batch_size=max(b.tokens.size(0) for b in batches), forward_only=forward_only,
        )

    @torch.no_grad()
    def logprobs(self, sequences: list[PolicySequence], *, temperature: float) -> list[torch.Tensor]:
        """log p of each sequence's response tokens under the current weights at `temperature` (the
        rollout engine's, so both describe the same distribution), on every rank (CPU fp32)."""
        batches, _ = self._micro_batches(sequences)

        def loss_func(batch: MicroBatch, logits: torch.Tensor):
            logp, _ = token_logprobs(logits, batch.labels, vocab_size=self.vocab_size, temperature=temperature)
            zero = torch.zeros((), device=logp.device)
            return zero, torch.zeros((), dtype=torch.int, device=logp.device), {"logp": logp.float().cpu()}

        for model in self.model:
            model.eval()
        outputs = self._run(batches, loss_func, forward_only=True)
        for model in self.model:
            model.train()
        results: list[torch.Tensor | None] = [None] * len(sequences)
        if self.is_last_stage:
            for batch, out in zip(batches, outputs):
                for index, values in zip(batch.indices, gather_response(out["logp"], batch, sequences)):
                    results[index] = values.clone()
        return self._from_last_stage(results, sequences)

    def _from_last_stage(self, results: list, sequences: list[PolicySequence]) -> list[torch.Tensor]:
        """Broadcast per-sequence values from the last pipeline stage to the others."""
        from megatron.core import parallel_state

        if not self.pipeline_parallel:
            return results
        sizes = [seq.response_length for seq in sequences]
        flat = torch.cat(results) if self.is_last_stage else torch.empty(sum(sizes))
        flat = flat.to(_device())
        dist.broadcast(flat, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                       group=parallel_state.get_pipeline_model_parallel_group())
        return list(flat.cpu().split(sizes))

    # -- the update --------------------------------------------------------------------------------

    def forward_backward(self, sequences: list[PolicySequence], loss_fn: PolicyLoss
                         ) -> tuple[dict[str, float], float, int]:
        """Gradients of the mini-batch's loss, reduced over DP; no optimizer step.

        Returns (sums over all ranks: "loss", "normalizer", "tokens", "entropy" and the loss's metrics;
        this rank's padding fraction; number of micro-batches).
        """
        if loss_fn.needs_logp_old and any(seq.logp_old is None for seq in sequences):
            raise ValueError("every sequence needs logp_old (from MegatronPolicy.logprobs) before training")
        batches, padding = self._micro_batches(sequences)
        # Fixed names and order on every rank: stages without the loss add zeros to the same all-reduce.
        names = ["loss", "normalizer", "tokens", *loss_fn.metric_names, "entropy"]
        self._bad_micro_batches = []

        def loss_func(batch: MicroBatch, logits: torch.Tensor):
            logp, entropy = token_logprobs(logits, batch.labels, vocab_size=self.vocab_size,
                                           temperature=loss_fn.temperature, with_entropy=True)
            assert entropy is not None
            out = loss_fn(logp, batch)
            if not torch.isfinite(out.loss_sum.detach()):
                self._bad_micro_batches.append(
                    f"the loss of the micro-batch holding sequences {batch.indices} of this rank")
            entropy_sum = torch.where(batch.response_mask, entropy, torch.zeros_like(entropy)).sum()
            values = {"loss": out.loss_sum.detach(), "normalizer": out.normalizer, "tokens": batch.response_mask.sum(),
                      **out.metrics, "entropy": entropy_sum}
            stats = torch.stack([values[name].float() for name in names]).cpu()
            return out.loss_sum, out.normalizer.int(), {"stats": stats}

        for model in self.model:
            model.zero_grad_buffer()
        self.optimizer.zero_grad()
        outputs = self._run(batches, loss_func, forward_only=False)
        local = torch.stack([o["stats"] for o in outputs]).sum(0) if self.is_last_stage and outputs \
            else torch.zeros(len(names))
        return dict(zip(names, self._sum_over_ranks(local).tolist())), padding, len(batches)

    def _sum_over_ranks(self, local: torch.Tensor) -> torch.Tensor:
        """Sum over the DP ranks of the last pipeline stage, visible on every rank."""
        from megatron.core import parallel_state

        total = local.to(device=_device(), dtype=torch.float64)
        dist.all_reduce(total, group=parallel_state.get_data_parallel_group())
        if self.pipeline_parallel:  # only the last stage holds loss statistics; the others add 0
            dist.all_reduce(total, group=parallel_state.get_pipeline_model_parallel_group())
        return total.cpu()

    def _check_and_finalize_grads(self, model, num_tokens=None, **kwargs) -> None:
        """Megatron's finalize_model_grads, after checking every rank's local loss and gradients."""
        from megatron.core.distributed import finalize_model_grads

        bad = list(self._bad_micro_batches)
        for name, param in unwrap(model[0]).named_parameters():
            grad = getattr(param, "main_grad", None)
            if grad is None:
                grad = param.grad
            if grad is not None and not bool(torch.isfinite(grad).all()):
                bad.append(f"gradient of {name}")
        flag = torch.tensor([float(len(bad))], device=_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() > 0:
            rank = dist.get_rank()
            where = ("; ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")) if bad else \
                "another rank (see its error)"
            raise NonFiniteError(f"rank {rank}: non-finite loss or gradient in {where}; the optimizer step was "
                                 "not taken and the weights are unchanged")
        finalize_model_grads(model, num_tokens, **kwargs)

    def train_step(self, sequences: list[PolicySequence], loss_fn: PolicyLoss) -> TrainStepResult:
        """One optimizer step on a mini-batch (this rank's share of it) with `loss_fn`; see forward_backward."""
        start = time.perf_counter()
        sums, padding, micro_batches = self.forward_backward(sequences, loss_fn)
        updated, grad_norm, _ = self.optimizer.step()
        if not updated:
            raise NonFiniteError("the optimizer skipped its step (non-finite gradients after loss scaling)")
        self.scheduler.step(increment=1)
        tokens, normalizer = max(sums["tokens"], 1.0), max(sums["normalizer"], 1.0)
        # A loss's metrics count what its normaliser counts (tokens for a token mean, sequences for a
        # sequence mean); the entropy is per token.
        metrics = {name: sums[name] / normalizer for name in loss_fn.metric_names}
        return TrainStepResult(
            loss=sums["loss"] / normalizer, response_tokens=int(sums["tokens"]),
            metrics={**metrics, "entropy": sums["entropy"] / tokens}, normalizer=sums["normalizer"],
            grad_norm=float(grad_norm) if grad_norm is not None else math.nan,
            lr=self.optimizer.param_groups[0]["lr"], padding_fraction=padding, micro_batches=micro_batches,
            seconds=time.perf_counter() - start,
        )
