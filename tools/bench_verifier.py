"""Throughput of the answer verifier's process pool on short answers, and the cost of a hang.

    python tools/bench_verifier.py [--n 4000] [--workers 2] [--timeout 2]

Prints answers/s through the pool, the same answers checked in-process on one core (no timeout,
no isolation) for the ratio, and the wall time of a batch holding one pathological answer.
"""

from __future__ import annotations

import argparse
import random
import time

from megatron_hbpo.algo.verify import AnswerVerifier, check_answer, extract_final_answer, quick_verdict


def short_answers(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """GSM8K/MATH-like short answers: integers, fractions, decimals, radicals; about half correct."""
    rng = random.Random(seed)
    golds, responses = [], []
    for _ in range(n):
        kind = rng.random()
        a, b = rng.randint(1, 999), rng.randint(2, 60)
        if kind < 0.55:
            gold, right, wrong = str(a), str(a), str(a + rng.randint(1, 9))
        elif kind < 0.8:
            gold, right, wrong = f"\\frac{{{a}}}{{{b}}}", f"\\dfrac{{{2 * a}}}{{{2 * b}}}", f"\\frac{{{a + 1}}}{{{b}}}"
        elif kind < 0.9:
            gold, right, wrong = f"{a / 4}", f"\\frac{{{a}}}{{4}}", f"{a / 4 + 0.5}"
        else:
            gold, right, wrong = f"{b}\\sqrt{{{a % 7 + 2}}}", f"\\sqrt{{{b * b * (a % 7 + 2)}}}", f"{b + 1}\\sqrt{{2}}"
        answer = right if rng.random() < 0.5 else wrong
        golds.append(gold)
        responses.append(f"<think>Let me work it out ... so the result is {answer}.</think> The answer is $\\boxed{{{answer}}}$.")
    return golds, responses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=2.0)
    args = parser.parse_args()
    golds, responses = short_answers(args.n)

    with AnswerVerifier(num_workers=args.workers, timeout_s=args.timeout) as verifier:
        verifier.check(["\\sqrt{4}"] * 8, ["2"] * 8)  # workers started and warm (numbers never reach them)
        start = time.perf_counter()
        verdicts = verifier.score(responses, golds)
        pool_s = time.perf_counter() - start
        accuracy = sum(v.correct for v in verdicts) / len(verdicts)

        batch_golds, batch_responses = short_answers(200, seed=1)
        batch_responses[100] = "<think>...</think> \\boxed{9^{9^{9^9}}}"
        start = time.perf_counter()
        verifier.score(batch_responses, batch_golds)
        hang_s = time.perf_counter() - start
        stats = dict(verifier.stats)

    sample = min(args.n, 1000)
    start = time.perf_counter()
    for gold, response in zip(golds[:sample], responses[:sample]):
        check_answer(gold, extract_final_answer(response))
    inline_rate = sample / (time.perf_counter() - start)

    answers = [extract_final_answer(r) for r in responses]
    via_sympy = sum(quick_verdict(g, a) is None for g, a in zip(golds, answers))
    rate = args.n / pool_s
    print(f"pool ({args.workers} workers): {args.n} short answers in {pool_s:.2f} s = {rate:.0f} answers/s "
          f"(accuracy of the synthetic set {accuracy:.2f}; {via_sympy} of them needed math-verify, the rest "
          "the exact fast path)")
    print(f"math-verify on every answer, in-process, one core, no timeout: {inline_rate:.0f} answers/s; "
          f"pool / that = {rate / inline_rate:.2f}")
    print(f"200 answers with one pathological (timeout {args.timeout} s): {hang_s:.2f} s; stats {stats}")


if __name__ == "__main__":
    main()
