"""Rollout throughput in the training job's layouts, and the refit's time and memory by bucket size.

    python tools/bench_rollout.py throughput [--layouts 1x1,2x1,2x2] [--repeats 2] [--config R.yaml] [a.b=c ...]
    python tools/bench_rollout.py refit [--buckets-mb 1,4,16,64,256] [--refits 3] [--config R.yaml] [a.b=c ...]

throughput: for each layout WxT (W processes, rollout.tensor_parallel_size T), a step's rollouts as
the training job makes them (the recipe's policy and engine on every rank, RolloutWorker: generate,
verify on each replica's first rank, gather to every rank) against a plain vLLM script on the same
ranks, same model, same requests and sampling settings (LLM + generate, nothing else). The two run
alternately, each in fresh processes, `--repeats` times; reports generated tokens/s of both and
their ratio (in-job generation vs plain; in-job with verification and gathering vs plain).

refit: one process, the recipe's policy and engine; refits from the policy through the export stream
with each bucket size: seconds per refit, the peak extra host memory of a refit (VmHWM after resetting
it through /proc/self/clear_refs, minus the RSS before) and the stream's own peak; then the time to
start a fresh engine on the same weights, in a new process (with and without its imports), and the
refit's time as a ratio of it.

The recipe defaults to recipes/tiny_cpu.yaml without its warm-up (random weights: every response
runs to the length limit, which is what a throughput measurement wants). For SmolLM2:
`--config recipes/smollm2_cpu.yaml model.hf_path=DIR data.train_files=[mawps.jsonl]`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OVERRIDES = ["warmup.steps=0", "eval.before_after=false", "logging.progress_bar=false",
                     "verifier.num_workers=1"]


# -- the pieces of the job (every rank) ---------------------------------------------------------------

def _recipe(config: str, overrides: list[str], world: int, tp: int, work: Path):
    from megatron_hbpo.config import load_recipe

    return load_recipe(config, [*DEFAULT_OVERRIDES, f"cluster.gpus_per_node={world}",
                                f"rollout.tensor_parallel_size={tp}", f"logging.dir={work / 'run'}",
                                f"checkpoint.dir={work / 'ck'}", *overrides])


def _job(recipe, work: Path):
    """(policy, hf_config, rollout model dir) as the training job builds them."""
    from megatron_hbpo.megatron import parallel
    from megatron_hbpo.megatron.train_step import MegatronPolicy
    from megatron_hbpo.train import load_base_weights, load_tokenizer_and_config, write_rollout_model

    m, t = recipe.model, recipe.train
    parallel.initialize(recipe.parallel, t.seed)
    tokenizer, hf_config = load_tokenizer_and_config(m, recipe.data)
    policy = MegatronPolicy(hf_config, m, recipe.parallel, recipe.optimizer, micro_batch_tokens=t.micro_batch_tokens,
                            optimizer_steps=1)
    load_base_weights(m, policy, hf_config, None)
    rollout_dir = Path(m.hf_path) if m.hf_path else work / "rollout_model"
    if not m.hf_path:
        write_rollout_model(policy, hf_config, tokenizer, rollout_dir)
    return policy, hf_config, tokenizer, rollout_dir


def _engine(recipe, rollout_dir: Path, replica: int):
    from megatron_hbpo.rollout.vllm_engine import VLLMEngine

    m, r = recipe.model, recipe.rollout
    return VLLMEngine(rollout_dir, seed=recipe.train.seed + replica,
                      dtype="float32" if m.params_dtype == "fp32" else "bfloat16",
                      max_model_len=r.max_prompt_length + r.max_response_length,
                      tensor_parallel_size=r.tensor_parallel_size, gpu_memory_utilization=r.gpu_memory_utilization,
                      enforce_eager=r.enforce_eager)


def worker_job(args: argparse.Namespace) -> None:
    """A step's rollouts through the trainer's RolloutWorker; writes the requests for the plain run."""
    import torch.distributed as dist

    from megatron_hbpo import runtime
    from megatron_hbpo.algo.verify import AnswerVerifier
    from megatron_hbpo.components.timer import Timer
    from megatron_hbpo.data.source import PromptSource
    from megatron_hbpo.train import build_trainer

    runtime.configure()
    work = Path(args.work)
    recipe = _recipe(args.config, args.overrides, args.world, args.tp, work)
    source = PromptSource(recipe.data, recipe.train.seed, log=lambda _: None)
    policy, hf_config, tokenizer, rollout_dir = _job(recipe, work)
    layout = recipe.rollout_layout
    rank = dist.get_rank()
    engine = _engine(recipe, rollout_dir, layout.replica_of(rank))
    verifier = AnswerVerifier(1, recipe.verifier.timeout_s) if layout.is_leader(rank) else None
    trainer, _ = build_trainer(recipe, policy=policy, hf_config=hf_config, tokenizer=tokenizer, engine=engine,
                               verifier=verifier, source=source, log=lambda _: None)
    captured = []
    generate = engine.generate

    def capture(requests):
        captured.extend(requests)
        return generate(requests)

    engine.generate = capture  # type: ignore[method-assign]
    problems = source.batch(0, recipe.train.prompts_per_step)
    trainer.rollouts.run(1, problems, Timer())  # warm-up (the plain run warms up on the same requests)
    captured.clear()
    timer = Timer()
    dist.barrier()
    start = time.perf_counter()
    records = trainer.rollouts.run(1, problems, timer)
    wall = time.perf_counter() - start
    requests = [{"prompt_ids": list(q.prompt_ids), "n": q.n, "temperature": q.sampling.temperature,
                 "top_p": q.sampling.top_p, "max_tokens": q.sampling.max_tokens} for q in captured]
    (work / f"requests_rank{rank}.json").write_text(json.dumps(requests))
    row = {"generate_s": timer.seconds.get("rollout", 0.0), "wall_s": wall,
           "tokens": sum(x.length for x in records)}  # every rank holds all records
    _report(row, work, "job")
    if verifier is not None:
        verifier.close()
    dist.barrier()
    engine.close()


def worker_plain(args: argparse.Namespace) -> None:
    """The same requests through vLLM alone: LLM + generate on each rank of each replica."""
    from megatron_hbpo import runtime

    runtime.configure(megatron=False)  # before vLLM is imported: the engine in this process, as the job's
    import torch.distributed as dist
    from vllm import LLM, SamplingParams

    if args.world > 1:
        # As in the job, the process group exists before the engine (vLLM's external launcher joins it;
        # starting it alone it would size its world by T alone).
        dist.init_process_group("gloo")
    work = Path(args.work)
    recipe = _recipe(args.config, args.overrides, args.world, args.tp, work)
    rank = int(os.environ.get("RANK", "0"))
    layout = recipe.rollout_layout
    m, r = recipe.model, recipe.rollout
    kwargs = dict(model=str(Path(m.hf_path) if m.hf_path else work / "rollout_model"),
                  dtype="float32" if m.params_dtype == "fp32" else "bfloat16",
                  max_model_len=r.max_prompt_length + r.max_response_length, seed=recipe.train.seed +
                  layout.replica_of(rank), enforce_eager=r.enforce_eager, enable_prefix_caching=True,
                  tensor_parallel_size=r.tensor_parallel_size)
    if args.world > 1:
        kwargs["distributed_executor_backend"] = "external_launcher"
    if not _on_gpu():
        kwargs["kv_cache_memory_bytes"] = 256 << 20
    else:
        kwargs["gpu_memory_utilization"] = r.gpu_memory_utilization
    llm = LLM(**kwargs)
    requests = json.loads((work / f"requests_rank{rank}.json").read_text())
    params = [SamplingParams(n=q["n"], temperature=q["temperature"], top_p=q["top_p"], max_tokens=q["max_tokens"],
                             logprobs=0) for q in requests]
    prompts = [{"prompt_token_ids": q["prompt_ids"]} for q in requests]
    llm.generate(prompts, params, use_tqdm=False)  # warm-up, as the job's
    if dist.is_initialized():
        dist.barrier()
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs) if layout.is_leader(rank) else 0
    if dist.is_initialized():
        counts = [None] * dist.get_world_size()
        dist.all_gather_object(counts, tokens)
        tokens = sum(counts)
    _report({"generate_s": seconds, "wall_s": seconds, "tokens": tokens}, work, "plain")


def _on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def _report(row: dict, work: Path, kind: str) -> None:
    """The slowest rank's times (the step waits for it) and the tokens, written by rank 0."""
    import torch.distributed as dist

    rows = [row]
    if dist.is_initialized() and dist.get_world_size() > 1:
        rows = [None] * dist.get_world_size()
        dist.all_gather_object(rows, row)
    if not dist.is_initialized() or dist.get_rank() == 0:
        out = {"kind": kind, "tokens": rows[0]["tokens"], "generate_s": max(x["generate_s"] for x in rows),
               "wall_s": max(x["wall_s"] for x in rows)}
        (work / f"{kind}.json").write_text(json.dumps(out))


