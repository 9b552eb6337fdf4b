"""Operator surface: REST admin (FastAPI) and Prometheus metrics."""
