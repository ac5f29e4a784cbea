"""The policy: a Megatron-Core GPTModel built from a Hugging Face config (Qwen2, Llama 3).

Layers come from Megatron's layer specs: Transformer Engine (optionally FP8) when CUDA and TE are
present, Megatron's local spec otherwise (CPU, CI); `attention.py` picks their core attention. The
vocabulary is padded to a multiple of `make_vocab_size_divisible_by x TP`; `logprobs.py` masks the
padding out of the log-softmax.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from megatron_hbpo.config import ConfigError, ModelConfig, ParallelConfig

if TYPE_CHECKING:
    from transformers import PretrainedConfig

_FAMILY_MODEL_TYPES = {"qwen2": "qwen2", "llama": "llama"}


def padded_vocab_size(vocab_size: int, tensor_parallel_size: int, divisible_by: int = 128) -> int:
    """The vocabulary rounded up to a multiple of `divisible_by` (and of TP if that does not divide it).

    Independent of TP whenever TP divides `divisible_by` (any power of two up to 128 by default), so
    a checkpoint written at one TP size loads at another.
    """
    multiple = math.lcm(divisible_by, tensor_parallel_size)
    return -(-vocab_size // multiple) * multiple


def rope_settings(hf_config: PretrainedConfig) -> tuple[float, dict | None]:
    """(rope theta, rope-scaling dict or None) from a transformers config of either generation."""
    params = getattr(hf_config, "rope_parameters", None) or {}
    theta = params.get("rope_theta", getattr(hf_config, "rope_theta", None))
    scaling = params if params.get("rope_type", "default") != "default" else getattr(hf_config, "rope_scaling", None)
    if scaling and scaling.get("rope_type", scaling.get("type", "default")) == "default":
        scaling = None
    return float(theta if theta is not None else 10000.0), scaling


def hf_config_from_recipe(model: ModelConfig) -> Any:
    """The transformers config the recipe's architecture fields describe (for random-init models)."""
    from transformers import LlamaConfig, Qwen2Config

    rope_parameters = {"rope_type": "default", "rope_theta": model.rope_theta}
    if model.rope_scaling:
        rope_parameters = {**model.rope_scaling, "rope_theta": model.rope_theta}
    common = dict(
        vocab_size=model.vocab_size, hidden_size=model.hidden_size, intermediate_size=model.ffn_hidden_size,
        num_hidden_layers=model.num_layers, num_attention_heads=model.num_attention_heads,
        num_key_value_heads=model.num_query_groups, max_position_embeddings=model.max_position_embeddings,
        rms_norm_eps=model.norm_epsilon, tie_word_embeddings=model.tie_word_embeddings,
        rope_parameters=rope_parameters,
        head_dim=model.kv_channels or model.hidden_size // model.num_attention_heads,
    )
    if model.family == "qwen2":
        if not model.add_qkv_bias:
            raise ConfigError("model.add_qkv_bias: Qwen2 attention has q/k/v biases; set it to true")
        return Qwen2Config(**common)
    return LlamaConfig(attention_bias=model.add_qkv_bias, mlp_bias=False, **common)


def model_config_from_hf(hf_config: PretrainedConfig, **overrides: Any) -> ModelConfig:
    """The recipe's model section that describes an HF config (e.g. for conversion tools)."""
    if hf_config.model_type not in _FAMILY_MODEL_TYPES.values():
        raise ConfigError(f"model.family: unsupported architecture {hf_config.model_type!r} "
                          f"(architectures {getattr(hf_config, 'architectures', None)}); supported: "
                          f"{sorted(_FAMILY_MODEL_TYPES.values())}")
    theta, scaling = rope_settings(hf_config)
    fields = dict(
        family=hf_config.model_type, num_layers=hf_config.num_hidden_layers, hidden_size=hf_config.hidden_size,
        ffn_hidden_size=hf_config.intermediate_size, num_attention_heads=hf_config.num_attention_heads,
        num_query_groups=hf_config.num_key_value_heads, vocab_size=hf_config.vocab_size,
        max_position_embeddings=hf_config.max_position_embeddings,
        kv_channels=getattr(hf_config, "head_dim", None), rope_theta=theta,
        rope_scaling={k: v for k, v in scaling.items() if k != "rope_theta"} if scaling else None,
        norm_epsilon=hf_config.rms_norm_eps, tie_word_embeddings=bool(hf_config.tie_word_embeddings),
        add_qkv_bias=hf_config.model_type == "qwen2" or bool(getattr(hf_config, "attention_bias", False)),
    )
    fields.update(overrides)
    return ModelConfig(**fields)


