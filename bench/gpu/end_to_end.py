"""The library's own compiled steps end to end on one device: evaluation (what eval.py runs) and
training (what train.py runs: label smoothing, EMA, Nesterov SGD with weight decay, metrics),
fed batch by batch from the host, and how fast the host's cores decode JPEGs.

The batches are synthetic uint8 images, the same array every step (copied to the device every
step, as real batches are), so the steps are measured apart from the input pipeline, which
bench/input_pipeline.py measures against timm's (both run on the lent machines, which have no
TensorFlow, as eval.py and train.py do). The host's JPEG rate (PIL, one thread per core) says
whether the input pipeline or the device would bound eval.py there.
"""

from __future__ import annotations

import concurrent.futures
import io
import itertools
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageOps

import tresnet_jax
from bench.gpu.photos import generated_image
from tresnet_jax.evaluation import compiled_eval_step, pad_batch
from tresnet_jax.runtime.parallel import BATCH_AXIS, data_mesh, host_copy, prefetch_to_devices, replicate
from tresnet_jax.runtime.precision import PRECISIONS
from tresnet_jax.train.config import TrainConfig, from_flat
from tresnet_jax.train.run_log import LaggedMetrics
from tresnet_jax.train.step import create_state, make_optimizer, make_train_step

LOG_EVERY = TrainConfig().run.log_every  # train.py's default


def evaluation_rate(model_name: str, precision: str, batch: int, image_size: int, steps: int) -> dict[str, Any]:
    """Images/s of ``evaluation.compiled_eval_step`` over ``steps`` batches after a first one."""
    mesh = data_mesh(jax.local_devices()[:1])
    model, variables = tresnet_jax.create_model(model_name, dtype=PRECISIONS[precision])
    variables = replicate(variables, mesh)
    start = time.perf_counter()
    compiled = compiled_eval_step(model, mesh, False, batch, image_size)
    compile_s = time.perf_counter() - start
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (batch, image_size, image_size, 3), dtype=np.uint8)
    host = pad_batch(images, rng.integers(0, model.num_classes, batch), np.arange(batch), batch)
    totals = None
    for number, (_, device_batch) in enumerate(prefetch_to_devices(itertools.repeat(host, steps + 1), mesh)):
        sums = compiled(variables, device_batch)[0]
        totals = sums if totals is None else jax.tree_util.tree_map(jnp.add, totals, sums)
        if number == 0:
            jax.block_until_ready(totals)
            start = time.perf_counter()
    counted = float(jax.device_get(totals)["count"])
    rate = steps * batch / (time.perf_counter() - start)
    return {"images_per_s": rate, "compile_s": compile_s, "batch": batch, "steps": steps, "images_counted": counted}


def training_rate(
    model_name: str, precision: str, batch: int, image_size: int, steps: int, repeated: int
) -> dict[str, Any]:
    """Images/s of ``training.make_train_step`` (the defaults of train.py) over ``steps`` steps
    after a first one, the metrics read one step behind as the trainer reads them; and whether
    two runs of ``repeated`` steps from the same state end with identical parameters."""
    mesh = data_mesh(jax.local_devices()[:1])
    model, variables = tresnet_jax.create_model(model_name, dtype=PRECISIONS[precision], axis_name=BATCH_AXIS)
    cfg = from_flat({"optim.batch_size": batch, "model.precision": precision})  # train.py's defaults otherwise
    tx = make_optimizer(cfg, steps + 1)
    initial = jax.tree_util.tree_map(np.asarray, create_state(variables, tx, cfg))
    step = make_train_step(model, tx, cfg, steps + 1, mesh)
    rng = np.random.default_rng(0)
    host = {
        "image": rng.integers(0, 256, (batch, image_size, image_size, 3), dtype=np.uint8),
        "label": rng.integers(0, model.num_classes, batch).astype(np.int32),
    }
    start = time.perf_counter()
    state = replicate(initial, mesh)
    compiled = step.lower(state, next(prefetch_to_devices([host], mesh))[1]).compile()
    compile_s = time.perf_counter() - start
    first = _params_after(compiled, replicate(initial, mesh), host, mesh, repeated)
    again = _params_after(compiled, replicate(initial, mesh), host, mesh, repeated)
    repeatable = all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    lagged, loss = LaggedMetrics(), None
    for number, (_, device_batch) in enumerate(prefetch_to_devices(itertools.repeat(host, steps + 1), mesh)):
        state, metrics = compiled(state, device_batch)
        for window in lagged.push(number + 1, metrics, log=(number + 1) % LOG_EVERY == 0, sync=number == steps):
            loss = float(jax.device_get(window[-1][1])["loss"])
        if number == 0:
            jax.block_until_ready(state)
            start = time.perf_counter()
    rate = steps * batch / (time.perf_counter() - start)
    return {
        "images_per_s": rate, "compile_s": compile_s, "batch": batch, "steps": steps, "last_loss": loss,
        "repeatable": repeatable, "repeated_steps": repeated,
    }  # fmt: skip


def _params_after(compiled: Any, state: Any, host: dict[str, np.ndarray], mesh: Any, steps: int) -> list[np.ndarray]:
    """The parameters, on the host, after ``steps`` steps from ``state`` (donated)."""
    for _, device_batch in prefetch_to_devices(itertools.repeat(host, steps), mesh):
        state, _ = compiled(state, device_batch)
    return [host_copy(leaf) for leaf in jax.tree_util.tree_leaves(state.params)]


def jpeg_decode_rate(images: int, image_size: int, distinct: int = 8) -> dict[str, Any]:
    """Images/s at which the host's cores decode ImageNet-sized JPEGs (500x375, quality 90) and
    bring them to ``image_size`` (shorter side resized, centre crop) with PIL."""
    encoded = []
    for seed in range(distinct):
        buffer = io.BytesIO()
        generated_image(seed, (500, 375)).save(buffer, format="JPEG", quality=90)
        encoded.append(buffer.getvalue())
    work = [encoded[i % distinct] for i in range(images)]

    def decode(data: bytes) -> np.ndarray:
        with Image.open(io.BytesIO(data)) as image:
            return np.asarray(ImageOps.fit(image.convert("RGB"), (image_size, image_size), Image.BILINEAR))

    threads = os.cpu_count() or 1
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        start = time.perf_counter()
        decoded = list(pool.map(decode, work))
        seconds = time.perf_counter() - start
    return {"images_per_s": len(decoded) / seconds, "threads": threads, "images": len(decoded)}
