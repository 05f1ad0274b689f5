"""A run's state on disk: Orbax checkpoints in ``workdir/checkpoints``, the state a run starts
from (its last checkpoint, else fresh or fine-tuning weights) and its saves."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util

from tresnet_jax.factory import load
from tresnet_jax.model.architecture import FC_HEAD, HeadSpec, variable_shapes
from tresnet_jax.model.initialization import random_variables
from tresnet_jax.model.registry import ModelSpec
from tresnet_jax.runtime.parallel import host_copy, replicate
from tresnet_jax.train.config import TrainConfig
from tresnet_jax.train.parts import RunParts
from tresnet_jax.train.step import TrainState, create_state
from tresnet_jax.weights.heads import with_classes


def initial_variables(
    cfg: TrainConfig, model: ModelSpec, num_classes: int, head: HeadSpec = FC_HEAD
) -> tuple[dict[str, Any], str]:
    """Fresh variables with the run's ``head``, or those of ``cfg.model.init`` (a weights name,
    directory or PyTorch file of the run's architecture) with a new head when the class count or
    the head's kind or K differs (``with_classes`` says which); and a line saying which."""
    name, seed = cfg.model.name, cfg.run.seed
    if cfg.model.init is None:
        fresh = random_variables(model.arch, num_classes, seed, head)
        return fresh, f"{name} initialised from scratch (seed {seed})"
    # Refuses weights of another architecture; a PyTorch file's label kind is as declared.
    loaded = load(cfg.model.init, architecture=model.name, multi_label=cfg.model.init_multi_label)
    info = loaded.info
    if info.num_classes == num_classes and info.head.resolved(num_classes) == head:
        head = info.head  # the same head with its K left implicit (100, capped at the classes): kept
    variables, new, said = with_classes(loaded.variables, info, num_classes, seed, head)
    if new is info and info.multi_label != cfg.multi_label:  # a head kept, trained for the other kind of labels
        kind = {True: "multi-label", False: "single-label"}
        said += f" (trained {kind[info.multi_label]}; this run is {kind[cfg.multi_label]})"
    return variables, f"{name} fine-tuned from {loaded.origin}: backbone loaded, {said}"


class Checkpoints:
    """The run's checkpoints: written synchronously, the last ``keep_checkpoints`` kept."""

    def __init__(self, parts: RunParts):
        import orbax.checkpoint as ocp

        self.parts = parts
        self.directory = parts.workdir / "checkpoints"
        options = ocp.CheckpointManagerOptions(
            max_to_keep=parts.cfg.run.keep_checkpoints, create=True, enable_async_checkpointing=False
        )
        # The handler named up front: a checkpoint's tree metadata can be read before any save.
        handler = ocp.StandardCheckpointHandler()
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handler)

    def initial_state(self) -> tuple[TrainState, str]:
        """The state to start from: the last checkpoint, else fresh or fine-tuning weights; and
        a line saying which."""
        parts = self.parts
        latest = self.manager.latest_step()
        if latest is not None:
            return self.restore(latest), f"resumed from the checkpoint at step {latest}"
        variables, how = initial_variables(parts.cfg, parts.model_spec, parts.num_classes, parts.head)
        state = create_state(variables, parts.tx, parts.cfg)
        return replicate(state, parts.mesh), how

    def restore(self, step: int) -> TrainState:
        """The checkpoint of ``step``. One written before the state carried ``constants`` (an fc
        model's, which has none) restores without them."""
        import orbax.checkpoint as ocp

        abstract = self.abstract_state()
        if "constants" in self.manager.item_metadata(step).tree or abstract.constants:
            return self.manager.restore(step, args=ocp.args.StandardRestore(abstract))
        fields = {f.name: getattr(abstract, f.name) for f in dataclasses.fields(abstract) if f.name != "constants"}
        return TrainState(**self.manager.restore(step, args=ocp.args.StandardRestore(fields)))

    def abstract_state(self) -> TrainState:
        """The state's structure, shapes and shardings, to restore a checkpoint into: from the
        variables' shapes, without drawing any weights (a fresh tresnet_m's take ~0.6 s)."""
        parts = self.parts
        shapes = variable_shapes(parts.model_spec.arch, parts.num_classes, parts.head)
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
