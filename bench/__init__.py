"""Throughput of the JAX TResNet against timm's PyTorch TResNet on the same device.

``bench/benchmark.py`` is the command line; the modules here are what it is made of:
``spec`` (what to measure), ``timing`` (interleaved, synchronised timing), ``jax_side`` and
``timm_side`` (one runner per framework and variant), ``gpu.max_batch`` (the largest training
batch that fits), ``report`` (environment, JSON, tables, plot) and ``xla_profile`` (where the
JAX model's time goes, from the JAX profiler). ``ml_decoder`` is a command of its own: the
ML-Decoder head's share of the training step and its inference against the official head.

``bench/gpu/gpu_suite.py`` is the one command for a lent GPU: every figure of the benchmark and
more, in sections with time budgets. Its own parts, beside it in ``bench.gpu``: ``numerics``
(parity with timm and reduced precision on photographs), ``photos`` (the photographs),
``flops`` (FLOPs per image, the cards' bf16 peaks), ``max_batch``, ``end_to_end`` (the
library's compiled evaluation and training steps fed from the host) and ``suite_report``
(summary.md); its ml_decoder section runs ``bench/ml_decoder.py``'s measurements.
"""
