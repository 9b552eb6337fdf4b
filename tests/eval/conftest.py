"""A tiny random-weight Llama (the SmolLM2 family) built in code, and a character tokenizer."""

from __future__ import annotations

from typing import Any

import pytest
import torch

VOCAB = 96


class CharTokenizer:
    """Enough of a tokenizer for the passkey prompts: one id per character."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [ord(c) % VOCAB for c in text]


def make_tiny_model(seed: int = 0) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
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


@pytest.fixture(scope="session")
def tiny_model() -> Any:
    torch.set_num_threads(1)
    return make_tiny_model()


@pytest.fixture()
def tiny_ids() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (256,), generator=g)
