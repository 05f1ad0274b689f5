"""Data parallelism, pmap-style: a one-axis mesh over every device of every process, per-device
programs written with ``jax.shard_map`` under ``jax.jit`` (what ``jax.pmap`` lowers to since
JAX 0.10), batches split along that axis, one process per host."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tresnet_jax.errors import InputError

BATCH_AXIS = "batch"


# Launchers that start one process per task, and the variable that says how many they started
# to work together. JAX's cluster detection (jax.distributed.initialize() without arguments)
# reads the coordinator and this process's index from the others. The step's count, not the
# allocation's: a batch script of an allocation of several tasks runs once, outside srun.
LAUNCHERS = (("SLURM (srun)", "SLURM_STEP_NUM_TASKS"), ("Open MPI (mpirun)", "OMPI_COMM_WORLD_SIZE"))


def launched_by() -> tuple[str, int] | None:
    """(launcher, processes) when a cluster launcher started this process as one of several."""
    for name, variable in LAUNCHERS:
        value = os.environ.get(variable, "")
        if value.isdigit() and int(value) > 1:
            return name, int(value)
    return None


def initialize_distributed(coordinator: str | None, num_processes: int | None, process_id: int | None) -> str | None:
    """Join a multi-host job through ``jax.distributed`` (one process per host), and return a
    line saying which (None: a single process).

    The three flags name the job; without them, a process started by srun or mpirun as one of
    several joins its launcher's job through JAX's cluster detection; ``--num-processes 1``
    alone keeps it single. CPU collectives go through gloo.
    """
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if coordinator is None and process_id is None and num_processes in (None, 1):
        launcher = launched_by() if num_processes is None else None
        return None if launcher is None else _join_launched_job(*launcher)
    if coordinator is None or num_processes is None or process_id is None:
        raise InputError("--coordinator, --num-processes and --process-id go together")
    if not 0 <= process_id < num_processes:
        raise InputError(f"--process-id must be in [0, {num_processes}), got {process_id}")
    _without_preemption_service()
    jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)
    return f"joined a job of {num_processes} processes at {coordinator} as process {process_id}"


def _join_launched_job(launcher: str, processes: int) -> str:
    _without_preemption_service()
    try:
        jax.distributed.initialize()
    except (ValueError, RuntimeError) as err:
        raise InputError(
            f"{launcher} started {processes} processes, but JAX could not join them from the environment "
            f"({str(err).splitlines()[0]}); pass --coordinator, --num-processes and --process-id, or "
            "--num-processes 1 to run alone"
        ) from None
    if jax.process_count() != processes:
        raise InputError(f"{launcher} started {processes} processes, JAX's job has {jax.process_count()}")
    return f"joined the {launcher} job of {processes} processes as process {jax.process_index()}"


def _without_preemption_service() -> None:
    """train.py's own SIGTERM handling (preemption.py) agrees on a step across processes; JAX's
    preemption service would replace its handler with one that only tells the coordinator."""
    jax.config.update("jax_enable_preemption_service", False)


def select_devices(per_process: int | None) -> list[jax.Device]:
    """All devices, or the first ``per_process`` devices of every process."""
    devices = jax.devices()
    if per_process is None:
        return devices
    local = len(jax.local_devices())
    if not 0 < per_process <= local:
        raise InputError(f"--num-devices must be in [1, {local}] (devices per process), got {per_process}")
    taken: dict[int, int] = {}
    chosen = []
    for device in devices:
        if taken.get(device.process_index, 0) < per_process:
            taken[device.process_index] = taken.get(device.process_index, 0) + 1
            chosen.append(device)
    return chosen


def first_gpu_index() -> int:
    """The CUDA index of this process's first device (where its JPEGs are decoded), 0 off GPUs."""
    return jax.local_devices()[0].local_hardware_id or 0


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with one ``batch`` axis over ``devices`` (default: all devices of all processes)."""
    return Mesh(np.asarray(jax.devices() if devices is None else devices), (BATCH_AXIS,))


def local_batch_size(global_batch: int, mesh: Mesh) -> int:
    """This process's share of a global batch; the batch must split evenly over the devices."""
    devices = mesh.devices.size
    if global_batch <= 0 or global_batch % devices:
        raise InputError(
            f"batch size {global_batch} does not split over {devices} devices: use a positive multiple of {devices}"
        )
    return global_batch // jax.process_count()


def replicate(tree: Any, mesh: Mesh) -> Any:
    """The same value on every device of the mesh (each process passes the whole value);
    arrays already replicated over the mesh are not copied again."""
    sharding = NamedSharding(mesh, PartitionSpec())

    def put(x):
        if sharding.is_fully_addressable:
            # The mesh in the array's type too, as a jitted step's outputs have it: on a
            # one-device mesh an array merely on the right device (or one made by
            # make_array_from_process_local_data) lacks it, and a step fed first such arrays,
            # then its own outputs, is traced and compiled twice.
            return jax.device_put(x, sharding)
        if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(sharding, x.ndim):
            return x
        return jax.make_array_from_process_local_data(sharding, host_copy(x))

    return jax.tree_util.tree_map(put, tree)


def host_copy(x: Any) -> np.ndarray:
    """A numpy copy of a value that every process holds whole (a replicated array, or host data)."""
    return np.asarray(x.addressable_data(0) if isinstance(x, jax.Array) else x)


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """A global batch from this process's rows: split along the mesh's batch axis."""
    sharding = NamedSharding(mesh, PartitionSpec(BATCH_AXIS))
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def local_rows(array: jax.Array) -> np.ndarray:
    """This process's rows of a batch-sharded array, in the order it passed them in."""
    shards = sorted(array.addressable_shards, key=lambda s: s.index[0].start or 0)
    return np.concatenate([np.asarray(s.data) for s in shards])


def prefetch_to_devices(batches: Iterable[dict[str, np.ndarray]], mesh: Mesh, depth: int = 2) -> Iterator[Any]:
    """Yield (host batch, device batch) with the next ``depth`` batches already being copied to
    the devices, so transfers overlap with compute."""
    queue: list[tuple[dict[str, np.ndarray], dict[str, jax.Array]]] = []
    for batch in batches:
        queue.append((batch, shard_batch(batch, mesh)))
        if len(queue) > depth:
            yield queue.pop(0)
    yield from queue
