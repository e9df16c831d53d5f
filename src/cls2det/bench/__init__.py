"""Benchmarks behind ``cls2det bench``: a training step per distillation variant, box crops, teacher throughput.
Each prints ratios measured in one run."""
