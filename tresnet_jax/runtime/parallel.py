"""Data parallelism, pmap-style: a one-axis mesh over every device of every process, per-device
programs written with ``jax.shard_map`` under ``jax.jit`` (what ``jax.pmap`` lowers to since
JAX 0.10), batches split along that axis, one process per host."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tresnet_jax.errors import InputError

BATCH_AXIS = "batch"


def initialize_distributed(coordinator: str | None, num_processes: int | None, process_id: int | None) -> None:
    """Join a multi-host job through ``jax.distributed`` (one process per host).

    Without the three flags the run is a single process: JAX's cluster auto-detection (SLURM,
    Cloud TPU pods) is not tried, so such jobs pass them too. CPU collectives go through gloo.
    """
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if coordinator is None and num_processes is None:
        return
    if coordinator is None or num_processes is None or process_id is None:
        raise InputError("--coordinator, --num-processes and --process-id go together")
    if not 0 <= process_id < num_processes:
        raise InputError(f"--process-id must be in [0, {num_processes}), got {process_id}")
    # train.py's own SIGTERM handling (preemption.py) agrees on a step across processes; JAX's
    # preemption service would replace its handler with one that only tells the coordinator.
    jax.config.update("jax_enable_preemption_service", False)
    jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)


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
