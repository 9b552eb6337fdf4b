"""Policies beyond the store's LRU/LFU fallbacks: baselines, the learned predictor, the
policy service, and trace replay."""