# -- throughput: the driver --------------------------------------------------------------------------

def _launch(kind: str, world: int, tp: int, args: argparse.Namespace, work: Path) -> dict:
    script = [str(Path(__file__).resolve()), f"_{kind}", "--world", str(world), "--tp", str(tp), "--work", str(work),
              "--config", args.config, *args.overrides]
    cmd = [sys.executable, *script] if world == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}", *script]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // world)))
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-4000:]}")
    return json.loads((work / f"{kind}.json").read_text())


def throughput(args: argparse.Namespace) -> None:
    layouts = [tuple(int(x) for x in spec.split("x")) for spec in args.layouts.split(",")]
    print(f"{'layout':>8} {'repeat':>6} {'tokens':>7} {'plain tok/s':>12} {'job gen tok/s':>14} {'job step tok/s':>15} "
          f"{'gen ratio':>9} {'step ratio':>10}")
    summary = {}
    with tempfile.TemporaryDirectory() as tmp:
        for world, tp in layouts:
            work = Path(tmp) / f"{world}x{tp}"
            work.mkdir()
            ratios = []
            for repeat in range(args.repeats):
                # The job writes the model and the requests first; afterwards the order alternates.
                order = ("job", "plain") if repeat % 2 == 0 else ("plain", "job")
                results = {kind: _launch(kind, world, tp, args, work) for kind in order}
                job, plain = results["job"], results["plain"]
                plain_tps = plain["tokens"] / plain["generate_s"]
                gen_tps, step_tps = job["tokens"] / job["generate_s"], job["tokens"] / job["wall_s"]
                ratios.append((gen_tps / plain_tps, step_tps / plain_tps))
                print(f"{world}x{tp:<6} {repeat:>6} {job['tokens']:>7} {plain_tps:>12,.0f} {gen_tps:>14,.0f} "
                      f"{step_tps:>15,.0f} {ratios[-1][0]:>9.3f} {ratios[-1][1]:>10.3f}", flush=True)
                if job["tokens"] != plain["tokens"]:
                    print(f"  note: {job['tokens']} tokens in the job, {plain['tokens']} in the plain run (sampling)")
            gen = [a for a, _ in ratios]
            summary[f"{world}x{tp}"] = {"gen_ratio_mean": statistics.mean(gen), "gen_ratio_min": min(gen),
                                        "gen_ratio_max": max(gen)}
    print(json.dumps(summary))


