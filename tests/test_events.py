"""TensorBoard scalars written without TensorFlow, read back by TensorBoard itself."""

import subprocess
import sys

from tests.blocked_imports import REPO

WRITE = """
import sys
from pathlib import Path
from tresnet_jax.train.events import ScalarWriter
writer = ScalarWriter(Path(sys.argv[1]))
writer.add(3, {"loss": 1.5, "lr": 0.125}, 100.0)
writer.add(4, {"loss": 1.25}, 101.0)
writer.close()
print("tensorflow imported:", "tensorflow" in sys.modules)
"""


def test_scalars_are_written_without_importing_tensorflow_and_tensorboard_reads_them(tmp_path):
    done = subprocess.run(
        [sys.executable, "-c", WRITE, str(tmp_path / "tb")], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "tensorflow imported: False"
    assert done.stderr == ""  # no TensorFlow/absl log lines
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["loss", "lr"]
    assert [(e.step, e.value, e.wall_time) for e in events.Scalars("loss")] == [(3, 1.5, 100.0), (4, 1.25, 101.0)]
    assert [(e.step, e.value) for e in events.Scalars("lr")] == [(3, 0.125)]
