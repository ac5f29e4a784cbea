"""Megatron-Core <-> Hugging Face parameter mapping for Qwen2 and Llama (full, unsharded tensors).

One table for both families (they share the layout; Qwen2 adds q/k/v biases). Megatron fuses
q/k/v into `linear_qkv`, grouped per query group as [q_1..q_{h/g}, k, v] x g (GQA interleaving),
and gate/up into `linear_fc1` = [gate; up]. Its vocabulary is padded (rows beyond the tokenizer's
vocab are dropped on the way to HF). With Transformer Engine layers the two RMSNorms live inside
the fused linears (`linear_qkv.layer_norm_weight`, `linear_fc1.layer_norm_weight`).
"""

from __future__ import annotations

import re
from typing import Any

import torch

_LAYER = re.compile(r"decoder\.layers\.(\d+)\.(.+)")
# Megatron per-layer suffix -> HF per-layer suffix, for the tensors that map one to one.
_DIRECT = {
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "post_attention_layernorm.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
}


def _heads(hf_config: Any) -> tuple[int, int, int]:
    heads, groups = hf_config.num_attention_heads, hf_config.num_key_value_heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
    return heads, groups, head_dim


def split_qkv(fused: torch.Tensor, hf_config: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Megatron's grouped [q.., k, v] x groups (weight [.., hidden] or bias [..]) -> HF q, k, v."""
    heads, groups, head_dim = _heads(hf_config)
    per_group = heads // groups
    grouped = fused.reshape(groups, per_group + 2, head_dim, *fused.shape[1:])
    q = grouped[:, :per_group].reshape(heads * head_dim, *fused.shape[1:])
    k = grouped[:, per_group].reshape(groups * head_dim, *fused.shape[1:])
    v = grouped[:, per_group + 1].reshape(groups * head_dim, *fused.shape[1:])
    return q, k, v


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, hf_config: Any) -> torch.Tensor:
    heads, groups, head_dim = _heads(hf_config)
    per_group = heads // groups
    rest = q.shape[1:]
    grouped = torch.cat([q.reshape(groups, per_group, head_dim, *rest), k.reshape(groups, 1, head_dim, *rest),
                         v.reshape(groups, 1, head_dim, *rest)], dim=1)
    return grouped.reshape(-1, *rest)


def megatron_to_hf(name: str, tensor: torch.Tensor, hf_config: Any) -> list[tuple[str, torch.Tensor]]:
    """HF (name, tensor) pairs for one full Megatron tensor (GPTModel names, no wrapper prefixes)."""
    vocab = hf_config.vocab_size
    if name == "embedding.word_embeddings.weight":
        return [("model.embed_tokens.weight", tensor[:vocab])]
    if name == "output_layer.weight":
        return [] if hf_config.tie_word_embeddings else [("lm_head.weight", tensor[:vocab])]
    if name == "decoder.final_layernorm.weight":
        return [("model.norm.weight", tensor)]
    match = _LAYER.fullmatch(name)
    if not match:
        raise KeyError(f"no Hugging Face name for Megatron parameter {name!r}")
    layer, suffix = match.groups()
    prefix = f"model.layers.{layer}."
    if suffix in _DIRECT:
        return [(prefix + _DIRECT[suffix], tensor)]
    if suffix in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
        kind = suffix.rsplit(".", 1)[1]
        q, k, v = split_qkv(tensor, hf_config)
        return [(f"{prefix}self_attn.{p}_proj.{kind}", t) for p, t in zip("qkv", (q, k, v))]
    if suffix == "mlp.linear_fc1.weight":
        gate, up = tensor.chunk(2, dim=0)
        return [(prefix + "mlp.gate_proj.weight", gate), (prefix + "mlp.up_proj.weight", up)]
    raise KeyError(f"no Hugging Face name for Megatron parameter {name!r}")


def hf_to_megatron(hf_state: dict[str, torch.Tensor], hf_config: Any, padded_vocab: int, *,
                   transformer_engine: bool = False) -> dict[str, torch.Tensor]:
    """A full Megatron GPTModel state (local-spec or TE names) from an HF state dict."""
    def pad_vocab(t: torch.Tensor) -> torch.Tensor:
        if t.shape[0] > padded_vocab:
            raise ValueError(f"vocabulary of {t.shape[0]} rows does not fit the padded size {padded_vocab}")
        return torch.cat([t, t.new_zeros(padded_vocab - t.shape[0], *t.shape[1:])]) if t.shape[0] < padded_vocab else t

    out = {"embedding.word_embeddings.weight": pad_vocab(hf_state["model.embed_tokens.weight"]),
           "decoder.final_layernorm.weight": hf_state["model.norm.weight"]}
    if not hf_config.tie_word_embeddings:
        out["output_layer.weight"] = pad_vocab(hf_state["lm_head.weight"])
    norms = ({"input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
              "post_attention_layernorm.weight": "mlp.linear_fc1.layer_norm_weight"} if transformer_engine else
             {"input_layernorm.weight": "input_layernorm.weight",
              "post_attention_layernorm.weight": "pre_mlp_layernorm.weight"})
    for layer in range(hf_config.num_hidden_layers):
        hf, mc = f"model.layers.{layer}.", f"decoder.layers.{layer}."
        attn = hf + "self_attn."
        out[mc + "self_attention.linear_qkv.weight"] = fuse_qkv(
            hf_state[attn + "q_proj.weight"], hf_state[attn + "k_proj.weight"], hf_state[attn + "v_proj.weight"],
            hf_config)
        if attn + "q_proj.bias" in hf_state:
            out[mc + "self_attention.linear_qkv.bias"] = fuse_qkv(
                hf_state[attn + "q_proj.bias"], hf_state[attn + "k_proj.bias"], hf_state[attn + "v_proj.bias"],
                hf_config)
        out[mc + "self_attention.linear_proj.weight"] = hf_state[attn + "o_proj.weight"]
        out[mc + "mlp.linear_fc1.weight"] = torch.cat([hf_state[hf + "mlp.gate_proj.weight"],
                                                       hf_state[hf + "mlp.up_proj.weight"]])
        out[mc + "mlp.linear_fc2.weight"] = hf_state[hf + "mlp.down_proj.weight"]
        for hf_norm, mc_norm in norms.items():
            out[mc + mc_norm] = hf_state[hf + hf_norm]
    return out
