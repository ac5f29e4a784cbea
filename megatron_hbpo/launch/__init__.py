"""NeMo-Run launches of the HBPO trainer: local (torchrun) and SLURM executors.

Runs where jobs are submitted (a login node or a laptop), in its own small environment
(`make launch-env`: nemo-run 0.11 needs leptonai<0.28, which clashes with vLLM's pins), so this
package imports only the config and nemo_run, never torch or Megatron.
"""
