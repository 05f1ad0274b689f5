"""train.py's promises about one run done other ways: on 1 device, 2 devices or 2 processes it
ends with the same parameters; killed, or stopped by SIGTERM (on one of several processes too),
the same command resumes it exactly; resuming with other settings is refused."""

import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import train as train_cli
from tests.multihost import describe, run_processes
from tests.training_runs import assert_trees_equal, exported, metrics, tiny_args, train_command
from tresnet_jax.trainer import TrainConfig, initial_variables


def one_device_env():
    """One device a process; the run's compilation cache (conftest.py) comes with the
    environment, so the program compiled for the reference serves the resumed runs."""
    return {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}


@pytest.fixture(scope="module")
def reference_run(digits, tmp_path_factory):
    """4 steps of batch 8 in a process with one device, uninterrupted; its compiled program is
    cached for the killed and restarted runs."""
    workdir = tmp_path_factory.mktemp("reference")
    done = subprocess.run([str(a) for a in train_command(digits, workdir)], env=one_device_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return workdir


def distance_relative_to_training(got: dict, want: dict, start: dict) -> float:
    """|got - want| / |want - start|, Euclidean norms over all the arrays of the trees at once:
    how far apart two trained results are, relative to how far training moved them."""
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    got, want, start = (np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree_util.tree_leaves(tree)])
                        for tree in (got, want, start))
    return float(np.linalg.norm(got - want) / np.linalg.norm(want - start))


def test_two_devices_follow_the_same_loss_curve(digits, tmp_path, reference_run):
    """Same global batch on 1 and 2 devices: only the order of float32 additions differs (the
    gradient pmean, the BatchNorm statistics). From the same state one step of each differs by
    about 1e-6 of the update in norm (a few roundings, 6e-8, times the cancellation in the
    gradient sums), but this recipe is unstable (peak lr right after a one-step warm-up; the
    loss jumps to 11.6 at step 3) and steps 3-4 magnify any difference in the weights ~300-fold.
    The final weights then differ by up to 1.3e-4 in single elements (the small updates of the
    zero-initialised BatchNorms ending residual branches), and the in-device order does it too:
    1 device with XLA:CPU's default convolutions against 1 device with ours differ as much as
    1 against 2 or 4 devices. An element-wise tolerance is a lottery on the CPU (SIMD widths,
    kernels). Measured over those orderings: losses within 2.5e-6, the weights' distance 8e-6
    to 2.1e-4 of their training update, the BatchNorm statistics' 3e-6 to 6e-6. The bounds
    (1e-4, 1e-2, 1e-3) leave 40-180x for other CPUs, and real bugs land far beyond them: a psum
    for the pmean (gradients doubled) gives losses 1.2e-2 apart at step 2, weights 1.8 and
    statistics 0.20; per-device BatchNorm statistics 1.5e-2 at step 1, 1.1 and 0.23."""
    assert train_cli.main(tiny_args(digits, tmp_path, "--num-devices", 2, "--no-compilation-cache")) == 0
    one, two = metrics(reference_run), metrics(tmp_path)
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3, 4]
    np.testing.assert_allclose([r["loss"] for r in two], [r["loss"] for r in one], rtol=1e-4)
    start, _ = initial_variables(TrainConfig(workdir=str(tmp_path)), 10)
    for collection, bound in (("params", 1e-2), ("batch_stats", 1e-3)):
        distance = distance_relative_to_training(
            exported(tmp_path)[collection], exported(reference_run)[collection], start[collection]
        )
        assert distance < bound, (collection, distance)


