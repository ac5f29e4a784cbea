"""Exact resume from a training-state checkpoint (model + optimizer + LR schedule), on CPU (gloo).

    torchrun --nproc-per-node N training_state_roundtrip.py --dir TMP [--set section.field=value ...] CASE...

    CASE: comma-separated tp=T, pp=P, distopt (the distributed optimizer), reshard=TxP, checks

A tiny policy (recipes/tiny_cpu.yaml, cosine LR with warm-up so that the schedule matters) takes 2
optimizer steps, saves, and takes 2 more, recording loss, grad norm, LR, clip fraction and the full
weights (logp_old comes from the current weights plus fixed noise, so the gradient norm and the
weights are what depend on the restored state; loss and clip fraction check the data). A second
policy, built from another seed and moved by one step of its own (so that its weights, Adam moments
and scheduler step count are all wrong), loads the checkpoint and takes the same 2 steps: everything
must be bitwise equal (torch.equal) to the first continuation.

reshard=TxP then rebuilds the process groups at TP=T, PP=P (DP = world / T / P) and loads the same
checkpoint into a third policy: its weights must equal the saved ones exactly, and the 2 continuation
steps match to float tolerance (another layout sums in another order). checks (world 1) checks the
refusals, mismatch errors, and that a save failing before its rename leaves no checkpoint-named
directory.
Exits non-zero on failure; each rank reports the checks it passed (tests/dist/common.write_report).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from common import policy_from_recipe, write_report

from megatron_hbpo import runtime
from megatron_hbpo.algo.loss import ClippedLoss
from megatron_hbpo.config import load_recipe
from megatron_hbpo.megatron import checkpoint, parallel
from megatron_hbpo.megatron.batching import PolicySequence
from megatron_hbpo.megatron.model import hf_config_from_recipe
from megatron_hbpo.megatron.state import iter_full_tensors
from megatron_hbpo.megatron.train_step import MegatronPolicy

LOSS = ClippedLoss(temperature=1.0)
PASSED: list[str] = []  # the checks this rank passed, in order

REPO = Path(__file__).resolve().parents[2]
SAVE_AT = 2  # optimizer steps before the checkpoint
CONTINUE = 2  # steps compared after it
RESHARD_TOL = 1e-5


class Failure(Exception):
    pass


def expect(condition: bool, error: BaseException) -> None:
    if not condition:
        raise Failure(f"unclear error: {error!r}")


def build(layout: tuple[int, int], distributed_optimizer: bool, seed: int, *overrides: str) -> MegatronPolicy:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    recipe = load_recipe(REPO / "recipes" / "tiny_cpu.yaml", [
        f"cluster.gpus_per_node={world}", f"parallel.tensor_model_parallel_size={layout[0]}",
        f"parallel.pipeline_model_parallel_size={layout[1]}",
        f"optimizer.use_distributed_optimizer={str(distributed_optimizer).lower()}",
        "optimizer.lr=1e-3", "optimizer.lr_schedule=cosine", "optimizer.lr_warmup_steps=1",
        "optimizer.weight_decay=0.01", "train.micro_batch_tokens=160", "train.total_steps=2", *overrides,
    ], world_size=world)
    parallel.initialize(recipe.parallel, seed=seed)
    return policy_from_recipe(recipe, hf_config_from_recipe(recipe.model))


def batch(policy: MegatronPolicy, step: int) -> list[PolicySequence]:
    """The step's global batch (the same at any layout), this DP rank's share of it, with logp_old."""
    from megatron.core import parallel_state

    g = torch.Generator().manual_seed(100 + step)
    vocab = policy.vocab_size
    sequences = []
    for _ in range(6):
        prompt = int(torch.randint(2, 12, (), generator=g))
        length = prompt + int(torch.randint(4, 40, (), generator=g))
        sequences.append(PolicySequence(torch.randint(0, vocab, (length,), generator=g).tolist(), prompt,
                                        advantage=float(torch.randn((), generator=g))))
    # Slightly off-policy, so that the clipped branches of the loss are exercised too.
    noise = [0.2 * torch.randn(seq.response_length, generator=g) for seq in sequences]
    rank, size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    mine, my_noise = sequences[rank::size], noise[rank::size]
    for seq, logp, offset in zip(mine, policy.logprobs(mine, temperature=1.0), my_noise):
        seq.logp_old = logp + offset
    return mine


def full_weights(policy: MegatronPolicy) -> dict[str, torch.Tensor]:
    return {name: t.clone() for name, t in iter_full_tensors(policy.model[0])}


def continue_training(policy: MegatronPolicy, first_step: int) -> list[tuple[tuple[float, ...], dict]]:
    record = []
    for step in range(first_step, first_step + CONTINUE):
        m = policy.train_step(batch(policy, step), LOSS)
        record.append(((m.loss, m.grad_norm, m.lr, m.metrics["clip_fraction"]), full_weights(policy)))
    return record


def compare(got: list, want: list, *, exact: bool, what: str) -> float:
    worst = 0.0
    for i, ((metrics, weights), (metrics_ref, weights_ref)) in enumerate(zip(got, want)):
        if exact and metrics != metrics_ref:
            raise Failure(f"{what}: step {SAVE_AT + i} metrics {metrics} != {metrics_ref}")
        shared = weights.keys() & weights_ref.keys()
        if not shared:
            raise Failure(f"{what}: no weights to compare")
        for name in sorted(shared):
            rows = min(weights[name].shape[0], weights_ref[name].shape[0])  # padded vocabulary rows depend on TP
            mine, ref = weights[name][:rows], weights_ref[name][:rows]
            if exact and not torch.equal(mine, ref):
                raise Failure(f"{what}: step {SAVE_AT + i} weight {name} differs by {(mine - ref).abs().max():.3e}")
            if not exact:
                worst = max(worst, float((mine - ref).abs().max()))
        if not exact:
            worst = max(worst, *(abs(a - b) for a, b in zip(metrics, metrics_ref)))
    return worst


_START = time.perf_counter()


def log(message: str) -> None:
    PASSED.append(message.split(":")[0])
    if dist.get_rank() == 0:
        print(f"{message} [{time.perf_counter() - _START:.1f} s]", flush=True)


def failure_checks(policy: MegatronPolicy, root: Path, saved: Path) -> None:
    """World 1 only: refusals and crash safety (by making the last step before the rename fail)."""
    try:
        checkpoint.save_training_state(policy, saved, {"step": 0})
        raise Failure("saving over an existing checkpoint did not raise")
    except FileExistsError as e:
        expect(str(saved) in str(e), e)
    try:
        checkpoint.save_training_state(policy, root / "step_0000009", {"bad": object()})
        raise Failure("a non-JSON trainer state did not raise")
    except TypeError:
        pass
    target = checkpoint.checkpoint_dir(root, 7)
    original = checkpoint.write_text

    def crash(path, text):
        raise OSError("simulated crash before the rename")

    checkpoint.write_text = crash
    try:
        checkpoint.save_training_state(policy, target, {"step": 7})
        raise Failure("the simulated crash did not propagate")
    except OSError as e:
        expect("simulated" in str(e), e)
    finally:
        checkpoint.write_text = original
    if target.exists() or not (root / ".step_0000007.tmp").is_dir():
        raise Failure(f"a failed save left {sorted(p.name for p in root.iterdir())}")
    if checkpoint.resolve_resume("auto", root) != saved:
        raise Failure("resume=auto picked something other than the one complete checkpoint")
    # Loading the leftover (all shards, no trainer_state.json) must refuse and name it.
    try:
        checkpoint.load_training_state(policy, root / ".step_0000007.tmp")
        raise Failure("loading an incomplete checkpoint did not raise")
    except FileNotFoundError as e:
        expect(".step_0000007.tmp" in str(e) and "trainer_state.json" in str(e), e)
    weights_only = root / "weights_only"
    checkpoint.save_weights(policy.model[0], weights_only)
    (weights_only / checkpoint.TRAINER_STATE).write_text("{}")
    try:
        checkpoint.load_training_state(policy, weights_only)
        raise Failure("loading a weights-only checkpoint did not raise")
    except ValueError as e:
        expect(str(weights_only) in str(e), e)
    # The next save of that step succeeds over the stale .tmp.
    checkpoint.save_training_state(policy, target, {"step": 7})
    if not (target / checkpoint.TRAINER_STATE).is_file() or (root / ".step_0000007.tmp").exists():
        raise Failure("a save after a crashed one did not replace the stale .tmp")
    log("OK failure checks: refusals, crash before rename, incomplete and weights-only loads")


def mismatch_checks(saved: Path) -> None:
    """World 1: a checkpoint that does not fit the model or optimizer is refused, naming it."""
    for distributed_optimizer, overrides, expected in [
            (True, [], "use_distributed_optimizer"),
            (False, ["model.num_layers=3"], "shape mismatch"),
            (False, ["model.ffn_hidden_size=384"], "shape mismatch")]:
        policy = build((1, 1), distributed_optimizer, 5, *overrides)
        try:
            checkpoint.load_training_state(policy, saved)
            raise Failure(f"loading into a policy with {overrides or 'the distributed optimizer'} did not raise")
        except ValueError as e:
            if str(saved) not in str(e) or expected not in str(e):
                raise Failure(f"unclear mismatch error: {e}") from None
    log("OK mismatch checks: other optimizer kind, layer count and FFN size refused, naming the checkpoint")


def parse_case(spec: str) -> dict:
    """'tp=2,pp=1,distopt,reshard=1x1,checks' -> the case's settings."""
    case = {"spec": spec, "layout": (1, 1), "distopt": False, "reshard": None, "checks": False}
    tp, pp = 1, 1
    for token in filter(None, spec.split(",")):
        key, _, value = token.partition("=")
        if key == "tp":
            tp = int(value)
        elif key == "pp":
            pp = int(value)
        elif key == "reshard":
            case["reshard"] = tuple(int(x) for x in value.split("x"))
        elif key in ("distopt", "checks") and not value:
            case[key] = True
        else:
            raise SystemExit(f"bad case token {token!r} in {spec!r}")
    case["layout"] = (tp, pp)
    return case


