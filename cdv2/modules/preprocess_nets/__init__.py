"""The authors' app preprocessors as Flax networks (masks and line extractors), NHWC."""
