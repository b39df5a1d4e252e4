"""cdv2: ColorizeDiffusion v2 in JAX/Flax.

`cdv2.Colorizer` is the inference API (`cdv2.sample.colorizer.Colorizer`), `cdv2.BatchColorizer` and
`cdv2.Request` its batched form (`cdv2.sample.batch`); they are imported lazily so that `import cdv2`
(e.g. for the CLI's --help) does not start jax.
"""
__version__ = "0.1.0"
__all__ = ["BatchColorizer", "Colorizer", "Request"]


def __getattr__(name):
    if name == "Colorizer":
        from cdv2.sample.colorizer import Colorizer

        return Colorizer
    if name in ("BatchColorizer", "Request"):
        from cdv2.sample import batch

        return getattr(batch, name)
    raise AttributeError(f"module 'cdv2' has no attribute {name!r}")