def run_case(case: dict, root: Path, overrides: list[str]) -> None:
    layout, distopt, label = case["layout"], case["distopt"], f"[{case['spec']}]"
    policy = build(layout, distopt, 1234, *overrides)
    for step in range(SAVE_AT):
        policy.train_step(batch(policy, step), LOSS)
    saved = checkpoint.checkpoint_dir(root, SAVE_AT)
    trainer_state = {"step": SAVE_AT, "consumed_prompts": 32, "rng": [1, 2, 3], "note": "x"}
    checkpoint.save_training_state(policy, saved, trainer_state)
    saved_weights = full_weights(policy)
    saved_steps = policy.scheduler.num_steps
    reference = continue_training(policy, SAVE_AT)
    log(f"{label} OK saved {saved.name}: {sorted(p.name for p in saved.iterdir())}")
    if case["checks"]:
        failure_checks(policy, root, saved)
    del policy

    resumed = build(layout, distopt, 999, *overrides)
    resumed.train_step(batch(resumed, 5), LOSS)  # wrong weights, Adam moments and scheduler step count
    if all(torch.equal(w, saved_weights[n]) for n, w in full_weights(resumed).items()):
        raise Failure("the fresh policy already holds the saved weights; the check would prove nothing")
    state = checkpoint.load_training_state(resumed, saved)
    if state != trainer_state:
        raise Failure(f"trainer state {state} != {trainer_state}")
    if resumed.scheduler.num_steps != saved_steps:
        raise Failure(f"scheduler at step {resumed.scheduler.num_steps}, saved at {saved_steps}")
    compare([((), full_weights(resumed))], [((), saved_weights)], exact=True, what="loaded weights")
    compare(continue_training(resumed, SAVE_AT), reference, exact=True, what="resumed")
    log(f"{label} OK exact resume: {CONTINUE} steps after loading equal the uninterrupted run bitwise "
        f"(grad norm {reference[-1][0][1]:.6f}, lr {reference[-1][0][2]:.3e})")
    del resumed

    if case["checks"]:
        mismatch_checks(saved)
    if case["reshard"]:
        target = case["reshard"]
        other = build(target, distopt, 4321, *overrides)
        checkpoint.load_training_state(other, saved)
        # Under another PP size a rank holds other layers: compare the ones both stages hold.
        compare([((), full_weights(other))], [((), saved_weights)], exact=True, what="resharded load")
        worst = compare(continue_training(other, SAVE_AT), reference, exact=False, what="resharded")
        if worst > RESHARD_TOL:
            raise Failure(f"resharded resume differs by {worst:.2e}")
        log(f"{label} OK resharded resume (TP, PP) {layout} -> {target}: weights equal, "
            f"{CONTINUE} steps within {worst:.1e}")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", required=True)
    parser.add_argument("--set", action="append", default=[], help="recipe override, e.g. model.params_dtype=bf16")
    parser.add_argument("cases", nargs="+", help="e.g. 'tp=2,reshard=1x1' or 'distopt,checks'")
    args = parser.parse_args()
    runtime.configure()
    for i, spec in enumerate(args.cases):  # one process for several cases: Megatron's import is the slow part
        run_case(parse_case(spec), Path(args.dir) / f"case{i}", args.set)
    dist.barrier()
    dist.destroy_process_group()
    write_report({"passed": PASSED})
    return 0


if __name__ == "__main__":  # dist_checkpointing.save starts worker processes that re-import __main__
    try:
        sys.exit(main())
    except Failure as failure:
        print(f"rank {dist.get_rank() if dist.is_initialized() else 0} FAIL: {failure}", flush=True)
        sys.exit(1)
