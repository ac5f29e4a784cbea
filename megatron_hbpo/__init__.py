"""megatron-hbpo: Hierarchical Budget Policy Optimization on Megatron-Core."""

__version__ = "0.1.0"
