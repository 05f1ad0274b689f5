"""Where and how programs run: the data-parallel device mesh and multi-host start-up
(``parallel``), XLA's compiler options and precision (``xla_options``), and ``jit`` with them
(``compile``).

May import: ``tresnet_jax.errors``.
"""
