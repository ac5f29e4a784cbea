"""The main job: `python -m megatron_hbpo.train --config recipes/R.yaml [--resume auto|none|DIR] [a.b=c ...]`.

Under torchrun (or srun) for several processes; plain `python` is a world of one. In order:

1. validate the recipe (before any process group starts) and start the groups;
2. the base model: the synthetic task's supervised warm-up (reused when already done), or the
   recipe's HF checkpoint;
3. the Megatron policy, resumed from the newest checkpoint with `--resume auto`;
4. one vLLM engine per model-parallel group, refit with the policy's weights;
5. evaluation of the base per level and prompt mode (eval.before_after), HBPO/GRPO steps, and the
   evaluation after; `runs/<name>/summary.json` and `summary.png`.

Exit codes: 0 done, 1 the refit check stopped the run (one line says why), 2 bad recipe or data, 143
stopped by SIGTERM after saving a checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

PREEMPTED_EXIT = 143


def _log_rank0(message: str) -> None:
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        print(message, flush=True)


def _log_rank0_err(message: str) -> None:
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        print(message, file=sys.stderr, flush=True)


def load_tokenizer_and_config(recipe: Any) -> tuple[Any, Any]:
    """(tokenizer, transformers config) of the policy."""
    from transformers import AutoConfig, AutoTokenizer

    from megatron_hbpo.megatron.model import check_hf_config, hf_config_from_recipe

    m = recipe.model
    if recipe.data.source == "synthetic":
        from megatron_hbpo.data.synthetic import task_tokenizer

        tokenizer = task_tokenizer()
        hf_config = hf_config_from_recipe(m)
    else:
        path = m.tokenizer_path or m.hf_path  # validate() made sure one is set
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        hf_config = AutoConfig.from_pretrained(m.hf_path, local_files_only=True) if m.hf_path else \
            hf_config_from_recipe(m)
        if m.hf_path:
            check_hf_config(m, hf_config)
    if len(tokenizer) > hf_config.vocab_size:
        raise ValueError(f"model.vocab_size={hf_config.vocab_size} is smaller than the tokenizer's "
                         f"{len(tokenizer)} tokens")
    for key in ("eos_token_id", "pad_token_id", "bos_token_id"):
        if getattr(hf_config, key, None) is None:
            setattr(hf_config, key, tokenizer.eos_token_id)
    return tokenizer, hf_config


def load_base_weights(recipe: Any, policy: Any, hf_config: Any, warmup_weights: Path | None) -> None:
    from megatron_hbpo.convert.hf_io import HFCheckpoint
    from megatron_hbpo.convert.mapping import hf_to_megatron_tensors
    from megatron_hbpo.megatron.checkpoint import load_weights
    from megatron_hbpo.megatron.model import padded_vocab_size, use_transformer_engine

    if warmup_weights is not None:
        load_weights(policy.model[0], warmup_weights)
        policy.optimizer.reload_model_params()
    elif recipe.model.hf_path:
        # Streams the checkpoint tensor by tensor into one full-size host copy; for the largest
        # models convert once with tools/convert_hf_to_megatron.py instead.
        source = HFCheckpoint(recipe.model.hf_path)
        padded = padded_vocab_size(hf_config.vocab_size, 1, recipe.model.make_vocab_size_divisible_by)
        state = dict(hf_to_megatron_tensors(source.get, hf_config, padded,
                                            transformer_engine=use_transformer_engine(recipe.model.transformer_impl)))
        policy.load_full_state(state.__getitem__)


def write_rollout_model(policy: Any, hf_config: Any, tokenizer: Any, directory: Path) -> None:
    """An HF directory of the policy's current weights for vLLM to start from (collective)."""
    import shutil

    import torch.distributed as dist

    from megatron_hbpo.convert.export import HFExportStream
    from megatron_hbpo.convert.hf_io import write_safetensors

    stream = HFExportStream(policy.model[0], hf_config, bucket_bytes=256 << 20)
    if dist.get_rank() == 0:
        tmp = directory.with_name(f".{directory.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        write_safetensors(tmp, ((name, t.cpu()) for bucket in stream for name, t in bucket))
        hf_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(directory, ignore_errors=True)
        tmp.rename(directory)
    else:
        for _ in stream:
            pass
    dist.barrier()


def evaluate_policy(recipe: Any, trainer: Any, problems: list, label: str) -> dict:
    """{mode: {level: metrics}} over the eval set, modes = natural + each budget; split over DP."""
    import torch.distributed as dist

    from megatron_hbpo.evaluate import aggregate, format_table, generate_and_score, sample_rows
    from megatron_hbpo.trainer import seed_everything

    start = time.perf_counter()
    modes = [None, *recipe.algo.budgets]  # validated: distinct, increasing; empty for GRPO
    mine = problems[trainer.dp_rank::trainer.dp_size]
    records = []
    if trainer.is_generator:
        seed_everything(recipe.eval.seed, "eval", label, trainer.dp_rank)
        trainer.engine.wake()
        for mode in modes:
            records += generate_and_score(trainer.engine, trainer.tokenizer, trainer.verifier, mine, mode, recipe)
        trainer.engine.sleep()
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, records)
    all_records = [r for part in gathered for r in part]
    table = aggregate(all_records)
    if dist.get_rank() == 0:
        samples = trainer.run_dir / f"eval_samples_{label.replace(' ', '_')}.jsonl"
        samples.parent.mkdir(parents=True, exist_ok=True)
        samples.write_text("".join(json.dumps(row) + "\n" for row in sample_rows(all_records)))
    _log_rank0(f"evaluation {label} ({time.perf_counter() - start:.1f} s; accuracy % / mean response tokens):\n"
               + format_table(table))
    return table


