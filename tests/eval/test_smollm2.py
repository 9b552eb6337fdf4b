"""SmolLM2-135M on a short pydoc text: the int8 and int4a targets (slow: loads the model).

Run with ``.venv/bin/python -m pytest -q -m slow tests/eval/test_smollm2.py`` (a few minutes on
one free CPU core). Short texts make PPL noisy, so this checks KL, top-1 and bits; the README's
8,192-token tables are the full measurement.
"""

from __future__ import annotations

import pytest
import torch

from kvtier.lab.eval.catalog import Catalog
from kvtier.lab.eval.harness import run_quality

pytestmark = pytest.mark.slow


def test_int8_and_int4a_meet_the_targets() -> None:
    from kvtier.lab.eval.model import default_text, load_model, tokenize

    torch.set_num_threads(1)
    model, tokenizer = load_model(torch.device("cpu"))
    text = default_text()
    ids = tokenize(tokenizer, text, 2048, 256)
    cat = Catalog()  # the tier codecs with the default configuration
    rep = run_quality(model, ids, [cat.variant("int8"), cat.variant("int4a")], progress=False)
    r = {x.name: x for x in rep.results}
    assert r["int8"].scores.kl <= 1e-4
    assert r["int8"].scores.top1 >= 0.995
    assert r["int4a"].scores.kl <= 0.002
    assert r["int4a"].scores.top1 >= 0.98
    assert 16.0 / r["int4a"].bits_per_element >= 3.5
