"""Answer extraction and the math-verify worker pool: tricky answers, timeouts, crashes."""

import os
import signal
import threading
import time

import pytest

from megatron_hbpo.algo.verify import (
    CRASH,
    NO_ANSWER,
    OK,
    TIMEOUT,
    AnswerVerifier,
    check_answer,
    extract_boxed,
    extract_final_answer,
    quick_verdict,
)


@pytest.fixture(scope="module")
def verifier():
    with AnswerVerifier(num_workers=2, timeout_s=2.0) as v:
        yield v


@pytest.mark.parametrize(
    "text, want",
    [
        ("so \\boxed{42}.", "42"),
        ("\\boxed{\\frac{1}{\\sqrt{2}}}", "\\frac{1}{\\sqrt{2}}"),
        ("first \\boxed{1} then \\boxed{2}", "2"),
        ("\\boxed{\\boxed{5}}", "5"),  # nested boxes: the last one opened is the answer
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
        ("$\\boxed 7$", "7"),
        ("\\fbox{x+1}", "x+1"),
        ("\\boxed{unclosed", None),
        ("\\boxed{}", None),
        ("no box at all", None),
    ],
)
def test_extract_boxed(text, want):
    assert extract_boxed(text) == want


def test_final_answer_is_after_the_last_think_close():
    assert extract_final_answer("<think>maybe \\boxed{1}</think> so \\boxed{2}") == "2"
    assert extract_final_answer("<think>maybe \\boxed{1}</think> I am not sure.") is None
    assert extract_final_answer("<think>still thinking \\boxed{1}") is None  # truncated: format error
    assert extract_final_answer("a</think>b</think>\\boxed{3}") == "3"
    assert extract_final_answer("x[/think] \\boxed{3}", think_close="[/think]") == "3"


@pytest.mark.parametrize(
    "gold, answer, want",
    [
        ("\\frac{1}{2}", "0.5", True),  # fraction vs decimal
        ("0.5", "\\frac{1}{2}", True),
        ("\\frac{14}{3}", "\\dfrac{14}{3}", True),
        ("3\\sqrt{13}", "\\sqrt{117}", True),  # bare LaTeX gold must not be read as 3
        ("3\\sqrt{13}", "3", False),
        ("\\{1,2,3\\}", "\\{3,2,1\\}", True),  # sets are unordered
        ("(1,2)", "(2,1)", False),
        ("\\text{Monday}", "\\text{monday}", True),  # text answers
        ("\\text{(C)}", "C", True),
        ("18", "\\$18", True),
        ("1{,}000", "1000", True),
        ("x^2+2x+1", "(x+1)^2", True),
        ("204", "240", False),
        ("\\frac{1}{3}", "0.333", False),
    ],
)
def test_tricky_answers(verifier, gold, answer, want):
    [(correct, status)] = verifier.check([gold], [answer])
    assert status == OK
    assert correct is want


def test_score_sets_format_flags(verifier):
    verdicts = verifier.score(["<think>...</think> \\boxed{4}", "<think>... cut off", "</think> four"], ["4", "4", "4"])
    assert [(v.correct, v.format_ok, v.status) for v in verdicts] == [
        (True, True, OK), (False, False, NO_ANSWER), (False, False, NO_ANSWER)]


def test_pathological_answer_costs_at_most_its_timeout_and_spares_the_batch():
    with AnswerVerifier(num_workers=2, timeout_s=1.0) as v:
        v.check(["\\sqrt{4}"] * 4, ["2"] * 4)  # workers are up (plain numbers never reach them)
        golds = [str(i) for i in range(40)]
        answers = [str(i) if i % 2 == 0 else str(i + 1) for i in range(40)]
        answers[17] = "9^{9^{9^9}}"
        start = time.monotonic()
        results = v.check(golds, answers)
        elapsed = time.monotonic() - start
    assert results[17] == (False, TIMEOUT)
    assert [r[0] for i, r in enumerate(results) if i != 17] == [i % 2 == 0 for i in range(40) if i != 17]
    assert all(s == OK for i, (_, s) in enumerate(results) if i != 17)
    # One timeout (1 s) plus the other 39 answers: nowhere near the minutes sympy would take.
    assert elapsed < 1.0 + 2.0, elapsed
    assert v.stats[TIMEOUT] == 1


def test_a_hung_worker_is_killed_at_the_deadline_and_replaced():
    # A stopped process runs no signal handler: only the parent's watchdog can end its item, as with
    # a computation stuck in C code.
    with AnswerVerifier(num_workers=1, timeout_s=1.0) as v:
        v.check(["\\sqrt{4}"], ["2"])
        [pid] = v.worker_pids()
        os.kill(pid, signal.SIGSTOP)
        start = time.monotonic()
        results = v.check(["\\sqrt{4}", "\\sqrt{9}", "\\sqrt{16}"], ["2", "3", "5"])
        elapsed = time.monotonic() - start
        assert v.worker_pids() != [pid]
    assert results == [(False, TIMEOUT), (True, OK), (False, OK)]
    assert 1.0 <= elapsed < 1.0 + 3.0, elapsed
    assert v.stats["respawns"] == 1