def build_summary(before: dict, after: dict, wall_seconds: float, extra: dict) -> dict:
    def pair(mode: str, level: str) -> dict:
        pick = ("accuracy", "mean_tokens")
        return {"before": {k: before[mode][level][k] for k in pick}, "after": {k: after[mode][level][k] for k in pick}}

    summary = {"levels": {lv: pair("natural", lv) for lv in after["natural"]},
               "budgets": {mode: {lv: pair(mode, lv) for lv in after[mode]} for mode in after if mode != "natural"},
               "wall_seconds": wall_seconds}
    summary.update(extra)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="HBPO training on Megatron-Core with vLLM rollouts.")
    parser.add_argument("--config", required=True, help="recipe YAML (recipes/...)")
    parser.add_argument("--resume", default=None, help="auto (newest complete checkpoint), none, or a checkpoint "
                                                       "directory; default: the recipe's checkpoint.resume")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.total_steps=10")
    args = parser.parse_args(argv)
    wall_start = time.perf_counter()
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # per-refit INFO lines would bury the progress bar

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
    return run(recipe, wall_start)


def run(recipe: Any, wall_start: float) -> int:
    from megatron_hbpo.data.prompts import DataError
    from megatron_hbpo.trainer import RefitMismatchError

    try:
        return _run(recipe, wall_start)
    except DataError as e:
        print(f"data error: {e}", file=sys.stderr)
        return 2
    except RefitMismatchError as e:
        _log_rank0_err(str(e))
        return 1


