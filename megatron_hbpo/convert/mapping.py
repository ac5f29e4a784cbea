"""Megatron-Core <-> Hugging Face parameter mapping for Qwen2 and Llama (full, unsharded tensors).

One table for both families (they share the layout; Qwen2 adds q/k/v biases). Megatron fuses
q/k/v into `linear_qkv`, grouped per query group as [q_1..q_{h/g}, k, v] x g (GQA interleaving),
and gate/up into `linear_fc1` = [gate; up]. Its vocabulary is padded (rows beyond the tokenizer's
vocab are dropped on the way to HF). With Transformer Engine layers the two RMSNorms live inside
the fused linears (`linear_qkv.layer_norm_weight`, `linear_fc1.layer_norm_weight`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PretrainedConfig

# The HF model types this mapping (and the Megatron model builder) supports.
SUPPORTED_MODEL_TYPES = ("llama", "qwen2")
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


def _heads(hf_config: PretrainedConfig) -> tuple[int, int, int]:
    heads, groups = hf_config.num_attention_heads, hf_config.num_key_value_heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
    return heads, groups, head_dim


def split_qkv(fused: torch.Tensor, hf_config: PretrainedConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Megatron's grouped [q.., k, v] x groups (weight [.., hidden] or bias [..]) -> HF q, k, v."""
    heads, groups, head_dim = _heads(hf_config)
    per_group = heads // groups
    grouped = fused.reshape(groups, per_group + 2, head_dim, *fused.shape[1:])
    q = grouped[:, :per_group].reshape(heads * head_dim, *fused.shape[1:])
    k = grouped[:, per_group].reshape(groups * head_dim, *fused.shape[1:])
    v = grouped[:, per_group + 1].reshape(groups * head_dim, *fused.shape[1:])
    return q, k, v


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, hf_config: PretrainedConfig) -> torch.Tensor:
    heads, groups, head_dim = _heads(hf_config)
    per_group = heads // groups
    rest = q.shape[1:]
    grouped = torch.cat([q.reshape(groups, per_group, head_dim, *rest), k.reshape(groups, 1, head_dim, *rest),
                         v.reshape(groups, 1, head_dim, *rest)], dim=1)
    return grouped.reshape(-1, *rest)


def megatron_to_hf(name: str, tensor: torch.Tensor, hf_config: PretrainedConfig) -> list[tuple[str, torch.Tensor]]:
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


