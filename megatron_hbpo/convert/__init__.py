"""Hugging Face <-> Megatron-Core conversion: one mapping table for Qwen2 and Llama."""
