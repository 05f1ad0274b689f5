"""A progress bar for long runs: images done, images/s, ETA, and the latest metrics."""

from __future__ import annotations

import sys


class ProgressBar:
    """``update(done, metrics)`` with the cumulative number of images; metrics may be empty."""

    def __init__(self, total: int | None, description: str, enabled: bool = True, initial: int = 0):
        self._bar = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total,
                initial=initial,
                desc=description,
                unit="img",
                unit_scale=True,
                dynamic_ncols=True,
                file=sys.stderr,
                smoothing=0.1,
            )
        self._done = initial

    def update(self, done: int, metrics: dict[str, float] | None = None) -> None:
        if self._bar is None:
            return
        self._bar.update(done - self._done)
        self._done = done
        if metrics:
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items()}, refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
