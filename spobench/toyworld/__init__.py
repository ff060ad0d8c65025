"""The tiny world: a synthetic text-to-image task with a known ground truth."""
