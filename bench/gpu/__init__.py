"""The one-call GPU suite and the sections it runs: ``gpu_suite`` (``python bench/gpu/gpu_suite.py``,
every figure the project needs from a lent GPU, in sections with time budgets), ``numerics``
(parity with timm and reduced precision on photographs), ``end_to_end`` (the compiled steps
that train.py and eval.py run, fed from the host), ``jpeg_pipeline`` (train.py and eval.py
themselves on a folder of JPEGs and on synthetic data, with their host CPU), ``flops`` (FLOPs
per image, the cards' bf16 peaks, for the MFU), ``photos`` (the photographs for the checks),
``max_batch`` (the largest training batch that fits, one fresh process per probe) and
``suite_report`` (its summary.md). These modules may import ``bench``'s shared helpers
(``timing``, ``spec``, ``jax_side``, ``timm_side``, ``report``, ``benchmark``,
``synthetic_images``) and ``tresnet_jax``, and each other.
"""
