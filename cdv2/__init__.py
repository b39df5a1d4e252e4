"""cdv2: ColorizeDiffusion v2 in JAX/Flax.

`cdv2.Colorizer` is the inference API (`cdv2.sample.colorizer.Colorizer`); it is imported lazily so
that `import cdv2` (e.g. for the CLI's --help) does not start jax.
"""
__version__ = "0.1.0"
__all__ = ["Colorizer"]


def __getattr__(name):
    if name == "Colorizer":
        from cdv2.sample.colorizer import Colorizer

        return Colorizer
    raise AttributeError(f"module 'cdv2' has no attribute {name!r}")
