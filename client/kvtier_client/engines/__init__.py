"""Inference-engine integrations: an engine restores a prompt's cached prefix from kvtier and
puts the pages it computed back.

- :mod:`kvtier_client.engines.layout`: the page mapping every integration shares (a model's
  per-layer KV tensors <-> kvtier pages ``[layers, tokens, kv_heads, head_dim]``), the keys a
  prompt's pages have, and the checks that refuse a page that does not fit the model.
- :mod:`kvtier_client.engines.hf`: Hugging Face transformers (a ``DynamicCache`` subclass and a
  connector for the sync and asyncio clients). Needs the ``hf`` extra (torch, transformers).

Nothing here is imported by ``import kvtier_client``: the plain client stays free of torch.
"""
