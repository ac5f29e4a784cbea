"""Supervised warm-up of the synthetic task's base model, in the same Megatron stack as the RL step.

RL can only reinforce what the policy already samples, so the base must sometimes write short
chains; mostly it writes verbose ones, padded to about the same length at every level and whatever
budget the prompt names (the over-thinking base HBPO starts from). Its first-pass additions are
wrong at `warmup.error_rate`, which only the checked styles catch. `warmup.style_mix` sets the
shares. The result is a weights-only dist checkpoint in `warmup.dir`, with a fingerprint of what
produced it, so an HBPO run and its GRPO baseline start from the same base and the second run
reuses the first one's warm-up instead of repeating it. The fingerprint includes a digest of this
module and the task's data code, so a change to how the base is made is never mistaken for the old
base. `warmup.prebuilt` names a base built ahead by the same code (tools/build_warmup_base.py,
`make warmup-base`), used only when its fingerprint matches.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from megatron_hbpo import atomic
from megatron_hbpo.algo.loss import SFTLoss
from megatron_hbpo.config import AlgoConfig, DataConfig, ModelConfig, OptimizerConfig, ParallelConfig, WarmupConfig
from megatron_hbpo.data.chat import NATURAL, PromptBuilder, PromptFormat, budget_mode
from megatron_hbpo.data.synthetic import TASK_VERSION, Problem, make_problem, response_text, style_mix_sample
from megatron_hbpo.megatron.batching import PolicySequence

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

    from megatron_hbpo.megatron.train_step import MegatronPolicy

FINGERPRINT_FILE = "warmup.json"
# The code that decides what the base learns: the warm-up's data and loop here, the task's problems and
# chains, and the prompt format. Its digest is part of the fingerprint (the Megatron stack underneath is not:
# a change there that moves the numbers needs `make warmup-base` by hand).
WARMUP_SOURCES = ("warmup.py", "data/synthetic.py", "data/chat.py")
# The reference workload a run is timed against: the warm-up's first steps, the same work on every machine.
REFERENCE_STEPS = 20


@dataclasses.dataclass
class WarmupBase:
    """The base a run starts from: its weights, its record (warmup.json) and whether this run trained it."""

    weights: Path
    record: dict
    trained_here: bool


def source_digest() -> str:
    """SHA-256 over WARMUP_SOURCES (names and bytes)."""
    root = Path(__file__).parent
    digest = hashlib.sha256()
    for name in WARMUP_SOURCES:
        digest.update(name.encode() + b"\0" + (root / name).read_bytes() + b"\0")
    return digest.hexdigest()


def prompt_budgets(warmup: WarmupConfig, algo: AlgoConfig) -> list[int]:
    """The budgets the warm-up's budget prompts draw from: warmup.prompt_budgets, else algo.budgets."""
    return list(warmup.prompt_budgets or algo.budgets)


def warmup_dir(warmup: WarmupConfig, checkpoint_dir: str) -> Path:
    return Path(warmup.dir or Path(checkpoint_dir) / "warmup")


def fingerprint(warmup: WarmupConfig, model: ModelConfig, data: DataConfig, algo: AlgoConfig,
                micro_batch_tokens: int) -> dict:
    """Everything the warm-up weights depend on (not the RL settings, which may differ between runs)."""
    # prompt_budgets enters resolved, as "budgets"; dir is where, not what.
    fields = {k: v for k, v in dataclasses.asdict(warmup).items() if k not in ("dir", "prompt_budgets", "prebuilt")}
    summaries = algo.name == "anytime"
    if not summaries:  # the anytime-only field leaves the other recipes' fingerprints as they were
        fields.pop("summary_cut_fraction")
    return {**({"forced_summaries": True} if summaries else {}),"model": dataclasses.asdict(model), "warmup": fields,
            "levels": list(data.synthetic_levels), "budgets": prompt_budgets(warmup, algo),
            "budget_template": algo.budget_template, "think_open": algo.think_open,
            "think_close": algo.think_close, "prompt_template": data.prompt_template,
            "micro_batch_tokens": micro_batch_tokens, "task_version": TASK_VERSION, "code": source_digest()}


