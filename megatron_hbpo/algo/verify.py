"""Answer extraction and math-equivalence checking in a pool of worker processes.

The final answer is the last `\\boxed{...}` after the last `</think>`; it is compared with the ground
truth by HF math-verify (`verify(parse(gold), parse(pred))`, gold first). math-verify parses LaTeX
into sympy (it never evaluates model output as code), but some answers make sympy compute for
minutes in C code (`9^{9^{9^9}}`) where no signal can interrupt it. So every answer is checked in a
worker process: a soft SIGALRM timer ends the ordinary slow cases inside the worker, and the parent
kills a worker whose current item runs past `timeout_s` and starts a new one. A hang or crash scores
that one item incorrect and is counted; the rest of the batch goes on. math-verify's own timeouts
use signal.alarm, which silently does nothing in threads: another reason for processes.

Written by hand because no well-kept library offers a watchdog pool with per-item deadlines:
multiprocessing.Pool and concurrent.futures cannot kill one stuck task without losing the pool.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import multiprocessing.connection
import os
import re
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

# Statuses of one checked item.
OK = "ok"  # math-verify ran; `correct` says whether the answer matches
NO_ANSWER = "no_answer"  # no `</think>` or no `\boxed{}` after it: a format error
TIMEOUT = "timeout"  # ran past timeout_s (soft timer or watchdog kill): scored incorrect
CRASH = "crash"  # the worker died on this item: scored incorrect
ERROR = "error"  # math-verify raised: scored incorrect

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*(\{)?")


def extract_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`, or `\\boxed x`) in `text`, braces balanced."""
    last = None
    for match in _BOXED.finditer(text):
        start = match.end()
        if match.group(1) is None:  # `\boxed 5`: the answer runs to the next space or `$`
            token = re.match(r"[^\s$]+", text[start:])
            if token:
                last = token.group(0)
            continue
        depth = 1
        for pos in range(start, len(text)):
            ch = text[pos]
            if ch == "{" and text[pos - 1] != "\\":
                depth += 1
            elif ch == "}" and text[pos - 1] != "\\":
                depth -= 1
                if depth == 0:
                    last = text[start:pos]
                    break
    if last is None:
        return None
    last = last.strip()
    return last or None


def extract_final_answer(response: str, *, think_close: str = "</think>") -> str | None:
    """The answer a response commits to: the last `\\boxed{}` after the last `</think>`, else None."""
    head, sep, tail = response.rpartition(think_close)
    if not sep:
        return None
    return extract_boxed(tail)


def _as_math(text: str) -> str:
    """math-verify reads a bare `3\\sqrt{13}` as 3: wrap LaTeX that is not delimited yet in `$...$`."""
    text = text.strip()
    if "$" in text.replace("\\$", "") or "\\boxed" in text or text.startswith("\\["):
        return text
    return f"${text}$"


def _normalize_text(text: str) -> str:
    text = re.sub(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}", r"\1", text)
    return re.sub(r"[\s$]", "", text).rstrip(".").lower()


_RATIONAL = re.compile(
    r"(?P<sign>[-+]?)(?:(?P<int>\d+)(?:\.(?P<dec>\d+))?|\\[dt]?frac\{(?P<num>\d+)\}\{(?P<den>\d+)\}|(?P<n2>\d+)/(?P<d2>\d+))"
)


def _as_rational(text: str) -> tuple[Fraction, bool] | None:
    """A plain number literal (`12`, `-0.75`, `\\frac{3}{4}`, `3/4`) as (value, written without a
    decimal point), else None."""
    match = _RATIONAL.fullmatch(text.strip())  # inner spaces are math-verify's to read ("1 000" is 0)
    if not match:
        return None
    if match["int"] is not None:
        value = Fraction(f"{match['int']}.{match['dec'] or 0}")
    else:
        num, den = (match["num"], match["den"]) if match["num"] is not None else (match["n2"], match["d2"])
        if int(den) == 0:
            return None
        value = Fraction(int(num), int(den))
    return (-value if match["sign"] == "-" else value), match["dec"] is None


def quick_verdict(gold: str, answer: str) -> bool | None:
    """A verdict that needs no sympy, or None: identical text, or two plain number literals.

    Only verdicts math-verify gives too: equal values are equal under any rounding, and math-verify
    compares two exact rationals (no decimal point) exactly. A decimal on either side (0.333 vs
    1/3) goes to math-verify, which rounds floats to 6 places before comparing.
    """
    if gold.strip() == answer.strip():
        return True
    g, a = _as_rational(gold), _as_rational(answer)
    if g is None or a is None:
        return None
    if g[0] == a[0]:
        return True
    if g[1] and a[1]:
        return False
    return None


def check_answer(gold: str, answer: str) -> bool:
    """math-verify equivalence of one answer, in-process and without a timeout (worker side)."""
    from math_verify import parse, verify

    logging.getLogger("math_verify").setLevel(logging.ERROR)  # it warns that we disabled its timeouts
    gold_parsed = parse(_as_math(gold), parsing_timeout=None)
    answer_parsed = parse(_as_math(answer), parsing_timeout=None)
    if not gold_parsed or not answer_parsed:
        # Nothing math-verify can read (free text): fall back to normalised string equality.
        return _normalize_text(gold) == _normalize_text(answer) != ""
    return bool(verify(gold_parsed, answer_parsed, timeout_seconds=None))


