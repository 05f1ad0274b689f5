"""Training: the compiled step (optimizer, schedule, EMA, fp16 loss scaling: ``step``) and a run
in its workdir, by job: the configuration and its resume check (``config``), what a run is made
of (``parts``), resume and checkpoints (``checkpoints``), the step loop (``run``) with what it
records (``run_log``), ``validation``, the ``final_weights``; preemption by
signals (``preemption``) and TensorBoard event files (``events``).

May import everything below it: ``model``, ``weights``, ``data``, ``runtime``, ``evaluation``,
``errors``, ``progress``.
"""
