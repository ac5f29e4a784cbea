"""The main job: `python -m megatron_hbpo.train --config recipes/R.yaml [--resume auto|none|DIR] [a.b=c ...]`.

Under torchrun (or srun) for several processes; plain `python` is a world of one. In order:

1. validate the recipe (before any process group starts), set up the process (runtime.py) and start
   the groups;
2. the base model: the synthetic task's supervised warm-up (reused when already done), or the
   recipe's HF checkpoint;
3. the Megatron policy, resumed from the newest checkpoint with `--resume auto`;
4. a vLLM engine on every rank, T consecutive ranks forming one rollout replica (rollout/layout.py),
   refit with the policy's weights;
5. evaluation of the base per level and prompt mode (eval.before_after), the training steps, and the
   evaluation after; `<logging.dir>/summary.json` and `summary.png`.

This module composes the components (build_*); the loop is trainer.py.

Exit codes: 0 done, 1 the refit check or a failed refit stopped the run (one line says why), 2 bad
recipe, data, model directory or checkpoint (one line naming the field; preflight.py checks the files
before anything starts), 143 stopped by SIGTERM after saving a checkpoint (under torchrun, each rank's;
torchrun itself then exits 1).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

    from megatron_hbpo.algo.methods import Method
    from megatron_hbpo.algo.verify import AnswerVerifier
    from megatron_hbpo.components.evaluator import Evaluator
    from megatron_hbpo.components.reference import ReferencePass
    from megatron_hbpo.config import DataConfig, ModelConfig, Recipe
    from megatron_hbpo.data.chat import PromptBuilder
    from megatron_hbpo.data.source import PromptSource
    from megatron_hbpo.megatron.train_step import MegatronPolicy
    from megatron_hbpo.rollout.engine import RolloutEngine
    from megatron_hbpo.trainer import Trainer
    from megatron_hbpo.warmup import WarmupBase

PREEMPTED_EXIT = 143


def _log_rank0(message: str) -> None:
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        print(message, flush=True)


def _log_rank0_err(message: str) -> None:
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        print(message, file=sys.stderr, flush=True)


def load_tokenizer_and_config(model: ModelConfig, data: DataConfig, *, summary_markers: bool = False
                              ) -> tuple[PreTrainedTokenizerBase, PretrainedConfig]:
    """(tokenizer, transformers config) of the policy, from the recipe's model and data sections.
    summary_markers: the synthetic task's tokenizer with the forced-summary words (the anytime recipes)."""
    from transformers import AutoConfig, AutoTokenizer

    from megatron_hbpo.megatron.model import check_hf_config, hf_config_from_recipe

    if data.source == "synthetic":
        from megatron_hbpo.data.synthetic import task_tokenizer

        tokenizer = task_tokenizer(summary_markers=summary_markers)
        hf_config = hf_config_from_recipe(model)
    else:
        path = model.tokenizer_path or model.hf_path  # validate() made sure one is set
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        hf_config = AutoConfig.from_pretrained(model.hf_path, local_files_only=True) if model.hf_path else \
            hf_config_from_recipe(model)
        if model.hf_path:
            check_hf_config(model, hf_config)
    if len(tokenizer) > hf_config.vocab_size:
        raise ValueError(f"model.vocab_size={hf_config.vocab_size} is smaller than the tokenizer's "
                         f"{len(tokenizer)} tokens")
    for key in ("eos_token_id", "pad_token_id", "bos_token_id"):
        if getattr(hf_config, key, None) is None:
            setattr(hf_config, key, tokenizer.eos_token_id)
    return tokenizer, hf_config


def load_base_weights(model: ModelConfig, policy: MegatronPolicy, hf_config: PretrainedConfig,
                      warmup_weights: Path | None) -> None:
    from megatron_hbpo.convert.hf_io import HFCheckpoint
    from megatron_hbpo.convert.mapping import hf_to_megatron_tensors
    from megatron_hbpo.megatron.checkpoint import load_weights
    from megatron_hbpo.megatron.model import padded_vocab_size, use_transformer_engine

    if warmup_weights is not None:
        load_weights(policy.model[0], warmup_weights)
        policy.optimizer.reload_model_params()
    elif model.hf_path:
        # Streams the checkpoint tensor by tensor into one full-size host copy; for the largest
        # models convert once with tools/convert_hf_to_megatron.py instead.
        source = HFCheckpoint(model.hf_path)
        padded = padded_vocab_size(hf_config.vocab_size, 1, model.make_vocab_size_divisible_by)
        state = dict(hf_to_megatron_tensors(source.get, hf_config, padded,
                                            transformer_engine=use_transformer_engine(model.transformer_impl)))
        policy.load_full_state(state.__getitem__)


