"""Seconds from opening the training stream at step S to its first batch, for S from 0 to
hundreds of epochs in: resuming reads only the batch it resumes at, so the time should not grow
with S (before, a TFDS stream skipped every record consumed since step 0).

    python bench/resume_time.py --synthetic 2048 --output bench/results/cpu-2core/resume_time.json
    python bench/resume_time.py --dataset imagenet2012:train --data-dir ~/tensorflow_datasets --output F.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from bench.input_pipeline import write_synthetic
from tresnet_jax.data.augment import AugmentConfig
from tresnet_jax.data.sources import FolderSource, LabelMap
from tresnet_jax.data.tfds_reader import open_split
from tresnet_jax.data.train_stream import StreamSpec, steps_per_epoch, train_batches

EPOCHS = (0, 1, 10, 100, 300)  # where the stream is resumed, in epochs (plus a few steps)


def first_batch_seconds(source, spec: StreamSpec, step: int, classes: int) -> float:
    start = time.perf_counter()
    stream = train_batches(source, spec, AugmentConfig(), step, LabelMap(np.arange(classes), classes))
    next(stream)
    seconds = time.perf_counter() - start
    stream.close()
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--synthetic", type=int, metavar="N", help="a folder of N ImageNet-like JPEGs, written first")
    data.add_argument("--dataset", help="a prepared TFDS split NAME:SPLIT")
    parser.add_argument("--data-dir", help="TFDS data directory")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="resume-time-") as folder:
        if args.synthetic:
            write_synthetic(Path(folder), args.synthetic)
            source = FolderSource.scan(folder)
        else:
            source = open_split(args.dataset, args.data_dir, default_split="train")
        spec = StreamSpec(args.batch_size)
        steps = steps_per_epoch(source, spec)
        first_batch_seconds(source, spec, 0, len(source.class_names))  # warm: imports, file cache
        rows = []
        for epochs in EPOCHS:
            step = epochs * steps + steps // 2
            seconds = first_batch_seconds(source, spec, step, len(source.class_names))
            rows.append({"epochs": epochs, "step": step, "first_batch_seconds": seconds})
            print(f"resume at step {step:>8} (epoch {epochs:>3}): first batch after {seconds:.2f} s", flush=True)
    result = {
        "source": source.name,
        "images": len(source),
        "batch": args.batch_size,
        "steps_per_epoch": steps,
        "resumes": rows,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
