"""Throughput of the JAX TResNet against timm's PyTorch TResNet on the same device.

``bench/benchmark.py`` is the command line; the modules here are what it is made of:
``spec`` (what to measure), ``timing`` (interleaved, synchronised timing), ``jax_side`` and
``timm_side`` (one runner per framework and variant), ``max_batch`` (the largest training
batch that fits), ``report`` (environment, JSON, tables, plot) and ``xla_profile`` (where the
JAX model's time goes, from the JAX profiler).
"""