def check_hf_config(model: ModelConfig, hf_config: PretrainedConfig) -> None:
    """Raise ConfigError where the recipe's architecture disagrees with a checkpoint's config.json."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type != _FAMILY_MODEL_TYPES[model.family]:
        raise ConfigError(f"model.family: recipe says {model.family!r} but {model.hf_path} is {model_type!r}")
    theta, scaling = rope_settings(hf_config)
    expected = {
        "num_layers": hf_config.num_hidden_layers, "hidden_size": hf_config.hidden_size,
        "ffn_hidden_size": hf_config.intermediate_size, "num_attention_heads": hf_config.num_attention_heads,
        "num_query_groups": hf_config.num_key_value_heads, "vocab_size": hf_config.vocab_size,
        "rope_theta": theta, "tie_word_embeddings": bool(hf_config.tie_word_embeddings),
    }
    for name, value in expected.items():
        if getattr(model, name) != value:
            raise ConfigError(f"model.{name}: recipe says {getattr(model, name)} but {model.hf_path}/config.json "
                              f"says {value}; fix the recipe")
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    recipe_head_dim = model.kv_channels or model.hidden_size // model.num_attention_heads
    if recipe_head_dim != head_dim:
        raise ConfigError(f"model.kv_channels: the recipe's head dimension is {recipe_head_dim} but "
                          f"{model.hf_path}/config.json says {head_dim}; fix the recipe")


def _set_scaled_rope(gpt: Any, hf_config: PretrainedConfig, scaling: dict) -> None:
    """Llama-3 rope scaling with the checkpoint's own constants.

    Megatron-Core's `rope_scaling` hard-codes low/high frequency factors and the original context
    (1, 4, 8192); transformers computes the frequencies from the config, so we take them from it.
    """
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope_type = scaling.get("rope_type", scaling.get("type"))
    if rope_type != "llama3":
        raise ConfigError(f"model.rope_scaling: only llama3 rope scaling is supported, got {rope_type!r}")
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS["llama3"](hf_config, device="cpu")
    if attention_factor != 1.0:
        raise ConfigError(f"model.rope_scaling: attention scaling {attention_factor} is not supported")
    rotary = getattr(gpt, "rotary_pos_emb", None)
    if rotary is None or rotary.inv_freq.shape != inv_freq.shape:
        raise ConfigError("model.rope_scaling: the model has no rotary embedding of the expected size")
    rotary.inv_freq = inv_freq.to(dtype=rotary.inv_freq.dtype, device=rotary.inv_freq.device)


def use_transformer_engine(impl: str) -> bool:
    if impl == "local":
        return False
    available = torch.cuda.is_available()
    if available:
        try:
            import transformer_engine  # noqa: F401
        except ImportError:
            available = False
    if impl == "transformer_engine" and not available:
        raise ConfigError("model.transformer_impl: transformer_engine needs CUDA and the transformer-engine "
                          "package; use auto or local")
    return available


def transformer_config(hf_config: PretrainedConfig, model: ModelConfig, parallel: ParallelConfig, *, use_te: bool,
                       variable_seq_lengths: bool = False, initialize: bool = True, tree_rows: bool = False):
    """Megatron TransformerConfig for a Qwen2/Llama HF config and the recipe's precision/parallel knobs.
    tree_rows: rotary embeddings at per-row position ids (`PositionedRotary`), which TE's fused rope
    kernel does not take, so it is switched off."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    bf16 = model.params_dtype == "bf16"
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    qkv_bias = hf_config.model_type == "qwen2" or bool(getattr(hf_config, "attention_bias", False))
    fp8 = {}
    if model.fp8 is not None:
        fp8 = dict(fp8=model.fp8_format, fp8_recipe="delayed" if model.fp8 == "delayed" else "tensorwise",
                   first_last_layers_bf16=model.fp8_bf16_layers > 0,
                   num_layers_at_start_in_bf16=model.fp8_bf16_layers, num_layers_at_end_in_bf16=model.fp8_bf16_layers)
    return TransformerConfig(
        num_layers=hf_config.num_hidden_layers,
        hidden_size=hf_config.hidden_size,
        ffn_hidden_size=hf_config.intermediate_size,
        num_attention_heads=hf_config.num_attention_heads,
        num_query_groups=hf_config.num_key_value_heads,
        kv_channels=head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=hf_config.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        context_parallel_size=parallel.context_parallel_size,
        sequence_parallel=parallel.sequence_parallel,
        pipeline_dtype=torch.bfloat16 if bf16 else torch.float32,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        bf16=bf16,
        # Rollout sequences differ in length: send shapes between pipeline stages.
        variable_seq_lengths=variable_seq_lengths,
        # A MoE-only setting, but TransformerConfig rejects its default ("allgather") together with
        # variable_seq_lengths even for dense models.
        moe_token_dispatcher_type="alltoall",
        # Loss functions return (sum, token count); Megatron divides the gradients by the global count.
        calculate_per_token_loss=True,
        # The fused kernels exist only with CUDA (and the rope/layernorm ones only with TE).
        use_cpu_initialization=not torch.cuda.is_available(),
        # Random init costs minutes at 70B; skip it when every weight is about to be loaded.
        perform_initialization=initialize,
        recompute_granularity=parallel.recompute_granularity,
        **({"recompute_method": "uniform", "recompute_num_layers": 1}
           if parallel.recompute_granularity == "full" else {}),
        gradient_accumulation_fusion=use_te,
        bias_activation_fusion=use_te,
        bias_dropout_fusion=use_te,
        masked_softmax_fusion=use_te,
        apply_rope_fusion=use_te and not tree_rows,
        persist_layer_norm=use_te,
        **fp8,
    )