def fingerprint_difference(found: dict, expected: dict) -> list[str]:
    """The fields (dotted, one level into dicts) in which two fingerprints differ."""
    keys = []
    for key in sorted(set(found) | set(expected)):
        a, b = found.get(key), expected.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += [f"{key}.{k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        elif a != b:
            keys.append(key)
    return keys


def read_record(directory: Path) -> dict | None:
    """A finished warm-up's record (warmup.json), or None where there is no complete one."""
    path = directory / FINGERPRINT_FILE
    if not path.is_file() or not (directory / "weights").is_dir():
        return None
    return json.loads(path.read_text())


def warmup_sequences(prompts: PromptBuilder, rng: random.Random, count: int, warmup: WarmupConfig,
                     data: DataConfig, algo: AlgoConfig) -> list[PolicySequence]:
    """`count` supervised sequences: prompt (natural, or with a random budget prefix) + styled response + eos."""
    budgets = prompt_budgets(warmup, algo)
    tokenizer = prompts.tokenizer
    sequences = []
    for _ in range(count):
        problem = make_problem(rng, rng.choice(data.synthetic_levels))
        budget = rng.choice(budgets) if budgets and rng.random() < warmup.budget_prompt_fraction else None
        prompt_ids = prompts.ids(problem.text, NATURAL if budget is None else budget_mode(budget))
        # Natural mode: the model opens its thinking block itself.
        response = response_text(problem, style_mix_sample(rng, warmup.style_mix), rng=rng,
                                 error_rate=warmup.error_rate, think_open=algo.think_open if budget is None else "",
                                 think_close=algo.think_close)
        if algo.name == "anytime":
            sequences.append(summary_sequence(tokenizer, rng, prompt_ids, response, problem.answer,
                                              cut_fraction=warmup.summary_cut_fraction))
            continue
        response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        sequences.append(PolicySequence(tokens=prompt_ids + response_ids, prompt_length=len(prompt_ids)))
    return sequences


def chain_scores(policy: MegatronPolicy, prompts: PromptBuilder, problems: list[Problem], mode: str, algo: AlgoConfig,
                 *, temperature: float = 1.0) -> dict[int, dict[str, float]]:
    """Teacher-forced scores of the correct unchecked chain of each problem ("3+b5=8;8+c2=0;</think>\\boxed{0}")
    under `mode`'s prompt, per level: "slip_rate", the chance of sampling a wrong digit after "=" given a
    correct chain so far (1 - mean p(right digit)), and "chain_logp", the chain's mean log-probability per
    token. A base that learned the additions slips at about warmup.error_rate. Collective (a forward pass)."""
    tokenizer = prompts.tokenizer
    equals = tokenizer.convert_tokens_to_ids("=")
    sequences = []
    for problem in problems:
        text = response_text(problem, "steps", think_open=algo.think_open if mode == NATURAL else "",
                             think_close=algo.think_close)
        prompt = prompts.ids(problem.text, mode)
        response = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        sequences.append(PolicySequence(tokens=prompt + response, prompt_length=len(prompt)))
    cells: dict[int, dict[str, list[float]]] = {}
    for problem, seq, logp in zip(problems, sequences, policy.logprobs(sequences, temperature=temperature)):
        response = seq.tokens[seq.prompt_length:]
        cell = cells.setdefault(problem.level, {"right": [], "logp": []})
        cell["right"] += [logp[i + 1].exp().item() for i, token in enumerate(response[:-1]) if token == equals]
        cell["logp"].append(logp.mean().item())
    return {level: {"slip_rate": 1 - sum(c["right"]) / len(c["right"]), "chain_logp": sum(c["logp"]) / len(c["logp"])}
            for level, c in sorted(cells.items())}


def summary_sequence(tokenizer: PreTrainedTokenizerBase, rng: random.Random, prompt_ids: list[int], response: str,
                     answer: str, *, cut_fraction: float) -> PolicySequence:
    """A warm-up example in AnytimeReasoner's format: thinking (up to and including `</think>`), the forced
    insert, the boxed answer and eos. With probability cut_fraction the thinking stops after a random number
    of its tokens and the truncation insert closes it, as a forced summary's prompt does (docs/anytime.md);
    the answer is then the problem's, so the model learns to finish from what it has computed (a whole chain
    keeps its own answer, errors included). The
    inserted tokens are context (not trained), as in the RL loss."""
    from megatron_hbpo.algo import anytime

    close = response.index("</think>") + len("</think>")
    thinking = tokenizer(response[:close], add_special_tokens=False)["input_ids"]
    truncation, final_answer = anytime.summary_insert_ids(tokenizer)
    inserted = list(final_answer)
    answer_text = response[close:]  # the chain's own "\\boxed{d}": an unchecked error carries into it
    if rng.random() < cut_fraction and len(thinking) > 1:
        thinking = thinking[:rng.randrange(1, len(thinking))]
        inserted = [*truncation, *final_answer]
        answer_text = f"\\boxed{{{answer}}}"
    summary = tokenizer(answer_text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    response_ids = [*thinking, *inserted, *summary]
    trainable = torch.tensor([True] * len(thinking) + [False] * len(inserted) + [True] * len(summary))
    return PolicySequence(tokens=prompt_ids + response_ids, prompt_length=len(prompt_ids), trainable=trainable)


def finished_base(warmup: WarmupConfig, model: ModelConfig, data: DataConfig, algo: AlgoConfig,
                  micro_batch_tokens: int, checkpoint_dir: str) -> Path | None:
    """The weights a run of this recipe would start from without training: the matching prebuilt base, else a
    matching finished warm-up in warmup.dir; None if neither."""
    expected = fingerprint(warmup, model, data, algo, micro_batch_tokens)
    for directory in ([Path(warmup.prebuilt)] if warmup.prebuilt else []) + [warmup_dir(warmup, checkpoint_dir)]:
        found = read_record(directory)
        if found is not None and found.get("fingerprint") == expected:
            return directory / "weights"
    return None


def run_warmup(warmup: WarmupConfig, *, model: ModelConfig, parallel: ParallelConfig, optimizer: OptimizerConfig,
               data: DataConfig, algo: AlgoConfig, micro_batch_tokens: int, checkpoint_dir: str,
               hf_config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase,
               log: Callable[[str], None] = print) -> WarmupBase:
    """Train the base (or use a matching prebuilt or earlier warm-up) and return it.

    Collective: every rank calls it. Requires `megatron.parallel.initialize`. `optimizer` is the
    recipe's: the warm-up keeps its Adam settings and replaces the schedule with its own (cosine).
    """
    from megatron_hbpo.megatron.checkpoint import save_weights

    w = warmup
    out = warmup_dir(w, checkpoint_dir)
    weights = out / "weights"
    expected = fingerprint(w, model, data, algo, micro_batch_tokens)
    if w.prebuilt:
        prebuilt = Path(w.prebuilt)
        found = read_record(prebuilt)
        if found is not None and found.get("fingerprint") == expected:
            log(f"warm-up: using the prebuilt base {prebuilt} ({found.get('steps')} steps, final loss "
                f"{found.get('final_loss'):.4f}; warmup.prebuilt=null trains it here instead)")
            return WarmupBase(prebuilt / "weights", found, trained_here=False)
        differ = fingerprint_difference(found.get("fingerprint", {}), expected) if found is not None else []
        why = f"was made by other settings or code ({', '.join(differ)} differ)" if differ else "is missing"
        # A recipe's own warm-up settings are a choice; a missing or outdated shipped base is to be rebuilt.
        hint = " (`make warmup-base` rebuilds the shipped one)" if not differ or "code" in differ else ""
        log(f"warm-up: the prebuilt base {prebuilt} {why}; training this recipe's own in {out}{hint}")
    found = read_record(out)
    if found is not None:
        if found.get("fingerprint") == expected:
            log(f"warm-up: reusing {weights} ({found.get('steps')} steps, final loss {found.get('final_loss'):.4f})")
            return WarmupBase(weights, found, trained_here=False)
        raise FileExistsError(f"{out} holds a warm-up made with other settings or code ("
                              + ", ".join(fingerprint_difference(found.get("fingerprint", {}), expected))
                              + " differ); delete it or set warmup.dir to another directory")
    if dist.get_rank() == 0 and weights.exists():  # left by a run killed before it wrote the fingerprint
        import shutil

        shutil.rmtree(weights)
    dist.barrier()
    policy, prompts = _warmup_policy(w, model=model, parallel=parallel, optimizer=optimizer, data=data, algo=algo,
                                     micro_batch_tokens=micro_batch_tokens, hf_config=hf_config, tokenizer=tokenizer)
    final_loss, tokens, seconds, reference = _train(policy, prompts, w, data, algo, w.steps, log)
    # Did the base learn the additions? Its first results should be wrong about as often as the data's
    # (error_rate); a base stuck on the modular-addition plateau slips far more, and RL then starts from a
    # model that cannot add (README, "The embedded default").
    check_rng = random.Random(f"{w.seed}:check")
    problems = [make_problem(check_rng, level) for level in data.synthetic_levels for _ in range(32)]
    scores = chain_scores(policy, prompts, problems, NATURAL, algo)
    slip = sum(c["slip_rate"] for c in scores.values()) / len(scores)
    log(f"warm-up: the base's slip rate on the additions is {100 * slip:.1f}% (the data's: {100 * w.error_rate:.0f}%)"
        + ("" if slip <= 2 * w.error_rate + 0.05 else "; it has not learned to add (the loss plateau before the "
           "additions are learned), so RL starts from a model that guesses: raise warmup.steps or weight_decay"))
    out.mkdir(parents=True, exist_ok=True)
    save_weights(policy.model[0], weights)
    # tokens_per_s: the machine's speed on a fixed workload, the reference a run's time is read against;
    # reference_tokens_per_s: the same over the first REFERENCE_STEPS steps, which a run that reuses the base
    # measures again (reference_speed) to compare machines.
    record = {"fingerprint": expected, "steps": w.steps, "final_loss": final_loss, "seconds": seconds,
              "tokens_per_s": tokens / seconds, "reference_tokens_per_s": reference, "slip_rate": slip}
    if dist.get_rank() == 0:
        atomic.write_json(out / FINGERPRINT_FILE, record)
    dist.barrier()
    del policy
    return WarmupBase(weights, record, trained_here=True)


def reference_speed(warmup: WarmupConfig, *, model: ModelConfig, parallel: ParallelConfig,
                    optimizer: OptimizerConfig, data: DataConfig, algo: AlgoConfig, micro_batch_tokens: int,
                    hf_config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase) -> float:
    """The reference workload of a run that did not train its base: the warm-up's first REFERENCE_STEPS steps on
    a throwaway model, in response tokens/s (a few seconds on the tiny model). Collective."""
    policy, prompts = _warmup_policy(warmup, model=model, parallel=parallel, optimizer=optimizer, data=data,
                                     algo=algo, micro_batch_tokens=micro_batch_tokens, hf_config=hf_config,
                                     tokenizer=tokenizer)
    _, _, _, reference = _train(policy, prompts, warmup, data, algo, min(REFERENCE_STEPS, warmup.steps), None)
    del policy
    return reference


def _warmup_policy(w: WarmupConfig, *, model: ModelConfig, parallel: ParallelConfig, optimizer: OptimizerConfig,
                   data: DataConfig, algo: AlgoConfig, micro_batch_tokens: int, hf_config: PretrainedConfig,
                   tokenizer: PreTrainedTokenizerBase) -> tuple[MegatronPolicy, PromptBuilder]:
    from megatron_hbpo.megatron.parallel import seed_model_init
    from megatron_hbpo.megatron.train_step import MegatronPolicy

    seed_model_init(w.init_seed)
    warm_optimizer = dataclasses.replace(optimizer, lr=w.lr, min_lr=w.min_lr, lr_schedule="cosine",
                                         lr_warmup_steps=min(50, w.steps // 10), weight_decay=w.weight_decay)
    policy = MegatronPolicy(hf_config, model, parallel, warm_optimizer, micro_batch_tokens=micro_batch_tokens,
                            optimizer_steps=w.steps)
    return policy, PromptBuilder(tokenizer, PromptFormat.of(data, algo))


def _train(policy: MegatronPolicy, prompts: PromptBuilder, w: WarmupConfig, data: DataConfig, algo: AlgoConfig,
           steps: int, log: Callable[[str], None] | None) -> tuple[float, int, float, float]:
    """Steps 1..steps of the warm-up: (final loss, response tokens, seconds, tokens/s of the first
    REFERENCE_STEPS steps)."""
    from megatron.core import parallel_state

    loss = SFTLoss()
    dp_rank = parallel_state.get_data_parallel_rank()
    per_rank = w.sequences_per_step // parallel_state.get_data_parallel_world_size()
    start, final_loss, tokens, reference = time.perf_counter(), float("nan"), 0, float("nan")
    for step in range(1, steps + 1):
        # Seeded by (seed, step, DP rank): every TP/PP rank of a DP group sees the same data.
        rng = random.Random(f"{w.seed}:{step}:{dp_rank}")
        result = policy.train_step(warmup_sequences(prompts, rng, per_rank, w, data, algo), loss)
        final_loss, tokens = result.loss, tokens + result.response_tokens
        if step == min(REFERENCE_STEPS, steps):
            reference = tokens / (time.perf_counter() - start)
        if log is not None and (step == 1 or step % max(1, w.steps // 10) == 0 or step == w.steps):
            log(f"warm-up step {step}/{w.steps}: loss {final_loss:.4f}, lr {result.lr:.2e}, "
                f"{tokens / (time.perf_counter() - start):.0f} response tok/s")
    return final_loss, tokens, time.perf_counter() - start, reference