# -- refit -------------------------------------------------------------------------------------------

def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def refit(args: argparse.Namespace) -> None:
    import gc

    import torch

    from megatron_hbpo import runtime
    from megatron_hbpo.convert.export import HFExportStream

    runtime.configure()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        recipe = _recipe(args.config, args.overrides, 1, 1, work)
        policy, hf_config, _, rollout_dir = _job(recipe, work)
        engine = _engine(recipe, rollout_dir, 0)
        model_mb = sum(p.numel() * p.element_size() for p in policy.model[0].parameters()) / 2**20
        print(f"model {model_mb:.1f} MiB ({recipe.model.params_dtype}); "
              f"{'device' if engine.on_gpu else 'host'} memory")
        print(f"{'bucket MiB':>10} {'refit s (min)':>14} {'refit s (mean)':>15} {'peak extra MiB':>15} "
              f"{'stream peak MiB':>16} {'largest tensor MiB':>19}")
        refit_s = {}
        for bucket_mb in [int(b) for b in args.buckets_mb.split(",")]:
            times, extras = [], []
            for _ in range(args.refits):
                gc.collect()
                if engine.on_gpu:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    before = torch.cuda.memory_allocated()
                else:
                    before = _rss_kib("VmRSS") * 1024
                    _reset_peak()
                stream = HFExportStream(policy.model[0], hf_config, bucket_bytes=bucket_mb << 20)
                start = time.perf_counter()
                engine.update_weights(stream)
                if engine.on_gpu:
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
                peak = torch.cuda.max_memory_allocated() if engine.on_gpu else _rss_kib("VmHWM") * 1024
                extras.append(max(0, peak - before) / 2**20)
            refit_s[bucket_mb] = min(times)
            print(f"{bucket_mb:>10} {min(times):>14.3f} {statistics.mean(times):>15.3f} {max(extras):>15.1f} "
                  f"{stream.peak_bytes / 2**20:>16.1f} {stream.max_tensor_bytes / 2**20:>19.1f}", flush=True)
        fresh = _fresh_engine_seconds(recipe, rollout_dir)
        best = min(refit_s.values())
        print(f"fresh engine on the same weights: {fresh['process_s']:.1f} s as a new process, "
              f"{fresh['engine_s']:.1f} s of it constructing the engine")
        print(f"fastest refit {best:.3f} s = {best / fresh['process_s']:.3f} x a new process, "
              f"{best / fresh['engine_s']:.3f} x the engine's construction")
        print(json.dumps({"refit_s": refit_s, "fresh": fresh, "model_mib": model_mb}))
        engine.close()


