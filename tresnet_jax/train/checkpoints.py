"""A run's state on disk: Orbax checkpoints in ``workdir/checkpoints``, the state a run starts
from (its last checkpoint, else fresh or fine-tuning weights) and its saves."""

from __future__ import annotations

from typing import Any

import jax

from tresnet_jax.errors import InputError
from tresnet_jax.model.initialization import random_variables, replace_head
from tresnet_jax.model.registry import ModelSpec
from tresnet_jax.runtime.parallel import host_copy, replicate
from tresnet_jax.train.config import TrainConfig
from tresnet_jax.train.parts import RunParts
from tresnet_jax.train.step import TrainState, create_state
from tresnet_jax.weights.factory import load_any


def initial_variables(cfg: TrainConfig, model: ModelSpec, num_classes: int) -> tuple[dict[str, Any], str]:
    """Fresh variables, or the backbone of ``cfg.init`` with its head kept when the class count
    matches and newly initialised otherwise; and a line saying which."""
    if cfg.init is None:
        fresh = random_variables(model.arch, num_classes, cfg.seed)
        return fresh, f"{cfg.model} initialised from scratch (seed {cfg.seed})"
    loaded = load_any(cfg.init, model)
    if loaded.spec.arch != model.arch:
        raise InputError(f"--init {cfg.init} holds {loaded.spec.name} weights, not {cfg.model}")
    kept = loaded.model.num_classes == num_classes
    variables = loaded.variables if kept else replace_head(loaded.variables, loaded.model.arch, num_classes, cfg.seed)
    head = "its head kept" if kept else f"a new {num_classes}-class head (it had {loaded.model.num_classes})"
    return variables, f"{cfg.model} fine-tuned from {loaded.origin}: backbone loaded, {head}"


class Checkpoints:
    """The run's checkpoints: written synchronously, the last ``keep_checkpoints`` kept."""

    def __init__(self, parts: RunParts):
        import orbax.checkpoint as ocp

        self.parts = parts
        self.directory = parts.workdir / "checkpoints"
        options = ocp.CheckpointManagerOptions(
            max_to_keep=parts.cfg.keep_checkpoints, create=True, enable_async_checkpointing=False
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def initial_state(self) -> tuple[TrainState, str]:
        """The state to start from: the last checkpoint, else fresh or fine-tuning weights; and
        a line saying which."""
        import orbax.checkpoint as ocp

        parts = self.parts
        latest = self.manager.latest_step()
        sharding = jax.sharding.NamedSharding(parts.mesh, jax.sharding.PartitionSpec())
        if latest is not None:
            abstract = jax.tree_util.tree_map(
                lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), jax.eval_shape(self.fresh_state)
            )
            state = self.manager.restore(latest, args=ocp.args.StandardRestore(abstract))
            return state, f"resumed from the checkpoint at step {latest}"
        variables, how = initial_variables(parts.cfg, parts.model_spec, parts.num_classes)
        state = create_state(variables, parts.tx, parts.optim, parts.cfg.seed)
        return replicate(state, parts.mesh), how

    def fresh_state(self) -> TrainState:
        """A state of the right structure (used abstractly, to restore a checkpoint into)."""
        variables = random_variables(self.parts.model_spec.arch, self.parts.num_classes, self.parts.cfg.seed)
        return create_state(variables, self.parts.tx, self.parts.optim, self.parts.cfg.seed)

    def save(self, state: TrainState) -> None:
        """``state``, as the checkpoint of its step."""
        import orbax.checkpoint as ocp

        self.manager.save(int(host_copy(state.step)), args=ocp.args.StandardSave(state), force=True)

    def wait_until_finished(self) -> None:
        self.manager.wait_until_finished()
