"""Training: the compiled step (optimizer, schedule, EMA, fp16 loss scaling: ``step``), the run in
its workdir (``run``: build, resume and checkpoints, the step loop, validation, export),
preemption by signals, and TensorBoard event files.

May import everything below it: ``model``, ``weights``, ``data``, ``runtime``, ``evaluation``,
``errors``, ``progress``.
"""
