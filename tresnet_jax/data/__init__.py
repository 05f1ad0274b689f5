"""Images into batches: evaluation preprocessing (PIL-exact), the sources read by index (folders,
labels CSVs, TFDS splits without TensorFlow, tfrecord framing, synthetic images), the stages every
input stream is made of (``pipeline``: keys, reading and per-image work on the host pool of
decoding workers, batching), training augmentation, the resumable, device-count-invariant
training stream, the GPU decoder and its streams, and class names.

May import: ``tresnet_jax.errors``. Nothing here knows the model; JAX's devices appear only
in ``gpu_decode``, imported lazily (``to_jax`` hands decoded images over through DLPack).
"""
