"""train.py's promises about one run done other ways: on 1 device, 2 devices or 2 processes (joined
by flags or under srun) it ends with the same parameters; killed, or stopped by SIGTERM (on one
of several processes too), the same command resumes it exactly; resuming with other settings is
refused."""

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np
import pytest

from tests import tiny_model
from tests.blocked_imports import blocker
from tests.multihost import describe, run_processes
from tests.settings import config
from tests.tiny_model import REPO
from tests.training_runs import assert_trees_equal, final_weights, metrics, subset, tiny_args, train_command
from tresnet_jax.cli import train as train_cli
from tresnet_jax.model.registry import resolve
from tresnet_jax.train.checkpoints import initial_variables

pytestmark = [
    pytest.mark.slow,
    pytest.mark.usefixtures("tiny_model"),
]  # the runs train tresnet_tiny (tests/tiny_model.py)


@pytest.fixture(scope="module")
def data(digits, tmp_path_factory):
    """What every run of this file trains on: 3 digits of each class and a JPEG that cannot be
    decoded, 31 files, so that the 32 images of the tiny run's 4 steps read them all: the
    unreadable one is replaced (by the next readable image, with its own draws) in every run,
    whatever its devices, processes or interruptions."""
    root = tmp_path_factory.mktemp("tiny_data")
    subset(digits / "train", 3, root / "train")
    (root / "train" / "digit1" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 64)  # a header, no image
    return root


class Finished(NamedTuple):
    workdir: Path
    output: str


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """The tiny run, 4 steps of batch 8, uninterrupted, in a process with one device where
    TensorFlow cannot be imported (as on a GPU machine without it); its compiled program is
    cached for the killed and restarted runs."""
    workdir = tmp_path_factory.mktemp("reference")
    code = blocker({"tensorflow", "tensorflow_datasets"}) + train_command(data, workdir)[2]
    command = [sys.executable, "-c", code, *train_command(data, workdir)[3:]]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stdout + done.stderr
    return Finished(workdir, done.stdout)


@pytest.fixture(scope="module")
def reference_run(reference):
    return reference.workdir


def test_the_tiny_run_reads_a_folder_without_tensorflow_and_passes_over_a_corrupt_jpeg(data, reference):
    """The JPEG that cannot be decoded is named, counted and replaced; training goes on to its
    export."""
    assert f"unreadable training image {data / 'train' / 'digit1' / 'broken.jpg'}: unreadable image" in reference.output
    assert metrics(reference.workdir)[-1]["unreadable_images"] == 1
    assert (reference.workdir / "weights" / "metadata.json").exists()


def distance_relative_to_training(got: dict, want: dict, start: dict) -> float:
    """|got - want| / |want - start|, Euclidean norms over all the arrays of the trees at once:
    how far apart two trained results are, relative to how far training moved them."""
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    got, want, start = (
        np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree_util.tree_leaves(tree)])
        for tree in (got, want, start)
    )
    return float(np.linalg.norm(got - want) / np.linalg.norm(want - start))


def initial(workdir: Path) -> dict:
    """The variables the tiny run starts from."""
    return initial_variables(config(workdir=str(workdir), model=tiny_model.NAME), resolve(tiny_model.NAME), 10)[0]


