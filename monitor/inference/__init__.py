"""Encoder inference backends: PyTorch eager or ONNX Runtime (exported at first use, cached)."""
