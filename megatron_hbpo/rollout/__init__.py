"""Rollout generation: the engine protocol, the vLLM engine, budgeted requests and refit."""