def write_rollout_model(policy: MegatronPolicy, hf_config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase,
                        directory: Path) -> None:
    """An HF directory of the policy's current weights for vLLM to start from (collective)."""
    import torch.distributed as dist

    from megatron_hbpo.atomic import atomic_directory
    from megatron_hbpo.convert.export import HFExportStream
    from megatron_hbpo.convert.hf_io import write_safetensors

    stream = HFExportStream(policy.model[0], hf_config, bucket_bytes=256 << 20)
    if dist.get_rank() == 0:
        with atomic_directory(directory, overwrite=True) as tmp:
            write_safetensors(tmp, ((name, t.cpu()) for bucket in stream for name, t in bucket))
            hf_config.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    else:
        for _ in stream:
            pass
    dist.barrier()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="RL training (HBPO and its baselines) on Megatron-Core with vLLM "
                                                 "rollouts.")
    parser.add_argument("--config", required=True, help="recipe YAML (recipes/...)")
    parser.add_argument("--resume", default=None, help="auto (newest complete checkpoint), none, or a checkpoint "
                                                       "directory; default: the recipe's checkpoint.resume")
    parser.add_argument("--verbose", action="store_true", help="show library warnings and vLLM's INFO logs")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.total_steps=10")
    args = parser.parse_args(argv)
    wall_start = time.perf_counter()

    from megatron_hbpo import runtime
    from megatron_hbpo.config import ConfigError, load_recipe

    overrides = list(args.overrides) + ([f"checkpoint.resume={args.resume}"] if args.resume else [])
    try:
        recipe = load_recipe(args.config, overrides, world_size=int(os.environ.get("WORLD_SIZE", "1")))
        if recipe.data.source == "files" and recipe.model.hf_path is None and recipe.model.tokenizer_path is None:
            raise ConfigError(f"{args.config}: model.hf_path: training on data.source=files needs the policy's "
                              "tokenizer: set model.hf_path (or model.tokenizer_path for a random-init model)")
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    runtime.configure(verbose=args.verbose)
    runtime.end_with_launcher()
    from megatron_hbpo import preflight

    try:
        preflight.check(recipe)
    except ConfigError as e:
        print(f"config error: {args.config}: {e}", file=sys.stderr)
        return 2
    return run(recipe, wall_start)


def run(recipe: Recipe, wall_start: float) -> int:
    from megatron_hbpo.components.refit import RefitMismatchError
    from megatron_hbpo.data.prompts import DataError
    from megatron_hbpo.megatron.checkpoint import CheckpointMismatchError
    from megatron_hbpo.rollout.vllm_engine import EngineBrokenError

    try:
        return _run(recipe, wall_start)
    except DataError as e:
        print(f"data error: {e}", file=sys.stderr)
        return 2
    except CheckpointMismatchError as e:  # what preflight's shape check cannot see (the optimizer's state)
        _log_rank0_err(f"config error: checkpoint.resume (--resume): {e}")
        return 2
    except (RefitMismatchError, EngineBrokenError) as e:
        _log_rank0_err(str(e))
        return 1


