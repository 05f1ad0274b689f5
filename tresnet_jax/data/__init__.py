"""Images into batches: evaluation preprocessing (PIL-exact), the sources read by index (folders,
TFDS splits without TensorFlow, tfrecord framing), the host pool of decoding workers, training
augmentation and the resumable, device-count-invariant training stream, and class names.

May import: ``tresnet_jax.errors``. Nothing here knows the model; JAX's devices appear only
in ``gpu_decode``, imported lazily (``to_jax`` hands decoded images over through DLPack).
"""
