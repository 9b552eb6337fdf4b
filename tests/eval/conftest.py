"""The tiny random Llama of ``tests/tiny_llama.py`` and a character tokenizer."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from tiny_llama import VOCAB, make_tiny_model


class CharTokenizer:
    """Enough of a tokenizer for the passkey prompts: one id per character."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [ord(c) % VOCAB for c in text]


@pytest.fixture(scope="session")
def tiny_model() -> Any:
    torch.set_num_threads(1)
    return make_tiny_model()


@pytest.fixture()
def tiny_ids() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (256,), generator=g)