class _SoftTimeout(BaseException):
    """Not an Exception: math-verify's own `except Exception` must not swallow our deadline."""


def _raise_soft_timeout(signum, frame):  # noqa: ARG001 (signal handler signature)
    raise _SoftTimeout()


def _worker_main(read_fd: int, write_fd: int, soft_timeout_s: float) -> None:
    """Worker loop: receives chunks of (gold, answer) and answers (correct, status) item by item.

    One message per item lets the parent know which item is running (the first unanswered one)
    and lose nothing when it has to kill the worker.
    """
    # Ctrl-C and SIGTERM (SLURM preemption, `kill` of the process group) are the parent's to handle:
    # the trainer finishes its step and saves on SIGTERM, and needs its verifier meanwhile.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGALRM, _raise_soft_timeout)
    import math_verify  # noqa: F401  (imported before "ready" so that start-up never eats a deadline)

    inbox = mp.connection.Connection(read_fd, writable=False)
    outbox = mp.connection.Connection(write_fd, readable=False)
    outbox.send("ready")
    while True:
        try:
            chunk = inbox.recv()
        except EOFError:  # the parent is gone
            return
        if chunk is None:
            return
        for gold, answer in chunk:
            try:
                signal.setitimer(signal.ITIMER_REAL, soft_timeout_s)
                outcome = (check_answer(gold, answer), OK)
            except _SoftTimeout:
                outcome = (False, TIMEOUT)
            except Exception:  # noqa: BLE001  any failure of the checker scores the answer wrong
                outcome = (False, ERROR)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            outbox.send(outcome)


@dataclass
class _Worker:
    process: subprocess.Popen
    inbox: mp.connection.Connection  # parent -> worker
    outbox: mp.connection.Connection  # worker -> parent
    ready: bool = False
    inflight: deque = field(default_factory=deque)  # [(index, gold, answer)] sent, not yet answered
    item_started: float = 0.0  # when the first unanswered item started (as the parent sees it)


@dataclass
class Verdict:
    """The verdict on one response."""

    correct: bool
    format_ok: bool
    status: str
    answer: str | None