def _fresh_engine_seconds(recipe, rollout_dir: Path) -> dict:
    code = ("import time; t0 = time.perf_counter()\n"
            "from megatron_hbpo import runtime; runtime.configure(megatron=False)\n"
            "from megatron_hbpo.rollout.vllm_engine import VLLMEngine\n"
            "t1 = time.perf_counter()\n"
            f"VLLMEngine({str(rollout_dir)!r}, seed=0, dtype={('float32' if recipe.model.params_dtype == 'fp32' else 'bfloat16')!r}, "
            f"max_model_len={recipe.rollout.max_prompt_length + recipe.rollout.max_response_length}, "
            f"enforce_eager={recipe.rollout.enforce_eager})\n"
            "import json; print(json.dumps({'engine_s': time.perf_counter() - t1}))\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True)
    process_s = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"the fresh engine failed:\n{proc.stderr[-3000:]}")
    line = [x for x in proc.stdout.splitlines() if x.startswith("{")][-1]
    return {"process_s": process_s, **json.loads(line)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("throughput", "refit", "_job", "_plain"):
        p = sub.add_parser(name)
        p.add_argument("--config", default=str(REPO / "recipes" / "tiny_cpu.yaml"))
        p.add_argument("overrides", nargs="*", help="recipe overrides a.b=c")
        if name == "throughput":
            p.add_argument("--layouts", default="1x1,2x1,2x2", help="WxT: W processes, rollout TP T")
            p.add_argument("--repeats", type=int, default=2)
        elif name == "refit":
            p.add_argument("--buckets-mb", default="1,4,16,64,256")
            p.add_argument("--refits", type=int, default=3)
        else:
            p.add_argument("--world", type=int, required=True)
            p.add_argument("--tp", type=int, required=True)
            p.add_argument("--work", required=True)
    args = parser.parse_args()
    {"throughput": throughput, "refit": refit, "_job": worker_job, "_plain": worker_plain}[args.command](args)


if __name__ == "__main__":
    main()
