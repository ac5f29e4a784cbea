"""Run under torchrun (1 process): the Megatron policy's log-probs against transformers in float64.

For a tiny Qwen2 and a tiny Llama-3 (rope scaling, tied embeddings) with the same weights (mapped
by megatron_hbpo.convert.mapping): response log-probs and entropies of Megatron's vocab-parallel
path equal transformers' float64 log-softmax; temperature divides the logits; the padded vocabulary
holds no probability; the HF -> Megatron -> HF mapping round-trips bit-exactly. Exits non-zero on failure.
"""

import sys

import torch
from transformers import LlamaForCausalLM, Qwen2ForCausalLM

from common import write_report

from megatron_hbpo import runtime
from megatron_hbpo.config import ModelConfig, ParallelConfig
from megatron_hbpo.convert.mapping import hf_to_megatron, megatron_to_hf
from megatron_hbpo.megatron import parallel
from megatron_hbpo.megatron.logprobs import token_logprobs
from megatron_hbpo.megatron.model import build_gpt_model, hf_config_from_recipe, padded_vocab_size

VOCAB = 100
FAMILIES = {
    "qwen2": (Qwen2ForCausalLM, dict(family="qwen2", add_qkv_bias=True, tie_word_embeddings=False, num_query_groups=2,
                                     rope_theta=1e6)),
    "llama": (LlamaForCausalLM, dict(family="llama", tie_word_embeddings=True, num_query_groups=4, rope_theta=5e5,
                                     rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 32})),
}


def main() -> int:
    runtime.configure()
    parallel.initialize(ParallelConfig(), seed=0)
    failures = []
    report: dict = {"logp": {}}
    for family, (hf_class, extra) in FAMILIES.items():
        model_cfg = ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
                                vocab_size=VOCAB, max_position_embeddings=128, params_dtype="fp32",
                                transformer_impl="local", **extra)
        hf_config = hf_config_from_recipe(model_cfg)
        gpt = build_gpt_model(hf_config, model_cfg, ParallelConfig())
        megatron_state = {k: v for k, v in gpt.state_dict().items() if not k.endswith("_extra_state")}
        hf_state = dict(pair for name, tensor in megatron_state.items() for pair in megatron_to_hf(name, tensor, hf_config))
        reference = hf_class(hf_config).double().eval()
        result = reference.load_state_dict({k: v.double() for k, v in hf_state.items()}, strict=False)
        tied = {"lm_head.weight"} if hf_config.tie_word_embeddings else set()
        if set(result.missing_keys) - tied or result.unexpected_keys:
            failures.append(f"{family}: mapping leaves {result}")
        if tied and not torch.equal(reference.lm_head.weight, reference.model.embed_tokens.weight):
            failures.append(f"{family}: tied lm_head does not share the embedding")

        # Megatron -> HF -> Megatron is exact up to the padded vocabulary rows (HF has none; they come back 0).
        back = hf_to_megatron(hf_state, hf_config, padded_vocab_size(VOCAB, 1, 128))
        def rows(name):
            return slice(0, VOCAB) if name in ("embedding.word_embeddings.weight", "output_layer.weight") else slice(None)

        if set(back) != set(megatron_state) or any(
                back[k].shape != megatron_state[k].shape or not torch.equal(back[k][rows(k)], megatron_state[k][rows(k)])
                for k in back):
            failures.append(f"{family}: Megatron -> HF -> Megatron round trip is not exact")

        g = torch.Generator().manual_seed(3)
        tokens = torch.randint(0, VOCAB, (3, 21), generator=g)
        length = tokens.shape[1]
        mask = torch.triu(torch.ones(1, 1, length, length, dtype=torch.bool), diagonal=1)
        positions = torch.arange(length).unsqueeze(0).expand_as(tokens)
        labels = torch.roll(tokens, -1, dims=1)
        with torch.no_grad():
            logits = gpt(tokens, positions, mask)
            ref_logits = reference(tokens).logits
        for temperature in (1.0, 0.7):
            logp, entropy = token_logprobs(logits.clone(), labels, vocab_size=VOCAB, temperature=temperature,
                                           with_entropy=True)
            ref_logsoftmax = torch.log_softmax(ref_logits / temperature, dim=-1)
            ref_logp = ref_logsoftmax.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
            ref_entropy = -(ref_logsoftmax.exp() * ref_logsoftmax).sum(-1)
            logp_err = float((logp.double() - ref_logp).abs().max())
            entropy_err = float((entropy.double() - ref_entropy).abs().max())
            report["logp"][f"{family} T={temperature}"] = {"logp_err": logp_err, "entropy_err": entropy_err}

        # The padded vocabulary (ids 100..127) takes no probability mass.
        every_id = torch.arange(VOCAB).repeat(3, length, 1).permute(2, 0, 1)  # [V, b, s]
        total = sum(token_logprobs(logits.clone(), every_id[v], vocab_size=VOCAB)[0].exp() for v in range(VOCAB))
        report[f"{family} probability_sum_err"] = float((total - 1).abs().max())

    # Negative control: without the Llama-3 rope scaling the model is measurably different.
    model_cfg = ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, vocab_size=VOCAB,
                            max_position_embeddings=128, params_dtype="fp32", transformer_impl="local",
                            **{**FAMILIES["llama"][1], "rope_scaling": None})
    unscaled = build_gpt_model(hf_config_from_recipe(model_cfg), model_cfg, ParallelConfig())
    unscaled.load_state_dict(gpt.state_dict())
    with torch.no_grad():
        delta = float((unscaled(tokens, positions, mask) - logits).abs().max())
    report["unscaled_rope_delta"] = delta
    report["failures"] = failures
    write_report(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