def test_two_devices_follow_the_same_loss_curve(data, tmp_path, reference_run):
    """Same global batch on 1 and 2 devices: only the order of float32 additions differs (the
    gradient pmean, the BatchNorm statistics), and the recipe is unstable (peak lr right after a
    one-step warm-up; the loss rises from 2.27 to 2.67 at step 3), which magnifies any
    difference. The in-device order does it too: 1 device with XLA:CPU's default convolutions
    against 1 device with ours differs as much as 1 against 2 or 4 devices, so an element-wise
    tolerance would be a lottery on another CPU (SIMD widths, kernels). Measured for
    tresnet_tiny on this file's data, 2 and 4 devices against 1: losses within 2.1e-7
    (relative), the weights' distance 1.6e-6 to 1.9e-6 of their training update, the BatchNorm
    statistics' 1.6e-7 to 1.7e-7 (on the 1,397 digits the test trained on before: 1.2e-7,
    1.8e-6 to 2.5e-6, 1.6e-7 to 2.7e-7; tresnet_m before that: 2.5e-6, up to 2.1e-4 and 6e-6).
    The bounds (1e-4, 1e-2, 1e-3) leave 480x (losses) and 5000x (weights, statistics) for other
    CPUs and models, and real bugs land far beyond them (measured on the 1,397 digits): a psum
    for the pmean (gradients doubled) gives losses 1.4e-2 apart at step 2, weights 1.5 and
    statistics 0.06; per-device BatchNorm statistics 1e-2 at step 1, 0.8 and 0.07."""
    assert train_cli.main(tiny_args(data, tmp_path, "--num-devices", 2)) == 0
    one, two = metrics(reference_run), metrics(tmp_path)
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3, 4]
    np.testing.assert_allclose([r["loss"] for r in two], [r["loss"] for r in one], rtol=1e-4)
    start = initial(tmp_path)
    for collection, bound in (("params", 1e-2), ("batch_stats", 1e-3)):
        distance = distance_relative_to_training(
            final_weights(tmp_path)[collection], final_weights(reference_run)[collection], start[collection]
        )
        assert distance < bound, (collection, distance)


def test_two_processes_stop_together_on_one_s_sigterm_and_resume_under_srun_with_the_parameters_of_one(
    data, tmp_path, reference_run
):
    """Multi-host for real: 2 processes on localhost joined by jax.distributed (gloo CPU
    collectives), one device each, the global batch split between them. Started with the
    coordinator flags, SIGTERM reaches process 1 alone, before its first step (a scheduler
    preempting one host): both stop after the same step, write that step's checkpoint together
    and exit 143. The same command resumes it, started as srun starts processes (SLURM's
    variables, no coordinator flags: a requeued job): they find their job through JAX's cluster
    detection, say so, and end with the parameters of one process, compared as 1 and 2 devices
    are, for the same reasons (only the order of additions differs)."""
    # One device a process (the tiny run's --num-devices 1); the resumed processes read the
    # program the first ones compiled from the run's compilation cache (conftest.py).

    def terminate_process_1(processes):
        def when_configured():  # process 0 writes config.json inside the run, before compiling
            deadline = time.monotonic() + 300
            while not (tmp_path / "config.json").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            processes[1].send_signal(signal.SIGTERM)

        threading.Thread(target=when_configured, daemon=True).start()

    command = train_command(data, tmp_path)
    stopped = run_processes(command, 2, timeout=420, on_start=terminate_process_1, exit_codes=(0, 143))
    assert [r.returncode for r in stopped] == [128 + signal.SIGTERM] * 2, describe(stopped)
    said = re.search(r"stopped by SIGTERM at step (\d+) of 4: checkpoint (\S+);", stopped[0].stdout)
    assert said, describe(stopped)
    step = int(said.group(1))
    assert 1 <= step < 4, describe(stopped)
    assert (tmp_path / "checkpoints" / str(step)).exists()
    assert not (tmp_path / "weights").exists()

    port = free_port_in(SLURM_PORTS)
    slurm = {
        "SLURM_JOB_ID": str(port - SLURM_PORTS.start),  # JAX derives the coordinator's port from it
        "SLURM_STEP_NODELIST": "127.0.0.1",
        "SLURM_NTASKS": "2",
        "SLURM_STEP_NUM_TASKS": "2",
    }
    # srun gives each task its index; here the launcher appends it and the process moves it into place.
    command[2] = (
        "import os, sys\nos.environ['SLURM_PROCID'] = os.environ['SLURM_LOCALID'] = sys.argv.pop()\n" + command[2]
    )
    resumed = run_processes(command, 2, env=slurm, timeout=420, flags=lambda address, n, i: [i])
    assert [r.returncode for r in resumed] == [0, 0], describe(resumed)
    for index, run in enumerate(resumed):
        assert f"joined the SLURM (srun) job of 2 processes as process {index}" in run.stdout, describe(resumed)
    assert f"resumed from the checkpoint at step {step}" in resumed[0].stdout
    np.testing.assert_allclose(
        [r["loss"] for r in metrics(tmp_path)], [r["loss"] for r in metrics(reference_run)], rtol=1e-4
    )
    start = initial(tmp_path)
    for collection, bound in (("params", 1e-2), ("batch_stats", 1e-3)):  # why: the test above
        distance = distance_relative_to_training(
            final_weights(tmp_path)[collection], final_weights(reference_run)[collection], start[collection]
        )
        assert distance < bound, (collection, distance)


