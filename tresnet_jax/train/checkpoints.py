"""A run's state on disk: Orbax checkpoints in ``workdir/checkpoints``, the state a run starts
from (its last checkpoint, else fresh or fine-tuning weights) and its saves."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util

from tresnet_jax.factory import load
from tresnet_jax.model.architecture import variable_shapes
from tresnet_jax.model.initialization import random_variables
from tresnet_jax.model.registry import ModelSpec
from tresnet_jax.runtime.parallel import host_copy, replicate
from tresnet_jax.train.config import TrainConfig
from tresnet_jax.train.parts import RunParts
from tresnet_jax.train.step import TrainState, create_state
from tresnet_jax.weights.heads import with_classes


def initial_variables(cfg: TrainConfig, model: ModelSpec, num_classes: int) -> tuple[dict[str, Any], str]:
    """Fresh variables, or those of ``cfg.model.init`` (a weights name, directory or PyTorch
    file of the run's architecture) with a new head when the class count differs; and a line
    saying which."""
    name, seed = cfg.model.name, cfg.run.seed
    if cfg.model.init is None:
        fresh = random_variables(model.arch, num_classes, seed)
        return fresh, f"{name} initialised from scratch (seed {seed})"
    loaded = load(cfg.model.init, architecture=model.name)  # refuses weights of another architecture
    variables, _, head = with_classes(loaded.variables, loaded.info, num_classes, seed)
    return variables, f"{name} fine-tuned from {loaded.origin}: backbone loaded, {head}"


class Checkpoints:
    """The run's checkpoints: written synchronously, the last ``keep_checkpoints`` kept."""

    def __init__(self, parts: RunParts):
        import orbax.checkpoint as ocp

        self.parts = parts
        self.directory = parts.workdir / "checkpoints"
        options = ocp.CheckpointManagerOptions(
            max_to_keep=parts.cfg.run.keep_checkpoints, create=True, enable_async_checkpointing=False
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def initial_state(self) -> tuple[TrainState, str]:
        """The state to start from: the last checkpoint, else fresh or fine-tuning weights; and
        a line saying which."""
        import orbax.checkpoint as ocp

        parts = self.parts
        latest = self.manager.latest_step()
        if latest is not None:
            state = self.manager.restore(latest, args=ocp.args.StandardRestore(self.abstract_state()))
            return state, f"resumed from the checkpoint at step {latest}"
        variables, how = initial_variables(parts.cfg, parts.model_spec, parts.num_classes)
        state = create_state(variables, parts.tx, parts.cfg)
        return replicate(state, parts.mesh), how

    def abstract_state(self) -> TrainState:
        """The state's structure, shapes and shardings, to restore a checkpoint into: from the
        variables' shapes, without drawing any weights (a fresh tresnet_m's take ~0.6 s)."""
        parts = self.parts
        shapes = variable_shapes(parts.model_spec.arch, parts.num_classes)
        abstract = {path: jax.ShapeDtypeStruct(shape, jnp.float32) for path, shape in shapes.items()}
        variables = traverse_util.unflatten_dict(abstract)
        state = jax.eval_shape(lambda v: create_state(v, parts.tx, parts.cfg), variables)
        sharding = jax.sharding.NamedSharding(parts.mesh, jax.sharding.PartitionSpec())
        return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state)

    def save(self, state: TrainState) -> None:
        """``state``, as the checkpoint of its step."""
        import orbax.checkpoint as ocp

        self.manager.save(int(host_copy(state.step)), args=ocp.args.StandardSave(state), force=True)

    def wait_until_finished(self) -> None:
        self.manager.wait_until_finished()
