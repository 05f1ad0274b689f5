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

    With no coordinator, JAX's cluster auto-detection (SLURM, Cloud TPU, ...) is used when it
    finds a cluster; a single process needs no call at all. CPU collectives go through gloo.
    """
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if coordinator is None and num_processes is None:
        return
    if coordinator is None or num_processes is None or process_id is None:
        raise InputError("--coordinator, --num-processes and --process-id go together")
    if not 0 <= process_id < num_processes:
        raise InputError(f"--process-id must be in [0, {num_processes}), got {process_id}")
    jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)


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
    """The same value on every device of the mesh (each process passes the whole value)."""
    sharding = NamedSharding(mesh, PartitionSpec())
    return jax.tree_util.tree_map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree)


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