def test_killed_and_restarted_run_ends_exactly_like_an_uninterrupted_one(data, tmp_path, reference_run):
    """SIGKILL right after the step-2 checkpoint, then the same command again: bit-identical
    weights to the uninterrupted run in the same conditions (one device, same program)."""
    command = [str(a) for a in train_command(data, tmp_path)]
    run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    # Steps 3 and 4 and their checkpoint take about 0.7 s after this one appears: poll often.
    while not (tmp_path / "checkpoints" / "2").exists() and run.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    run.send_signal(signal.SIGKILL)
    output = run.communicate()[0]
    assert (tmp_path / "checkpoints" / "2").exists(), output
    assert not (tmp_path / "weights").exists(), "the run finished before it could be killed"
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "resumed from the checkpoint at step 2" in again.stdout
    for name in ("weights", "weights_ema"):
        assert_trees_equal(final_weights(tmp_path, name), final_weights(reference_run, name))
    assert [r["step"] for r in metrics(tmp_path)] == [1, 2, 3, 4]
    assert [r["loss"] for r in metrics(tmp_path)] == [r["loss"] for r in metrics(reference_run)]


def test_sigterm_checkpoints_the_current_step_and_the_same_command_resumes_bit_equal(data, tmp_path, reference_run):
    """SIGTERM once the run has said how it starts, while it compiles (a spot machine
    reclaimed): it stops after the step in flight, step 1, between scheduled checkpoints, writes
    that step's checkpoint and says so; the same command then ends with the uninterrupted run's
    weights, bit for bit. (A signal sent later would race the tiny run's 20 ms steps.)"""
    command = [str(a) for a in train_command(data, tmp_path)]
    run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in run.stdout:
        lines.append(line)
        if "initialised from scratch" in line:
            run.send_signal(signal.SIGTERM)
            break
    output = "".join(lines) + run.communicate(timeout=120)[0]
    assert run.returncode == 128 + signal.SIGTERM, output
    stopped = re.search(r"stopped by SIGTERM at step (\d+) of 4: checkpoint (\S+); the same command continues", output)
    assert stopped, output
    step = int(stopped.group(1))
    assert step == 1, output
    assert Path(stopped.group(2)) == tmp_path / "checkpoints" / str(step)
    assert (tmp_path / "checkpoints" / str(step)).exists()
    assert not (tmp_path / "weights").exists()
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"resumed from the checkpoint at step {step}" in again.stdout
    for name in ("weights", "weights_ema"):
        assert_trees_equal(final_weights(tmp_path, name), final_weights(reference_run, name))
    assert [r["loss"] for r in metrics(tmp_path)] == [r["loss"] for r in metrics(reference_run)]


def test_resuming_with_other_settings_is_refused(data, reference_run, capsys):
    code = train_cli.main(tiny_args(data, reference_run, "--lr", "0.1"))
    assert code == 1
    assert "holds a run with other settings (lr 0.05 -> 0.1); use a new --workdir" in capsys.readouterr().err


SLURM_PORTS = range(65536 - 2**12, 65536)  # where JAX's SLURM detection puts the coordinator


def free_port_in(ports: range) -> int:
    """A port of ``ports`` on 127.0.0.1 that was free a moment ago."""
    for port in np.random.default_rng().permutation(ports.stop - ports.start) + ports.start:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", int(port)))
            except OSError:
                continue
            return int(port)
    raise RuntimeError(f"no free port in {ports}")


def test_a_launcher_job_jax_cannot_join_is_one_line(tmp_path):
    """srun's count without the rest of SLURM's variables: one line naming the way out, not JAX's
    traceback or a wait for processes that never come."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_"))}
    env.update(SLURM_STEP_NUM_TASKS="2", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    command = [sys.executable, str(REPO / "eval.py"), "--synthetic-data", "4", "--batch-size", "4", "--no-progress"]
    failed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    lines = failed.stderr.strip().splitlines()
    assert len(lines) == 1, failed.stderr
    assert lines[0].startswith("error: SLURM (srun) started 2 processes, but JAX could not join them"), lines
    assert lines[0].endswith("or --num-processes 1 to run alone")