def build_gpt_model(hf_config: PretrainedConfig, model: ModelConfig, parallel: ParallelConfig, *,
                    pre_process: bool = True, post_process: bool = True, variable_seq_lengths: bool = False,
                    initialize: bool = True, tree_rows: bool = False) -> Any:
    """One pipeline stage of the policy (all of it when PP = 1), on the current device.

    tree_rows: the model will see packed tree rows (docs/anytime.md, "Integration"): a per-row attention
    mask, which only the sdpa and unfused backends apply (te builds its causal mask inside the kernel and
    is refused), and per-row position ids, which Megatron's GPTModel ignores for rope (it always rotates
    by 0..s-1), so the rotary embedding is wrapped to read them (`PositionedRotary`)."""
    from megatron.core.models.gpt import GPTModel

    from megatron_hbpo.megatron.attention import layer_spec, resolve_backend

    if hf_config.model_type not in _FAMILY_MODEL_TYPES.values():
        raise ConfigError(f"model.family: unsupported architecture {hf_config.model_type!r}; "
                          f"supported: {sorted(_FAMILY_MODEL_TYPES.values())}")
    use_te = use_transformer_engine(model.transformer_impl)
    if parallel.sequence_parallel and not use_te:
        raise ConfigError("parallel.sequence_parallel: Megatron's local layers do not support it; "
                          "use Transformer Engine layers (GPU) or set it to false")
    config = transformer_config(hf_config, model, parallel, use_te=use_te, variable_seq_lengths=variable_seq_lengths,
                                initialize=initialize, tree_rows=tree_rows)
    if tree_rows and resolve_backend(model.attention_backend, use_te=use_te) == "te":
        raise ConfigError("model.attention_backend: the anytime method's packed rows need a tree attention mask, "
                          "which te does not apply (causal kernels only); set model.attention_backend to sdpa "
                          "(or unfused)")
    spec = layer_spec(use_te=use_te, backend=model.attention_backend)
    theta, scaling = rope_settings(hf_config)
    gpt = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=padded_vocab_size(hf_config.vocab_size, parallel.tensor_model_parallel_size,
                                     model.make_vocab_size_divisible_by),
        max_sequence_length=hf_config.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,  # logits stay vocab-parallel; logprobs.py never gathers the vocabulary
        share_embeddings_and_output_weights=bool(hf_config.tie_word_embeddings),
        position_embedding_type="rope",
        rotary_base=theta,
    )
    if scaling is not None:
        _set_scaled_rope(gpt, hf_config, scaling)
    if tree_rows:
        use_position_ids_for_rope(gpt)
    if torch.cuda.is_available():
        gpt.cuda(torch.cuda.current_device())
    return gpt