def _run(recipe: Any, wall_start: float) -> int:
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_hbpo.algo.verify import AnswerVerifier
    from megatron_hbpo.data.source import PromptSource, file_eval_set, synthetic_eval_set
    from megatron_hbpo.evaluate import write_json_atomic
    from megatron_hbpo.megatron import parallel
    from megatron_hbpo.megatron.train_step import MegatronPolicy
    from megatron_hbpo.trainer import Trainer, holds_rollout_engine
    from megatron_hbpo.warmup import run_warmup

    source = PromptSource(recipe, log=_log_rank0)  # bad data fails here, before any process group or model exists
    parallel.initialize(recipe.parallel, recipe.train.seed)
    tokenizer, hf_config = load_tokenizer_and_config(recipe)
    run_dir = Path(recipe.logging.dir)
    warmup_weights = run_warmup(recipe, hf_config, tokenizer, log=_log_rank0) if recipe.warmup.steps else None

    policy = MegatronPolicy(recipe, hf_config)
    load_base_weights(recipe, policy, hf_config, warmup_weights)
    engine = verifier = None
    is_generator = holds_rollout_engine()
    rollout_dir = Path(recipe.model.hf_path) if recipe.model.hf_path else run_dir / "rollout_model"
    if not recipe.model.hf_path:
        write_rollout_model(policy, hf_config, tokenizer, rollout_dir)
    if is_generator:
        from megatron_hbpo.rollout.vllm_engine import VLLMEngine

        r = recipe.rollout
        engine = VLLMEngine(rollout_dir, seed=recipe.train.seed + parallel_state.get_data_parallel_rank(),
                            dtype="float32" if recipe.model.params_dtype == "fp32" else "bfloat16",
                            max_model_len=r.max_prompt_length + r.max_response_length,
                            tensor_parallel_size=r.tensor_parallel_size,
                            gpu_memory_utilization=r.gpu_memory_utilization, enforce_eager=r.enforce_eager)
        verifier = AnswerVerifier(recipe.verifier.num_workers, recipe.verifier.timeout_s)
    trainer = Trainer(recipe, policy, hf_config, tokenizer, engine, verifier, run_dir, source=source, log=_log_rank0)
    try:
        eval_set = None
        if recipe.eval.before_after or recipe.eval.interval:
            e = recipe.eval
            eval_set = synthetic_eval_set(recipe.data.synthetic_levels, e.problems_per_level, e.seed) \
                if recipe.data.source == "synthetic" else file_eval_set(recipe)
        before_path = run_dir / "eval_before.json"
        trainer.resume()
        if trainer.start_step == 1 or not before_path.exists():
            # The engine holds the base weights until the first refit.
            if recipe.eval.before_after:
                before = evaluate_policy(recipe, trainer, eval_set, "before training")
                if dist.get_rank() == 0:
                    write_json_atomic(before_path, before)
        if trainer.start_step > 1:
            trainer.refit()  # the engine starts from the base; the resumed policy has moved on

        def periodic_eval(step: int, metrics: dict) -> None:
            if recipe.eval.interval and step % recipe.eval.interval == 0:
                table = evaluate_policy(recipe, trainer, eval_set, f"at step {step}")
                for mode, per_level in table.items():
                    for level, values in per_level.items():
                        metrics.update({f"eval_{mode}_{level}/{k}": v for k, v in values.items() if k != "samples"})

        trainer.run(on_step=periodic_eval)
        if trainer.preempted:
            return PREEMPTED_EXIT
        if recipe.eval.before_after:
            after = evaluate_policy(recipe, trainer, eval_set, "after training")
            if dist.get_rank() == 0:
                before = json.loads(before_path.read_text())
                summary = build_summary(before, after, time.perf_counter() - wall_start,
                                        {"recipe": recipe.name, "algo": recipe.algo.name,
                                         "center_intra": recipe.algo.center_intra,
                                         "steps": recipe.train.total_steps})
                write_json_atomic(run_dir / "summary.json", summary)
                from megatron_hbpo.report import plot_summary

                plot_summary(summary, run_dir / "summary.png", baselines=_baselines(recipe))
                _log_rank0(f"wrote {run_dir / 'summary.json'} and {run_dir / 'summary.png'} "
                           f"({time.perf_counter() - wall_start:.0f} s in all)")
        dist.barrier()  # rank 0 writes the summary; everyone leaves together
        return 0
    finally:
        # No collective here: after an error on one rank, a barrier would hang the others.
        if verifier is not None:
            verifier.close()


def _baselines(recipe: Any) -> dict[str, dict]:
    """Summaries of other runs to draw beside this one (logging.compare_with)."""
    out = {}
    for path in recipe.logging.compare_with:
        file = Path(path) / "summary.json"
        if file.is_file():
            data = json.loads(file.read_text())
            out[data.get("recipe", path)] = data
    return out


if __name__ == "__main__":
    sys.exit(main())
