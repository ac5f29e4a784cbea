"""The trainer's components, one concern each; `trainer.Trainer` composes them into the loop.

    rollouts      prompts -> requests -> engine -> decode -> verify -> records, handed to the model-parallel group
    refit         policy weights -> rollout engine, and the check that the engine follows the policy
    checkpointer  when to save, keep-last pruning, resume, save on preemption and at the last step
    metrics       the pure per-step summary, and its writers (jsonl, TensorBoard, progress bar)
    evaluator     when and how the policy is evaluated during training (the evaluation stack's harness)
    preemption    SIGTERM -> save and stop at the end of the step, all ranks together
    timer         named phase timings of a step
"""