def test_a_crashed_worker_scores_its_item_incorrect_and_the_batch_completes():
    with AnswerVerifier(num_workers=1, timeout_s=30.0) as v:
        v.check(["\\sqrt{4}"], ["2"])  # the worker is up (plain numbers never reach it)
        [pid] = v.worker_pids()
        box = {}
        runner = threading.Thread(target=lambda: box.update(r=v.check(["1", "2", "3"], ["9^{9^{9^9}}", "2", "3"])))
        start = time.monotonic()
        runner.start()
        time.sleep(0.5)
        os.kill(pid, signal.SIGKILL)
        runner.join(timeout=20)
        assert not runner.is_alive()
        assert time.monotonic() - start < 10  # far below the 30 s timeout
    assert box["r"] == [(False, CRASH), (True, OK), (True, OK)]
    assert v.stats[CRASH] == 1


def test_a_worker_killed_before_it_is_ready_is_replaced():
    with AnswerVerifier(num_workers=1, timeout_s=5.0) as v:
        [pid] = v.worker_pids()
        os.kill(pid, signal.SIGKILL)
        assert v.check(["\\sqrt{9}"], ["3"]) == [(True, OK)]
        assert v.worker_pids() != [pid]


def test_workers_ignore_sigterm_and_an_idle_worker_killed_from_outside_is_replaced():
    # SIGTERM to the whole process group (SLURM preemption) is the trainer's to handle: it still
    # needs its verifier to finish the step it saves.
    with AnswerVerifier(num_workers=1, timeout_s=5.0) as v:
        assert v.check(["\\sqrt{4}"], ["2"]) == [(True, OK)]
        [pid] = v.worker_pids()
        os.kill(pid, signal.SIGTERM)
        time.sleep(0.3)
        assert v.check(["\\sqrt{9}"], ["3"]) == [(True, OK)] and v.worker_pids() == [pid]
        os.kill(pid, signal.SIGKILL)  # dies while idle: the next batch must not hit a broken pipe
        time.sleep(0.3)
        assert v.check(["\\sqrt{16}", "1/2"], ["4", "\\frac{1}{2}"]) == [(True, OK), (True, OK)]
        assert v.worker_pids() != [pid] and v.stats["respawns"] == 1


def test_closed_verifier_and_bad_arguments():
    v = AnswerVerifier(num_workers=1, timeout_s=1.0)
    with pytest.raises(ValueError, match="gold"):
        v.check(["1"], [])
    v.close()
    with pytest.raises(RuntimeError, match="closed"):
        v.check(["1"], ["1"])
    with pytest.raises(ValueError, match="timeout_s"):
        AnswerVerifier(num_workers=1, timeout_s=0)


QUICK_PAIRS = [("72", "72"), ("72", "73"), ("0.5", "\\frac{1}{2}"), ("\\frac{3}{4}", "\\dfrac{6}{8}"), ("3/4", "0.75"),
               ("-2", "-2.0"), ("1000", "1 000"), ("12", "-12"), ("0.333", "\\frac{1}{3}"), ("0.1", "0.10000001"),
               ("2", "\\sqrt{4}"), ("\\text{yes}", "\\text{yes}")]


@pytest.mark.parametrize("gold, answer", QUICK_PAIRS)
def test_fast_path_agrees_with_math_verify(gold, answer):
    quick = quick_verdict(gold, answer)
    if quick is not None:  # where the fast path answers, it answers as math-verify does
        assert quick is check_answer(gold, answer)


def test_fast_path_covers_plain_numbers_only():
    assert quick_verdict("72", "72") is True and quick_verdict("72", "73") is False
    assert quick_verdict("0.5", "\\frac{1}{2}") is True
    assert quick_verdict("0.333", "\\frac{1}{3}") is None  # left to math-verify's rounding rules
    assert quick_verdict("2", "\\sqrt{4}") is None
    assert quick_verdict("\\frac{1}{3}", "\\frac{2}{3}") is False  # exact rationals compare exactly
    assert quick_verdict("0.5", "0.6") is None  # decimals: math-verify rounds


def test_fast_path_on_random_number_pairs_agrees_with_math_verify():
    import random

    rng = random.Random(3)
    forms = [lambda p, q: str(p), lambda p, q: f"\\frac{{{p}}}{{{q}}}", lambda p, q: f"{p}/{q}",
             lambda p, q: f"{p / q:.3f}", lambda p, q: f"-{p}"]
    decided = 0
    for _ in range(150):
        p, q = rng.randint(0, 30), rng.randint(1, 6)
        gold = rng.choice(forms)(p, q)
        answer = rng.choice(forms)(p + rng.choice([0, 0, 1]), q)
        quick = quick_verdict(gold, answer)
        if quick is not None:
            decided += 1
            assert quick is check_answer(gold, answer), (gold, answer)
    assert decided > 50
