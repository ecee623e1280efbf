"""Benchmark harness: sam2rt vs the PyTorch reference, side by side (`sam2rt bench`)."""
