"""Benchmarks: mlserve against a plain FastAPI app and a naive BentoML service."""
