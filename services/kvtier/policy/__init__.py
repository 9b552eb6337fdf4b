"""Live policies beyond the store's LRU/LFU fallbacks: the classic cores (ARC, S3-FIFO), the
learned predictor, and the registry that builds the configured one by name."""