class PositionedRotary(torch.nn.Module):
    """Megatron's rotary embedding at explicit position ids.

    GPTModel computes rope for positions 0..s-1 whatever `position_ids` it is given (they only feed a
    learned position embedding). A tree row's summaries continue from their cut, not from where they sit
    in the row, so this module rotates by the ids of the current forward (`positions`, [b, s], set by the
    pre-hook of `use_position_ids_for_rope`): it returns [s, b, 1, dim], which Megatron's unfused
    `apply_rotary_pos_emb` broadcasts over heads. For positions 0..s-1 it equals Megatron's [s, 1, 1, dim].
    """

    def __init__(self, inner: Any):
        super().__init__()
        if getattr(inner, "rotary_interleaved", False):
            raise ConfigError("model: interleaved rotary embeddings are not supported with tree rows")
        self.inner = inner
        self.positions: torch.Tensor | None = None

    def get_rotary_seq_len(self, *args: Any, **kwargs: Any) -> int:
        return self.inner.get_rotary_seq_len(*args, **kwargs)

    def forward(self, max_seq_len: int, offset: int = 0, packed_seq: bool = False, cp_group: Any = None
                ) -> torch.Tensor:
        if self.positions is None:
            return self.inner(max_seq_len, offset, packed_seq, cp_group)
        if self.positions.shape[-1] != max_seq_len or offset:
            raise ValueError(f"position ids of length {self.positions.shape[-1]} for a sequence of {max_seq_len}")
        inv_freq = self.inner.inv_freq.to(self.positions.device)
        seq = self.positions.to(inv_freq.dtype)
        factor = getattr(self.inner, "seq_len_interpolation_factor", None)
        if factor is not None:
            seq = seq * (1 / factor)
        freqs = seq.t().unsqueeze(-1) * inv_freq  # [s, b, dim / 2], as torch.outer in Megatron
        return torch.cat((freqs, freqs), dim=-1).unsqueeze(2)


def use_position_ids_for_rope(gpt: Any) -> None:
    """Make `gpt` rotate queries and keys by the position ids of each forward call (PositionedRotary)."""
    rotary = PositionedRotary(gpt.rotary_pos_emb)
    gpt.rotary_pos_emb = rotary

    def take_positions(module: Any, args: tuple, kwargs: dict) -> None:
        positions = kwargs.get("position_ids", args[1] if len(args) > 1 else None)
        rotary.positions = positions

    gpt.register_forward_pre_hook(take_positions, with_kwargs=True)
