"""cdv2: ColorizeDiffusion v2 in JAX/Flax."""
__version__ = "0.1.0"