def expected_hf_shapes(hf_config: PretrainedConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor an HF checkpoint of this config must hold, with its shape."""
    heads, groups, head_dim = _heads(hf_config)
    hidden, ffn, vocab = hf_config.hidden_size, hf_config.intermediate_size, hf_config.vocab_size
    qkv_bias = hf_config.model_type == "qwen2" or bool(getattr(hf_config, "attention_bias", False))
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    if not hf_config.tie_word_embeddings:
        shapes["lm_head.weight"] = (vocab, hidden)
    for layer in range(hf_config.num_hidden_layers):
        p = f"model.layers.{layer}."
        shapes.update({
            p + "self_attn.q_proj.weight": (heads * head_dim, hidden),
            p + "self_attn.k_proj.weight": (groups * head_dim, hidden),
            p + "self_attn.v_proj.weight": (groups * head_dim, hidden),
            p + "self_attn.o_proj.weight": (hidden, heads * head_dim),
            p + "mlp.gate_proj.weight": (ffn, hidden),
            p + "mlp.up_proj.weight": (ffn, hidden),
            p + "mlp.down_proj.weight": (hidden, ffn),
            p + "input_layernorm.weight": (hidden,),
            p + "post_attention_layernorm.weight": (hidden,),
        })
        if qkv_bias:
            shapes.update({p + "self_attn.q_proj.bias": (heads * head_dim,),
                           p + "self_attn.k_proj.bias": (groups * head_dim,),
                           p + "self_attn.v_proj.bias": (groups * head_dim,)})
    return shapes


def megatron_checkpoint_shapes(hf_config: PretrainedConfig, padded_vocab: int) -> dict[str, tuple[int, ...]]:
    """The model tensors of a Megatron dist checkpoint of this config, with the global shapes it stores:
    layers stacked on a leading axis, the norms under Transformer Engine names (the local layer spec
    saves under the same keys), the vocabulary padded to `padded_vocab`."""
    hf_shapes = expected_hf_shapes(hf_config)
    layers = hf_config.num_hidden_layers
    shapes: dict[str, tuple[int, ...]] = {}
    for name, tensor in hf_to_megatron_tensors(lambda n: torch.empty(hf_shapes[n], device="meta"), hf_config,
                                               padded_vocab, transformer_engine=True):
        match = _LAYER.fullmatch(name)
        if match is None:
            shapes[name] = tuple(tensor.shape)
        else:
            shapes[f"decoder.layers.{match.group(2)}"] = (layers, *tensor.shape)
    return shapes


def hf_to_megatron_tensors(get: Callable[[str], torch.Tensor], hf_config: PretrainedConfig, padded_vocab: int, *,
                           transformer_engine: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """(Megatron name, full tensor) pairs, reading HF tensors through `get` one layer at a time."""
    def pad_vocab(t: torch.Tensor) -> torch.Tensor:
        if t.shape[0] > padded_vocab:
            raise ValueError(f"vocabulary of {t.shape[0]} rows does not fit the padded size {padded_vocab}")
        return torch.cat([t, t.new_zeros(padded_vocab - t.shape[0], *t.shape[1:])]) if t.shape[0] < padded_vocab else t

    qkv_bias = hf_config.model_type == "qwen2" or bool(getattr(hf_config, "attention_bias", False))
    norms = ({"input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
              "post_attention_layernorm.weight": "mlp.linear_fc1.layer_norm_weight"} if transformer_engine else
             {"input_layernorm.weight": "input_layernorm.weight",
              "post_attention_layernorm.weight": "pre_mlp_layernorm.weight"})
    yield "embedding.word_embeddings.weight", pad_vocab(get("model.embed_tokens.weight"))
    for layer in range(hf_config.num_hidden_layers):
        hf, mc = f"model.layers.{layer}.", f"decoder.layers.{layer}."
        attn = hf + "self_attn."
        for hf_norm, mc_norm in norms.items():
            yield mc + mc_norm, get(hf + hf_norm)
        yield mc + "self_attention.linear_qkv.weight", fuse_qkv(
            get(attn + "q_proj.weight"), get(attn + "k_proj.weight"), get(attn + "v_proj.weight"), hf_config)
        if qkv_bias:
            yield mc + "self_attention.linear_qkv.bias", fuse_qkv(
                get(attn + "q_proj.bias"), get(attn + "k_proj.bias"), get(attn + "v_proj.bias"), hf_config)
        yield mc + "self_attention.linear_proj.weight", get(attn + "o_proj.weight")
        gate_up = [get(hf + "mlp.gate_proj.weight"), get(hf + "mlp.up_proj.weight")]
        yield mc + "mlp.linear_fc1.weight", torch.cat(gate_up)
        yield mc + "mlp.linear_fc2.weight", get(hf + "mlp.down_proj.weight")
    yield "decoder.final_layernorm.weight", get("model.norm.weight")
    if not hf_config.tie_word_embeddings:
        yield "output_layer.weight", pad_vocab(get("lm_head.weight"))


def hf_to_megatron(hf_state: dict[str, torch.Tensor], hf_config: PretrainedConfig, padded_vocab: int, *,
                   transformer_engine: bool = False) -> dict[str, torch.Tensor]:
    """A full Megatron GPTModel state (local-spec or TE names) from an in-memory HF state dict."""
    return dict(hf_to_megatron_tensors(hf_state.__getitem__, hf_config, padded_vocab,
                                       transformer_engine=transformer_engine))
