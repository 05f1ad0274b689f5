"""SIGTERM/SIGINT become stop requests from the command line's first line on."""

import os
import signal
import threading
import time

from tresnet_jax.train.preemption import signals_for_the_main_thread


def wait_for(condition, seconds=5.0):
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


def test_a_signal_during_start_up_is_a_request_even_through_a_thread_started_at_import():
    """A thread that was running before the command line blocked the signals (libraries start
    some at import) may be the one the kernel hands a process's SIGTERM to: the handler is
    already installed, so it is a request, not the default exit."""
    before = signal.getsignal(signal.SIGTERM)
    early = threading.Event()
    older = threading.Thread(target=early.wait, daemon=True)  # started before the block: signals open
    older.start()
    with signals_for_the_main_thread() as stops:
        os.kill(os.getpid(), signal.SIGTERM)
        stops.listen()  # the training loop starts: a signal still pending is handled now
        assert wait_for(lambda: stops.received == signal.SIGTERM)
        # one is enough: the second of the same kind gets the previous handler back
        assert signal.getsignal(signal.SIGTERM) is before
    early.set()
    assert signal.getsignal(signal.SIGTERM) is before
    assert signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, [])
