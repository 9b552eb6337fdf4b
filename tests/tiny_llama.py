"""A tiny random-weight Llama (the SmolLM2 family) built in code, for tests that need a model."""

from __future__ import annotations

from typing import Any

import torch

VOCAB = 96


def make_tiny_model(seed: int = 0, layers: int = 2, kv_heads: int = 2, head_dim: int = 16) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=kv_heads, head_dim=head_dim,
        max_position_embeddings=2048, tie_word_embeddings=True,
    )
    model: Any = LlamaForCausalLM(config)
    model.to(torch.float32)
    # Larger weights than the default init so the random model is not uniform and quantization
    # error shows in its outputs.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8.0)
    model.eval()
    return model