def _run(recipe: Recipe, wall_start: float) -> int:
    import torch.distributed as dist

    from megatron_hbpo import atomic
    from megatron_hbpo.algo.verify import AnswerVerifier
    from megatron_hbpo.components.timer import Timer
    from megatron_hbpo.data.source import PromptSource
    from megatron_hbpo.evaluation.summary import build_summary, plot_summary
    from megatron_hbpo.megatron import parallel
    from megatron_hbpo.megatron.train_step import MegatronPolicy
    from megatron_hbpo.warmup import reference_speed, run_warmup

    m, r, t, a, e = recipe.model, recipe.rollout, recipe.train, recipe.algo, recipe.eval
    source = PromptSource(recipe.data, t.seed, log=_log_rank0)  # bad data fails here, before any process group
    parallel.initialize(recipe.parallel, t.seed)
    tokenizer, hf_config = load_tokenizer_and_config(m, recipe.data, summary_markers=recipe.tree_rows)
    run_dir = Path(recipe.logging.dir)
    phases = Timer()  # the run's time split, printed at the end and kept in summary.json
    warmup_args = dict(model=m, parallel=recipe.parallel, optimizer=recipe.optimizer, data=recipe.data, algo=a,
                       micro_batch_tokens=t.micro_batch_tokens, hf_config=hf_config, tokenizer=tokenizer)
    with phases("warm-up"):
        base = run_warmup(recipe.warmup, checkpoint_dir=recipe.checkpoint.dir, log=_log_rank0,
                          **warmup_args) if recipe.warmup.steps else None
    reference = None  # this machine's speed on a fixed workload, which a reused base did not measure here
    if base is not None and e.before_after and not recipe.tree_rows:  # the runs that print their time split
        if base.trained_here:
            reference = base.record.get("reference_tokens_per_s")
        else:
            with phases("reference workload"):
                reference = reference_speed(recipe.warmup, **warmup_args)
    warmup_weights = base.weights if base is not None else None

    policy = MegatronPolicy(hf_config, m, recipe.parallel, recipe.optimizer, micro_batch_tokens=t.micro_batch_tokens,
                            optimizer_steps=t.total_steps * (t.prompts_per_step // t.mini_batch_prompts),
                            tree_rows=recipe.tree_rows)
    load_base_weights(m, policy, hf_config, warmup_weights)
    rollout_dir = Path(m.hf_path) if m.hf_path else run_dir / "rollout_model"
    if not m.hf_path:
        write_rollout_model(policy, hf_config, tokenizer, rollout_dir)
    from megatron_hbpo.rollout.vllm_engine import VLLMEngine

    # Every rank runs a rollout engine: T consecutive ranks form one replica (rollout/layout.py), each
    # replica seeded alike on its ranks; the replica's first rank verifies.
    layout = recipe.rollout_layout
    replica = layout.replica_of(dist.get_rank())
    engine = VLLMEngine(rollout_dir, seed=t.seed + replica, dtype="float32" if m.params_dtype == "fp32" else "bfloat16",
                        max_model_len=r.max_prompt_length + r.max_response_length,
                        tensor_parallel_size=r.tensor_parallel_size, gpu_memory_utilization=r.gpu_memory_utilization,
                        enforce_eager=r.enforce_eager)
    verifier = AnswerVerifier(recipe.verifier.num_workers, recipe.verifier.timeout_s) \
        if layout.is_leader(dist.get_rank()) else None
    _log_rank0(f"rollout layout: {layout.describe()}")
    try:
        trainer, evaluator = build_trainer(recipe, policy=policy, hf_config=hf_config, tokenizer=tokenizer,
                                           engine=engine, verifier=verifier, source=source, log=_log_rank0)
        before_path, after_path = run_dir / "eval_before.json", run_dir / "eval_after.json"
        resumed = trainer.resume()
        trainer.prepare()  # the method's measurement of the base (AdaptThink's R_ref), before any refit
        if evaluator is not None and e.before_after and (not resumed or not before_path.exists()):
            # The engine still holds the base weights: a resumed policy reaches it with the refit below.
            with phases("evaluations"):
                before = evaluator.evaluate("before training")
            if dist.get_rank() == 0:
                atomic.write_json(before_path, before)
        if resumed:
            trainer.refitter.refit()
        with phases("training steps"):
            trainer.run()
        if trainer.preempted:
            engine.close()
            return PREEMPTED_EXIT
        if evaluator is not None and e.before_after:
            with phases("evaluations"):
                after = evaluator.evaluate("after training")
            if dist.get_rank() == 0:
                atomic.write_json(after_path, after)
                if recipe.tree_rows:
                    _anytime_summary(recipe, json.loads(before_path.read_text()), after, run_dir)
                    dist.barrier()
                    engine.close()
                    return 0
                timing = run_timing(phases.seconds, time.perf_counter() - wall_start, base, reference)
                summary = build_summary(json.loads(before_path.read_text()), after,
                                        wall_seconds=timing["total_s"], timing=timing, recipe=recipe.name,
                                        algo=a.name, center_intra=a.center_intra, steps=t.total_steps)
                atomic.write_json(run_dir / "summary.json", summary)
                plot_summary(summary, run_dir / "summary.png", baselines=_baselines(recipe.logging.compare_with))
                _log_rank0(f"wrote {run_dir / 'summary.json'} and {run_dir / 'summary.png'}")
                _log_rank0(timing_line(timing))
        dist.barrier()  # rank 0 writes the summary; everyone leaves together
        engine.close()  # last: vLLM's shutdown destroys the default process group
        return 0
    finally:
        # No collective here: after an error on one rank, a barrier would hang the others.
        if verifier is not None:
            verifier.close()


def run_timing(phases: dict[str, float], total_s: float, base: WarmupBase | None,
               reference_tokens_per_s: float | None) -> dict[str, Any]:
    """The run's time split (seconds): warm-up, evaluations, training steps, and the rest (start-up: imports,
    the model, the vLLM engine). With a warm-up: the reference workload's speed in this run (the warm-up's first
    steps, in response tokens/s; the same work on every machine, to read the total against on another one),
    and from the base's record the speed of the run that trained it and its warm-up's time."""
    timing: dict[str, Any] = {"total_s": total_s, **{f"{name}_s": v for name, v in phases.items()}}
    timing["other_s"] = total_s - sum(phases.values())
    if base is not None:
        timing["warmup_trained_here"] = base.trained_here
        timing["reference_tokens_per_s"] = reference_tokens_per_s
        timing["warmup_tokens_per_s"] = base.record.get("tokens_per_s")  # of the run that trained the base
        timing["base_reference_tokens_per_s"] = base.record.get("reference_tokens_per_s")
        timing["base_warmup_s"] = base.record.get("seconds")
    return timing


def timing_line(timing: dict[str, Any]) -> str:
    from megatron_hbpo.warmup import REFERENCE_STEPS

    names = ("warm-up_s", "reference workload_s", "evaluations_s", "training steps_s", "other_s")
    parts = [f"{name[:-2]} {timing[name]:.0f} s" for name in names if name in timing]
    line = f"time: {timing['total_s']:.0f} s in all ({', '.join(parts)})"
    if timing.get("reference_tokens_per_s"):
        line += (f"; reference workload (the warm-up's first {REFERENCE_STEPS} steps): "
                 f"{timing['reference_tokens_per_s']:.0f} response tok/s")
        if not timing.get("warmup_trained_here") and timing.get("base_reference_tokens_per_s") \
                and timing.get("base_warmup_s"):
            # What training the base here would add: its warm-up time scaled by the two machines' speeds.
            here = timing["base_warmup_s"] * timing["base_reference_tokens_per_s"] / timing["reference_tokens_per_s"]
            line += (f" (the base's own run: {timing['base_reference_tokens_per_s']:.0f}; training the base here "
                     f"would add ~{here:.0f} s)")
    return line


def build_trainer(recipe: Recipe, *, policy: MegatronPolicy, hf_config: PretrainedConfig,
                  tokenizer: PreTrainedTokenizerBase, engine: RolloutEngine, verifier: AnswerVerifier | None,
                  source: PromptSource, log: Callable[[str], None] = _log_rank0) -> tuple[Trainer, Evaluator | None]:
    """The trainer and its evaluator (None without evaluation) from the recipe's sections. `engine`: this
    rank's rollout engine; `verifier`: on the first rank of each rollout replica (None on the others)."""
    import torch.distributed as dist

    from megatron_hbpo.algo.methods import method_for
    from megatron_hbpo.components.anytime_rollouts import AnytimeRolloutWorker
    from megatron_hbpo.components.checkpointer import CheckpointManager
    from megatron_hbpo.components.evaluator import Evaluator
    from megatron_hbpo.components.metrics import MetricsLogger
    from megatron_hbpo.components.refit import RefitGuard, Refitter
    from megatron_hbpo.components.rollouts import RolloutWorker
    from megatron_hbpo.data.chat import PromptBuilder, PromptFormat
    from megatron_hbpo.data.source import eval_set
    from megatron_hbpo.trainer import Schedule, Trainer

    m, r, t, a, e = recipe.model, recipe.rollout, recipe.train, recipe.algo, recipe.eval
    run_dir = Path(recipe.logging.dir)
    method = method_for(a, l_max=r.max_response_length, temperature=r.temperature)
    prompts = PromptBuilder(tokenizer, PromptFormat.of(recipe.data, a))
    evaluator = None
    if e.before_after or e.interval:
        evaluator = Evaluator(e, problems=eval_set(recipe.data, e.problems_per_level, e.seed),
                              modes=list(dict.fromkeys([*method.eval_modes(), *e.modes])),
                              benchmark="synthetic" if recipe.data.source == "synthetic" else "eval",
                              max_tokens=r.max_response_length, prompts=prompts, engine=engine, verifier=verifier,
                              think_close=a.think_close, run_dir=run_dir, layout=recipe.rollout_layout, log=log,
                              **_anytime_evaluation(recipe, method))
    trainer = Trainer(
        Schedule(recipe.name, t.total_steps, t.prompts_per_step, t.mini_batch_prompts, t.seed,
                 recipe.logging.mismatch_threshold),
        policy=policy, method=method, source=source,
        # Two-phase rollouts for the methods that pack tree rows (AnytimeReasoner), one phase otherwise.
        rollouts=(AnytimeRolloutWorker if recipe.tree_rows else RolloutWorker)(
            r, method, prompts, think_close=a.think_close, layout=recipe.rollout_layout, engine=engine,
            verifier=verifier, seed=t.seed),
        refitter=Refitter(policy.model[0], hf_config, engine, bucket_bytes=r.refit_bucket_mb << 20),
        guard=RefitGuard(r.refit_check, m.params_dtype),
        checkpoints=CheckpointManager(recipe.checkpoint, policy, total_steps=t.total_steps, log=log),
        evaluator=evaluator, temperature=r.temperature, log=log, reference=_reference_pass(
            recipe, method, source, prompts, engine=engine, verifier=verifier, log=log),
        make_logger=lambda start: MetricsLogger(recipe.logging, run_dir, name=recipe.name, start_step=start,
                                                total_steps=t.total_steps, enabled=dist.get_rank() == 0))
    return trainer, evaluator


def _anytime_evaluation(recipe: Recipe, method: Method) -> dict:
    """The evaluator's acc(b) settings for the anytime method (algo.anytime.eval_budgets, else the training
    budgets; docs/anytime.md, "Evaluation"); none for the other methods."""
    if not recipe.tree_rows:
        return {}
    c = recipe.algo.anytime
    return {"anytime_budgets": list(c.eval_budgets or method.budgets),  # type: ignore[attr-defined]
            "summary_max_tokens": c.summary_max_tokens}


def _reference_pass(recipe: Recipe, method: Method, source: PromptSource, prompts: PromptBuilder, *,
                    engine: RolloutEngine, verifier: AnswerVerifier | None,
                    log: Callable[[str], None]) -> ReferencePass | None:
    """The method's base-model measurement as a component (AdaptThink's R_ref), None if it needs none."""
    from megatron_hbpo.components.reference import ReferencePass, reference_problems
    from megatron_hbpo.rollout.engine import SamplingSettings

    spec = method.reference()
    if spec is None:
        return None
    r, a = recipe.rollout, recipe.algo
    return ReferencePass(spec, reference_problems(spec, recipe.data, source.rows, recipe.train.seed),
                         SamplingSettings(temperature=r.temperature, top_p=r.top_p, max_tokens=r.max_response_length),
                         prompts, engine, verifier, think_open=a.think_open, think_close=a.think_close,
                         run_dir=Path(recipe.logging.dir), seed=recipe.train.seed,
                         layout=recipe.rollout_layout, log=log)


def _anytime_summary(recipe: Recipe, before: dict, after: dict, run_dir: Path) -> None:
    """summary.json / summary.md / summary.png of an anytime run: acc(b) before and after, and the after curves of
    logging.compare_with runs that have one (e.g. the GRPO baseline), one line each."""
    from megatron_hbpo import atomic
    from megatron_hbpo.evaluation.anytime import anytime_table, is_anytime_document, plot_anytime

    docs = {f"{recipe.name} before": before, f"{recipe.name} after": after}
    for path in recipe.logging.compare_with:
        file = Path(path) / "eval_after.json"
        if file.is_file():
            other = json.loads(file.read_text())
            if is_anytime_document(other):
                docs[f"{Path(path).name} after"] = other
    table = anytime_table(docs)
    atomic.write_json(run_dir / "summary.json",
                      {"recipe": recipe.name, "anytime": {k: v["anytime"] for k, v in docs.items()}})
    atomic.write_text(run_dir / "summary.md", table)
    plot_anytime(docs, run_dir / "summary.png")
    _log_rank0(f"acc(b) %, before and after training:\n{table}wrote {run_dir / 'summary.json'}, summary.md, "
               "summary.png")


def _baselines(run_dirs: list[str]) -> dict[str, dict]:
    """Summaries of other runs to draw beside this one (logging.compare_with)."""
    out = {}
    for path in run_dirs:
        file = Path(path) / "summary.json"
        if file.is_file():
            data = json.loads(file.read_text())
            out[data.get("recipe", path)] = data
    return out


if __name__ == "__main__":
    sys.exit(main())