def test_two_processes_stop_together_on_one_s_sigterm_and_end_with_the_parameters_of_one(
    digits, tmp_path, reference_run
):
    """Multi-host for real: 2 processes on localhost joined by jax.distributed (gloo CPU
    collectives), one device each, the global batch split between them. SIGTERM reaches process
    1 alone, before its first step (a scheduler preempting one host): both stop after the same
    step, write that step's checkpoint together and exit 143; the same command on both resumes
    and ends with the parameters of one process, compared as 1 and 2 devices are, for the same
    reasons (only the order of additions differs)."""
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=1", "TRESNET_JAX_COMPILATION_CACHE": "off"}

    def terminate_process_1(processes):
        def when_configured():  # process 0 writes config.json inside the run, before compiling
            deadline = time.monotonic() + 300
            while not (tmp_path / "config.json").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            processes[1].send_signal(signal.SIGTERM)

        threading.Thread(target=when_configured, daemon=True).start()

    command = train_command(digits, tmp_path)
    stopped = run_processes(command, 2, env=env, timeout=420, on_start=terminate_process_1, exit_codes=(0, 143))
    assert [r.returncode for r in stopped] == [128 + signal.SIGTERM] * 2, describe(stopped)
    said = re.search(r"stopped by SIGTERM at step (\d+) of 4: checkpoint (\S+);", stopped[0].stdout)
    assert said, describe(stopped)
    step = int(said.group(1))
    assert 1 <= step < 4, describe(stopped)
    assert (tmp_path / "checkpoints" / str(step)).exists()
    assert not (tmp_path / "export").exists()
    resumed = run_processes(command, 2, env=env, timeout=420)
    assert all(r.returncode == 0 for r in resumed), describe(resumed)
    assert f"resumed from the checkpoint at step {step}" in resumed[0].stdout
    np.testing.assert_allclose(
        [r["loss"] for r in metrics(tmp_path)], [r["loss"] for r in metrics(reference_run)], rtol=1e-4
    )
    start, _ = initial_variables(TrainConfig(workdir=str(tmp_path)), 10)
    for collection, bound in (("params", 1e-2), ("batch_stats", 1e-3)):  # why: the test above
        distance = distance_relative_to_training(
            exported(tmp_path)[collection], exported(reference_run)[collection], start[collection]
        )
        assert distance < bound, (collection, distance)


def test_killed_and_restarted_run_ends_exactly_like_an_uninterrupted_one(digits, tmp_path, reference_run):
    """SIGKILL right after the step-2 checkpoint, then the same command again: bit-identical
    weights to the uninterrupted run in the same conditions (one device, same program)."""
    env = one_device_env()
    command = [str(a) for a in train_command(digits, tmp_path)]
    run = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not (tmp_path / "checkpoints" / "2").exists() and run.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    run.send_signal(signal.SIGKILL)
    output = run.communicate()[0]
    assert (tmp_path / "checkpoints" / "2").exists(), output
    assert not (tmp_path / "export").exists(), "the run finished before it could be killed"
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "resumed from the checkpoint at step 2" in again.stdout
    for name in ("export", "export_ema"):
        assert_trees_equal(exported(tmp_path, name), exported(reference_run, name))
    assert [r["step"] for r in metrics(tmp_path)] == [1, 2, 3, 4]
    assert [r["loss"] for r in metrics(tmp_path)] == [r["loss"] for r in metrics(reference_run)]


def test_sigterm_checkpoints_the_current_step_and_the_same_command_resumes_bit_equal(
    digits, tmp_path, reference_run
):
    """SIGTERM as soon as training starts (a spot machine reclaimed): the run stops after the
    step in flight, between scheduled checkpoints, writes that step's checkpoint and says so;
    the same command then ends with the uninterrupted run's weights, bit for bit."""
    env = one_device_env()
    command = [str(a) for a in train_command(digits, tmp_path)]
    run = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in run.stdout:
        lines.append(line)
        if line.startswith("compiled the training step"):
            run.send_signal(signal.SIGTERM)
            break
    output = "".join(lines) + run.communicate(timeout=120)[0]
    assert run.returncode == 128 + signal.SIGTERM, output
    stopped = re.search(r"stopped by SIGTERM at step (\d+) of 4: checkpoint (\S+); the same command continues", output)
    assert stopped, output
    step = int(stopped.group(1))
    assert 1 <= step < 4, output
    assert Path(stopped.group(2)) == tmp_path / "checkpoints" / str(step)
    assert (tmp_path / "checkpoints" / str(step)).exists()
    assert not (tmp_path / "export").exists()
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"resumed from the checkpoint at step {step}" in again.stdout
    for name in ("export", "export_ema"):
        assert_trees_equal(exported(tmp_path, name), exported(reference_run, name))
    assert [r["loss"] for r in metrics(tmp_path)] == [r["loss"] for r in metrics(reference_run)]


def test_resuming_with_other_settings_is_refused(digits, reference_run, capsys):
    code = train_cli.main(tiny_args(digits, reference_run, "--lr", "0.1", "--no-compilation-cache"))
    assert code == 1
    assert "holds a run with other settings (lr 0.05 -> 0.1); use a new --workdir" in capsys.readouterr().err