class AnswerVerifier:
    """A pool of math-verify worker processes with a per-item wall-clock deadline.

    Use as a context manager, or call close(). `stats` counts statuses over the verifier's life.
    Workers are fresh interpreters (not forks), so they never inherit the trainer's threads, CUDA
    state or its `__main__`; a replacement starts in about half a second.
    """

    def __init__(self, num_workers: int = 2, timeout_s: float = 5.0, *, max_chunk: int = 64,
                 start_timeout_s: float = 120.0):
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.timeout_s = timeout_s
        self.max_chunk = max_chunk
        self.start_timeout_s = start_timeout_s
        self.stats = {OK: 0, NO_ANSWER: 0, TIMEOUT: 0, CRASH: 0, ERROR: 0, "respawns": 0}
        self._workers = [self._start_worker() for _ in range(num_workers)]

    # -- lifecycle ---------------------------------------------------------------------------------

    def _start_worker(self) -> _Worker:
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        package_root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])))
        # The soft timer fires a little before the watchdog so that ordinary slow items end inside
        # the worker and it survives.
        code = (f"from megatron_hbpo.algo.verify import _worker_main; "
                f"_worker_main({to_child_r}, {from_child_w}, {0.9 * self.timeout_s!r})")
        process = subprocess.Popen([sys.executable, "-c", code], pass_fds=(to_child_r, from_child_w), env=env,
                                   stdin=subprocess.DEVNULL)
        os.close(to_child_r)
        os.close(from_child_w)
        return _Worker(process, mp.connection.Connection(to_child_w, readable=False),
                       mp.connection.Connection(from_child_r, writable=False))

    def _stop_worker(self, worker: _Worker) -> None:
        if worker.process.poll() is None:
            worker.process.kill()
        worker.process.wait()
        worker.inbox.close()
        worker.outbox.close()

    def close(self) -> None:
        for worker in self._workers:
            try:
                worker.inbox.send(None)
            except OSError:
                pass
        deadline = time.monotonic() + 2
        for worker in self._workers:
            try:
                worker.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            self._stop_worker(worker)
        self._workers = []

    def __enter__(self) -> AnswerVerifier:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_workers", None):
            self.close()

    def worker_pids(self) -> list[int]:
        return [w.process.pid for w in self._workers]

    # -- checking ----------------------------------------------------------------------------------

    def score(self, responses: Sequence[str], golds: Sequence[str], *, think_close: str = "</think>") -> list[Verdict]:
        """Extract each response's final answer and check it against its gold answer."""
        if len(responses) != len(golds):
            raise ValueError(f"{len(responses)} responses but {len(golds)} gold answers")
        answers = [extract_final_answer(r, think_close=think_close) for r in responses]
        to_check = [i for i, a in enumerate(answers) if a is not None]
        checked = self.check([golds[i] for i in to_check], [str(answers[i]) for i in to_check])
        verdicts = [Verdict(False, False, NO_ANSWER, None) for _ in responses]
        for i, (correct, status) in zip(to_check, checked):
            verdicts[i] = Verdict(correct, True, status, answers[i])
        self.stats[NO_ANSWER] += len(responses) - len(to_check)
        return verdicts

    def check(self, golds: Sequence[str], answers: Sequence[str]) -> list[tuple[bool, str]]:
        """(correct, status) for each (gold, extracted answer) pair, in order."""
        if len(golds) != len(answers):
            raise ValueError(f"{len(golds)} gold answers but {len(answers)} answers")
        if not self._workers:
            raise RuntimeError("AnswerVerifier is closed")
        results: list[tuple[bool, str] | None] = [None] * len(golds)
        pending: deque = deque()
        for i, (gold, answer) in enumerate(zip(golds, answers)):
            # Most RL answers are plain numbers or repeat the gold's text: no process round trip.
            quick = quick_verdict(str(gold), str(answer))
            if quick is None:
                pending.append((i, str(gold), str(answer)))
            else:
                results[i] = (quick, OK)
        remaining = len(pending)
        started = time.monotonic()
        while remaining:
            self._dispatch(pending)
            if not any(w.ready for w in self._workers) and time.monotonic() - started > self.start_timeout_s:
                raise RuntimeError(f"verifier workers did not start within {self.start_timeout_s:.0f} s")
            listening = [w.outbox for w in self._workers if w.inflight or not w.ready]
            for conn in mp.connection.wait(listening, timeout=self._time_to_next_deadline()):
                worker = next(w for w in self._workers if w.outbox is conn)
                remaining -= self._receive(worker, results, pending)
            remaining -= self._kill_overdue(results, pending)
        done = [result for result in results if result is not None]
        assert len(done) == len(results)  # the loop above ends when every item has a result
        for _, status in done:
            self.stats[status] += 1
        return done

    def _receive(self, worker: _Worker, results: list, pending: deque) -> int:
        """Read everything the worker has sent; returns how many items it finished."""
        finished = 0
        try:
            while worker.outbox.poll():
                message = worker.outbox.recv()
                if message == "ready":
                    worker.ready = True
                    continue
                index, _, _ = worker.inflight.popleft()
                results[index] = message
                worker.item_started = time.monotonic()
                finished += 1
        except (EOFError, OSError):
            if not worker.ready:
                code = worker.process.wait()
                if code < 0:  # killed from outside (OOM killer, a signal) before its first item: replace it
                    return finished + self._fail_current(worker, CRASH, results, pending)
                raise RuntimeError(
                    f"a verifier worker died while starting (exit code {code}); check that math-verify "
                    "imports in this environment"
                ) from None
            finished += self._fail_current(worker, CRASH, results, pending)
        return finished

    def _dispatch(self, pending: deque) -> None:
        for worker in self._workers:
            if not pending:
                return
            if not worker.ready or worker.inflight:
                continue
            # Small chunks while the batch is small keep all workers busy; large ones amortise IPC.
            size = max(1, min(self.max_chunk, len(pending) // (2 * len(self._workers))))
            worker.inflight = deque(pending.popleft() for _ in range(min(size, len(pending))))
            worker.item_started = time.monotonic()
            try:
                worker.inbox.send([(gold, answer) for _, gold, answer in worker.inflight])
            except OSError:  # the worker died while idle (killed from outside): nothing of it ran
                pending.extendleft(reversed(worker.inflight))
                worker.inflight = deque()
                self._stop_worker(worker)
                self.stats["respawns"] += 1
                self._workers[self._workers.index(worker)] = self._start_worker()

    def _time_to_next_deadline(self) -> float:
        deadlines = [w.item_started + self.timeout_s for w in self._workers if w.inflight]
        if not deadlines:
            return 1.0
        return max(0.0, min(deadlines) - time.monotonic()) + 1e-3

    def _kill_overdue(self, results: list, pending: deque) -> int:
        finished = 0
        for worker in list(self._workers):
            if worker.inflight and time.monotonic() - worker.item_started > self.timeout_s:
                # An answer may have arrived just now: read it before judging the worker.
                finished += self._receive(worker, results, pending)
                if worker.inflight and time.monotonic() - worker.item_started > self.timeout_s:
                    finished += self._fail_current(worker, TIMEOUT, results, pending)
        return finished

    def _fail_current(self, worker: _Worker, status: str, results: list, pending: deque) -> int:
        """Score the worker's current item as `status`, requeue the rest of its chunk, replace it."""
        finished = 0
        if worker.inflight:
            index, _, _ = worker.inflight.popleft()
            results[index] = (False, status)
            finished = 1
            pending.extendleft(reversed(worker.inflight))
        self._stop_worker(worker)
        self.stats["respawns"] += 1
        self._workers[self._workers.index(worker)] = self._start_worker()
        return finished
