"""Tiny random LLaMA models, made with transformers' own classes and save_pretrained, for tests
that need a real model folder but not a real model's quality."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_CORPUS = [
    "The quick brown fox jumps over the lazy dog. Hello, world! How are you today?",
    "You are a helpful assistant. What is the capital of France? Paris is the capital.",
    "Once upon a time there was a small model that answered every question in one line.",
    "def main():\n    print('hello')\n    return 0\n",
    "天气很好，我们去公园散步吧。你好世界！🙂🚀 Ünïcödé çafé naïve",
]


def make_tokenizer(
    folder: Path,
    vocab_size: int = 384,
    chat_template: str | None = CHATML_TEMPLATE,
    extra_special_tokens: tuple[str, ...] = (),
):
    """A byte-level BPE tokenizer (the kind Llama-3 and SmolLM use), trained on a few lines;
    `extra_special_tokens` (Llama-3's headers, say) besides ChatML's."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS + list(extra_special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS * 4, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    if chat_template is not None:
        wrapped.chat_template = chat_template
    wrapped.save_pretrained(folder)
    return wrapped


def tiny_config(**overrides: Any) -> dict[str, Any]:
    config: dict[str, Any] = dict(
        vocab_size=384,
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=2,
    )
    config.update(overrides)
    return config


def make_model(folder: Path, seed: int = 0, architecture: str = "llama", **overrides: Any):
    """Save a random model of tiny_config(**overrides) and a tokenizer into `folder`; returns the
    transformers model (fp32, eval mode) as the reference."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    config_class, model_class = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "mistral": (MistralConfig, MistralForCausalLM),
    }[architecture]
    torch.manual_seed(seed)
    model = model_class(config_class(**tiny_config(**overrides))).eval()
    # Random init leaves norms at exactly 1 and biases at 0; vary them so the test sees them.
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                parameter.add_(torch.randn_like(parameter) * 0.1)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    make_tokenizer(folder, vocab_size=model.config.vocab_size)
    return model
