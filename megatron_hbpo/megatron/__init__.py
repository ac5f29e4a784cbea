"""Everything that touches Megatron-Core: model, log-probs, training step, CPU shims."""
