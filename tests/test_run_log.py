"""What train.py's log reads and when: a step's metrics are fetched from the device one step
late (the next step is already dispatched), except at a checkpoint or the end."""

from tresnet_jax.train.run_log import LaggedMetrics


def test_metrics_are_read_one_step_late_except_at_checkpoints():
    lagged = LaggedMetrics()
    logged = []
    log_every, sync_at = 2, {5, 6}  # a checkpoint at 5, the end at 6
    for step in range(1, 7):
        windows = lagged.push(step, f"m{step}", log=step % log_every == 0, sync=step in sync_at)
        logged.append((step, [[s for s, _ in window] for window in windows]))
    # the log due at step 2 is read after step 3 was dispatched, the one at 4 after 5; 5 and 6 at once
    assert logged == [(1, []), (2, []), (3, [[1, 2]]), (4, []), (5, [[3, 4], [5]]), (6, [[6]])]
